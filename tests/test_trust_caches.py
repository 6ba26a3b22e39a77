"""Caches that cannot go stale (issue 33, items 1, 2 and 8): a stage cache is read only by the code, the policy, the
items (texts, prompt audio, references) and the settings that made it; a corrupt entry is recomputed; a policy
directory is read once per process; an evaluation read from the cache still saves the clips asked for."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .conftest import CI_CONFIG, REPO


# -- item 1: the code that computes a batch is part of its key ----------------------------------------------------
def _copy_sources(dst: Path) -> Path:
    for pkg in ("align", "models", "eval"):
        for f in (REPO / pkg).rglob("*.py"):
            if "__pycache__" not in f.parts:
                target = dst / f.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    return dst


def test_code_digest_changes_with_any_source_file_and_not_otherwise(tmp_path):
    from models.digest import code_digest, source_files

    tree = _copy_sources(tmp_path / "tree")
    assert code_digest(tree) == code_digest()  # the same sources and libraries: the same digest
    names = {str(f.relative_to(tree)) for f in source_files(tree)}
    # the modules the issue names: the sampler, the walk, the renderer, the ASR/SIM wrappers
    assert {"models/codec_lm.py", "models/walk.py", "models/renderer.py", "eval/scorers.py", "eval/asr.py",
            "align/stages.py", "align/pairs.py"} <= names
    scorers = tree / "eval" / "scorers.py"
    scorers.write_text(scorers.read_text().replace("return", "return  ", 1))  # one transcript-changing edit
    assert code_digest(tree) != code_digest()


def test_a_stage_cache_made_by_other_code_is_not_read(tmp_path, monkeypatch):
    """The issue's case: an evaluation cached, then the ASR wrapper changed: the evaluation is computed again."""
    from align.config import load_config
    from align.run import Context
    import models.digest as digest

    cfg = load_config(CI_CONFIG, [f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path}", "name=keyed"])
    ctx = Context(cfg, None)
    what = {"items": [("u1", "a text")]}
    policy = REPO / "configs" / "ci_round0"
    first = ctx.store("evals", policy, what)
    assert ctx.store("evals", policy, what).folder == first.folder  # same code, policy and items: read
    first.put("0-1", [{"wer": 0.5}])
    assert json.loads((first.folder / "meta.json").read_text())["code_digest"] == digest.code_digest()
    monkeypatch.setattr(digest, "_installed_code_digest", lambda packages: "0123456789abcdef")  # other code
    other = ctx.store("evals", policy, what)
    assert other.folder != first.folder and other.get("0-1") is None


# -- item 2: samples are keyed on the texts and the prompts' audio, not the ids -----------------------------------
@pytest.fixture(scope="module")
def ci_ctx(tmp_path_factory, ci_overrides):
    """A Context over the CI corpus whose round 0 is the committed CI policy (no training)."""
    from align.config import load_config
    from align.run import Context, RunDir

    def make(name: str, cache: Path, extra: list[str] = ()):
        root = tmp_path_factory.mktemp(name)
        cfg = load_config(CI_CONFIG, ci_overrides + [f"out_dir={root}", f"cache_dir={cache}", f"name={name}",
                                                     "sample.prompts_per_round=4", "sample.batch_size=4", *extra])
        run = RunDir(cfg)
        shutil.copytree(REPO / "configs" / "ci_round0", run.policy_dir(0))
        return Context(cfg, run)

    return make


def test_samples_of_other_texts_under_the_same_ids_are_not_read(ci_ctx, tmp_path):
    """Ids are {voice}_{i} in every corpus: a run with the same policy and other texts under the same ids (another
    corpus seed, or a manifest reusing ids) must speak its own texts, not read the first run's samples."""
    from align import stages
    from align.run import Splits
    from models.io import read_jsonl

    cache = tmp_path / "shared_cache"
    a = ci_ctx("texts_a", cache)
    stats_a = stages.sample(a, 1)
    assert stats_a["cached_tokens"] == 0
    again = ci_ctx("texts_a2", cache)
    assert stages.sample(again, 1)["cached_tokens"] == stats_a["tokens"]  # same texts: read from the cache

    b = ci_ctx("texts_b", cache)
    train = b.splits.train
    texts = [u.text for u in train]
    shifted = [replace(u, text=texts[(i + 7) % len(texts)]) for i, u in enumerate(train)]  # ids kept, texts moved
    b.splits = Splits(shifted, b.splits.dev, b.splits.test, b.splits.skipped, b.splits.val)
    stats_b = stages.sample(b, 1)
    assert stats_b["cached_tokens"] == 0, "samples spoken for other texts were read from the cache"
    rows_a = read_jsonl(a.run.samples_dir(1) / "samples.jsonl")
    rows_b = read_jsonl(b.run.samples_dir(1) / "samples.jsonl")
    assert [r["id"] for r in rows_a] == [r["id"] for r in rows_b]
    by_id = {u.id: u.text for u in shifted}
    assert all(r["text"] == by_id[r["id"]] for r in rows_b) and [r["text"] for r in rows_a] != [r["text"] for r in rows_b]


# -- item 8: a policy directory is read once; a corrupt entry is recomputed; a hit saves its clips -----------------
def test_a_policy_directory_is_read_once_per_process(tmp_path, monkeypatch):
    import builtins

    import models.digest as digest
    from align.config import load_config
    from align.run import Context

    policy = tmp_path / "policy"
    shutil.copytree(REPO / "configs" / "ci_round0", policy)
    n_files = sum(1 for f in policy.rglob("*") if f.is_file())
    reads = []
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if "b" in mode and str(policy) in str(file):
            reads.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(digest, "open", counting_open, raising=False)
    ctx = Context(load_config(CI_CONFIG, [f"cache_dir={tmp_path / 'cache'}"]), None)
    keys = {ctx.store(kind, policy, {"x": 1}).folder.name for kind in ("samples", "judge", "evals", "evals")}
    assert len(reads) == n_files and len(keys) == 3  # four stores, each file read once
    (policy / "model.safetensors").write_bytes((policy / "model.safetensors").read_bytes()[:-1] + b"\0")
    assert ctx.store("evals", policy, {"x": 1}).folder.name not in keys  # a rewritten file is read again
    assert len(reads) == n_files + 1


def test_a_corrupt_cache_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    from models.io import BatchStore

    store = BatchStore(tmp_path / "entry", meta={"kind": "evals"})
    store.put("0-4", [{"wer": 0.25}])
    assert store.get("0-4") == [{"wer": 0.25}]
    (tmp_path / "entry" / "0-4.json").write_text('[{"wer": 0.2')  # cut short (a disk filled up)
    with caplog.at_level(logging.WARNING):
        assert store.get("0-4") is None
    assert "unreadable" in caplog.text and not (tmp_path / "entry" / "0-4.json").exists()
    store.put("0-4", [{"wer": 0.25}])  # the stage computes it again and stores it
    assert store.get("0-4") == [{"wer": 0.25}]
    assert json.loads((tmp_path / "entry" / "meta.json").read_text())["kind"] == "evals"


def _stub_scorers():
    def wer(wavs, sr, texts):
        return [0.0] * len(wavs), ["x"] * len(wavs)

    return SimpleNamespace(quality=None, wer=wer, sim=lambda wavs, sr, refs: [0.5] * len(wavs),
                           speaker=SimpleNamespace(sample_rate=16000), phones=lambda wavs, sr, t: [{} for _ in wavs])


def test_an_evaluation_read_from_the_cache_saves_the_clips_asked_for(tmp_path):
    import soundfile as sf

    from eval.evaluate import EvalItem, evaluate_policy
    from models.io import BatchStore
    from .fakes import tiny_policy

    policy = tiny_policy()
    ref = tmp_path / "ref.wav"
    sf.write(ref, np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), 16000)
    items = [EvalItem(f"u{i}", "a cat", "s0", str(ref), str(ref), prompt_codes=torch.tensor([[1, 2, 3, 4]]))
             for i in range(3)]
    kw = dict(scorers=_stub_scorers(), temperature=1.0, top_k=0, top_p=1.0, seed=3, batch_size=2, quality=False)
    store = BatchStore(tmp_path / "cache")
    _, rows = evaluate_policy(policy, items, store=store, **kw)  # cached with no clips (eval.save_audio 0)
    out = tmp_path / "audio"
    _, again = evaluate_policy(policy, items, store=store, save_audio_dir=out, save_n=2, **kw)
    assert [r["codes"] for r in again] == [r["codes"] for r in rows]  # read from the cache, not spoken again
    fresh = tmp_path / "fresh"
    evaluate_policy(policy, items, save_audio_dir=fresh, save_n=2, **kw)
    spoken = [r["id"] for r in rows[:2] if r["n_frames"]]
    assert spoken, "the tiny policy said nothing; the test needs a clip"
    for uid in spoken:  # the clips a fresh evaluation saves, rendered again from the stored codes
        a, _ = sf.read(out / f"{uid}.wav")
        b, _ = sf.read(fresh / f"{uid}.wav")
        assert np.array_equal(a, b)
    assert not (out / "u2.wav").exists()


def test_cache_command_lists_and_prunes_what_no_current_code_reads(tmp_path, capsys):
    from align.cli import main
    from models.digest import code_digest
    from models.io import BatchStore

    cache = tmp_path / "cache"
    BatchStore(cache / "evals" / "current", meta={"kind": "evals", "code_digest": code_digest()}).put("0-2", [1])
    BatchStore(cache / "samples" / "other", meta={"kind": "samples", "code_digest": "feedfacefeedface"}).put("0-2", [1])
    BatchStore(cache / "judge" / "old_format").put("0-2", [1])  # written before entries said what made them
    assert main(["cache", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert "3 entries" in listing and "2 made by other code" in listing
    assert main(["cache", "--cache-dir", str(cache), "--prune"]) == 0
    assert sorted(p.name for p in cache.glob("*/*")) == ["current"]
    assert main(["cache", "--cache-dir", str(cache), "--prune", "--all"]) == 0
    assert not list(cache.glob("*/*"))
