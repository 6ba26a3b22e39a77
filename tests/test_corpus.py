"""The embedded flite corpus (align/corpus.py): sentence grammar, config checks, a tiny build."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from align.config import CorpusConfig
from align.corpus import generate_sentences, prepare_corpus, trim_silence
from models.data import choose_prompt, load_manifest
from models.text import normalize_text

needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed (apt-get install flite)")


def test_generate_sentences_deterministic_distinct_and_simple():
    s = generate_sentences(400, seed=0)
    assert s == generate_sentences(400, seed=0)
    assert s != generate_sentences(400, seed=1)
    assert len(set(s)) == 400 and len({normalize_text(x) for x in s}) == 400
    assert generate_sentences(1000, seed=0)[:400] == s  # prefix-stable: test/dev sets do not move with n
    words = set()
    for x in s:
        assert 4 <= len(x.split()) <= 9, x
        assert x == x.lower() and not any(ch.isdigit() for ch in x), x
        assert all(ch.isalpha() or ch == " " for ch in x), x
        words.update(x.split())
    assert 100 <= len(words) <= 400  # a closed, small vocabulary
    assert generate_sentences(0, seed=0) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"voices": ["slt", "bob"]}, r"unknown voice.*'bob'.*available: slt, awb"),
    ({"voices": []}, "voices is empty"),
    ({"voices": ["slt", "slt"]}, "repeats a voice"),
    ({"voices_per_sentence": 5}, "voices_per_sentence=5 must be between 1 and"),
    ({"n_sentences": 50, "n_dev_sentences": 20, "n_test_sentences": 40}, "leaves no train sentence"),
    ({"n_dev_sentences": 0}, "must both be >= 1"),
    ({"sample_rate": 100}, "sample_rate=100"),
    ({"n_sentences": "many"}, "n_sentences='many' must be an integer"),
    ({"trim_silence": "yes"}, "trim_silence"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    assert CorpusConfig.from_dict({"n_sentences": 300, "voices": ("slt", "awb")}).voices == ["slt", "awb"]
    with pytest.raises(ValueError, match="unknown corpus key.*n_sentence.*known keys"):
        CorpusConfig.from_dict({"n_sentence": 300})


def test_trim_silence_keeps_50ms():
    sr = 16000
    rng = np.random.default_rng(0)
    speech = 0.3 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr)
    wav = np.concatenate([np.zeros(sr // 4), speech, np.zeros(sr // 8)]) + 1e-4 * rng.standard_normal(sr * 11 // 8)
    out = trim_silence(wav.astype(np.float32), sr)
    assert abs(len(out) - (sr + 2 * 0.05 * sr)) <= 0.03 * sr  # speech + ~50 ms each side


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    if shutil.which("flite") is None:
        pytest.skip("flite not installed (apt-get install flite)")
    cfg = CorpusConfig(n_sentences=6, n_dev_sentences=1, n_test_sentences=1, voices=["slt", "kal"],
                       voices_per_sentence=1, seed=3)
    out = tmp_path_factory.mktemp("corpus")
    return cfg, out, prepare_corpus(cfg, out)


@needs_flite
def test_tiny_corpus_wavs_and_manifests(tiny_corpus):
    cfg, out, paths = tiny_corpus
    assert set(paths) == {"train", "dev", "test", "corpus"}
    splits = {s: load_manifest(paths[s]) for s in ("train", "dev", "test")}
    assert all(skips == [] for _, skips in splits.values())
    utts = {s: u for s, (u, _) in splits.items()}
    # 4 train sentences x 1 voice, dev/test 1 sentence x every voice
    assert [len(utts[s]) for s in ("train", "dev", "test")] == [4, 2, 2]
    assert {u.speaker for u in utts["test"]} == {u.speaker for u in utts["dev"]} == {"slt", "kal"}
    assert {u.speaker for u in utts["train"]} == {"slt", "kal"}  # voices alternate over train sentences
    train_texts = {u.text for u in utts["train"]}
    assert not train_texts & {u.text for u in utts["test"] + utts["dev"]}
    for u in (x for v in utts.values() for x in v):
        assert u.audio == str(out / "wav" / u.speaker / f"{u.id}.wav")
        wav, sr = sf.read(u.audio, dtype="float32")
        assert sr == 16000 and wav.ndim == 1  # kal is 8 kHz natively: resampled
        assert np.abs(wav).max() > 0.05  # audible
        assert 0.5 < len(wav) / sr < 6.0 and abs(u.duration - len(wav) / sr) < 1e-3
    # the raw manifest rows carry relative paths
    row = json.loads(paths["train"].read_text().splitlines()[0])
    assert row["audio"].startswith("wav/") and set(row) == {"id", "audio", "text", "speaker", "duration"}
    # every speaker has a prompt that is not the target
    pool = [u for v in utts.values() for u in v]
    for u in pool:
        assert choose_prompt(u, pool, seed=0).id != u.id
    summary = json.loads(paths["corpus"].read_text())
    assert summary["config"]["n_sentences"] == 6 and summary["total"]["utterances"] == 8
    assert summary["counts"]["train"]["sentences"] == 4 and summary["total"]["hours"] > 0
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.flite.wav"))


@needs_flite
def test_second_call_is_a_no_op(tiny_corpus):
    cfg, out, paths = tiny_corpus
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare_corpus(cfg, out) == paths
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # the worker count is not part of the corpus identity
    assert prepare_corpus(CorpusConfig(**{**vars(cfg), "num_workers": 1}), out) == paths
    with pytest.raises(ValueError, match="another config.*seed"):
        prepare_corpus(CorpusConfig(**{**vars(cfg), "seed": 4}), out)


@needs_flite
def test_killed_run_resumes_without_redoing_finished_wavs(tiny_corpus, tmp_path):
    cfg, out, _ = tiny_corpus
    # Simulate a run killed midway: the finished wavs exist, one is missing, no corpus.json yet.
    shutil.copytree(out, tmp_path / "c")
    c = tmp_path / "c"
    (c / "corpus.json").unlink()
    for s in ("train", "dev", "test"):
        (c / f"{s}.jsonl").unlink()
    victim = sorted((c / "wav" / "kal").glob("*.wav"))[0]
    victim.unlink()
    (c / "wav" / "kal" / ".kal_0000.abc.flite.wav").write_bytes(b"half")  # debris of the kill
    kept = {p: p.stat().st_mtime_ns for p in (c / "wav").rglob("*.wav") if not p.name.startswith(".")}
    paths = prepare_corpus(cfg, c)
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished wavs untouched
    assert not list(c.rglob(".*.flite.wav"))
    assert sum(len(load_manifest(paths[s])[0]) for s in ("train", "dev", "test")) == 8


def test_missing_flite_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = CorpusConfig(n_sentences=3, n_dev_sentences=1, n_test_sentences=1, voices=["slt"], voices_per_sentence=1)
    with pytest.raises(RuntimeError, match="apt-get install flite"):
        prepare_corpus(cfg, tmp_path / "c")
