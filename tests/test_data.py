"""Manifests and corpus layouts (align/data.py): tiny trees built in tmp_path, plus the real recordings."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.data import (
    Skip,
    Utterance,
    choose_prompt,
    load_any,
    load_librispeech,
    load_libritts,
    load_manifest,
    load_vctk,
    normalize_text,
    split_by_text,
    write_manifest,
)


def _wav(path: Path, seconds: float = 0.1, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- manifests


def test_real_manifest_loads(real_speech_dir):
    utts, skips = load_manifest(real_speech_dir / "manifest.jsonl")
    assert len(utts) == 13 and skips == []
    assert {u.speaker for u in utts} == {"spk1", "spk2", "LJ"}
    for u in utts:
        assert os.path.isabs(u.audio) and os.path.isfile(u.audio)
        assert u.text and u.duration is None
    assert utts[0].id == "spk1_snt1" and utts[0].text == "THE CHILD ALMOST HURT THE SMALL DOG"
    # load_any accepts the folder too (it holds manifest.jsonl)
    assert load_any(real_speech_dir)[0] == utts


def test_csv_manifest_with_extra_columns_and_duration(tmp_path):
    _wav(tmp_path / "audio" / "a.wav")
    _wav(tmp_path / "audio" / "b.wav")
    (tmp_path / "m.csv").write_text(
        "id,audio,text,speaker,duration,gender\n"
        'a,audio/a.wav,"hello, world",s1,0.1,f\n'
        "b,audio/b.wav,good morning,s1,,m\n"
    )
    utts, skips = load_manifest(tmp_path / "m.csv")
    assert skips == []
    assert utts == [
        Utterance("a", str(tmp_path / "audio" / "a.wav"), "hello, world", "s1", 0.1),
        Utterance("b", str(tmp_path / "audio" / "b.wav"), "good morning", "s1", None),
    ]


def test_bad_rows_are_skipped_and_recorded(tmp_path):
    _wav(tmp_path / "ok.wav")
    _wav(tmp_path / "ok2.wav")
    m = _jsonl(tmp_path / "m.jsonl", [
        {"id": "ok", "audio": "ok.wav", "text": "fine", "speaker": "s"},
        {"id": "notext", "audio": "ok.wav", "text": "  ", "speaker": "s"},
        {"id": "nokey", "audio": "ok.wav", "speaker": "s"},
        {"id": "nospk", "audio": "ok2.wav", "text": "x"},
        {"id": "gone", "audio": "missing.wav", "text": "x", "speaker": "s"},
        "",  # blank lines are allowed
        {"id": "abs", "audio": str(tmp_path / "ok2.wav"), "text": "y", "speaker": 7},
    ])
    utts, skips = load_manifest(m)
    assert [u.id for u in utts] == ["ok", "abs"]
    assert utts[1].speaker == "7"  # numbers in JSON become labels
    reasons = {s.id: s.reason for s in skips}
    assert set(reasons) == {"notext", "nokey", "nospk", "gone"}
    assert "text" in reasons["notext"] and "text" in reasons["nokey"]
    assert "speaker" in reasons["nospk"]
    assert "not found" in reasons["gone"] and "missing.wav" in reasons["gone"]
    assert all(isinstance(s, Skip) for s in skips)


def test_duplicate_ids_raise(tmp_path):
    _wav(tmp_path / "a.wav")
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "a.wav", "text": "x", "speaker": "s"}] * 2)
    with pytest.raises(ValueError, match=r"repeats id.*'a' \(lines 1 and 2\)"):
        load_manifest(m)


def test_bad_json_line_names_the_line(tmp_path):
    _wav(tmp_path / "a.wav")
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "a.wav", "text": "x", "speaker": "s"}, '{"id": "b",'])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        load_manifest(m)


@pytest.mark.parametrize("content", ["", "\n\n", "id,audio,text,speaker\n"])
def test_empty_manifest_raises(tmp_path, content):
    m = tmp_path / ("m.csv" if "," in content else "m.jsonl")
    m.write_text(content)
    with pytest.raises(ValueError, match="no rows"):
        load_manifest(m)


def test_missing_column_and_missing_file_raise(tmp_path):
    _wav(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text("id,audio,text\na,a.wav,hello\n")
    with pytest.raises(ValueError, match="lacks column.*speaker"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl")


def test_all_rows_skipped_raises(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "gone.wav", "text": "x", "speaker": "s"}])
    with pytest.raises(ValueError, match="no usable row.*audio file not found"):
        load_manifest(m)


def test_write_manifest_round_trip_with_relative_paths(tmp_path):
    a = _wav(tmp_path / "data" / "wav" / "a.wav")
    utts = [Utterance("a", str(a), "hello there", "s1", 0.1), Utterance("b", str(a), "bye", "s2")]
    out = tmp_path / "data" / "m.jsonl"
    write_manifest(out, utts)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"id": "a", "audio": "wav/a.wav", "text": "hello there", "speaker": "s1", "duration": 0.1}
    assert "duration" not in rows[1]
    assert load_manifest(out) == (utts, [])
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # temp file renamed away


# ---------------------------------------------------------------------------------------------- layouts


def _librispeech(root: Path) -> Path:
    for spk, chap, n in (("19", "198", 3), ("26", "495", 2)):
        d = root / "train-clean-100" / spk / chap
        d.mkdir(parents=True)
        lines = [f"{spk}-{chap}-{i:04d} WORDS NUMBER {i}" for i in range(n)]
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
        for i in range(n):
            _wav(d / f"{spk}-{chap}-{i:04d}.flac")
    (root / "train-clean-100" / "26" / "495" / "26-495-0001.flac").unlink()  # a missing file
    return root


def test_librispeech_layout(tmp_path):
    root = _librispeech(tmp_path / "LibriSpeech")
    utts, skips = load_librispeech(root)
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "19-198-0002", "26-495-0000"]
    assert utts[1].text == "WORDS NUMBER 1" and utts[1].speaker == "19"
    assert all(os.path.isfile(u.audio) and u.audio.endswith(".flac") for u in utts)
    assert [s.id for s in skips] == ["26-495-0001"]
    assert load_any(root) == (utts, skips)


def _libritts(root: Path) -> Path:
    d = root / "84" / "121123"
    for i, kind in enumerate(("normalized", "original", "normalized")):
        uid = f"84_121123_000007_00000{i}"
        _wav(d / f"{uid}.wav", sr=24000)
        (d / f"{uid}.{kind}.txt").write_text(f"Sentence {kind} {i}.")
    (d / "84_121123_000007_000000.original.txt").write_text("ignored when normalized exists")
    _wav(d / "84_121123_000008_000000.wav", sr=24000)  # no transcript
    return root


def test_libritts_layout(tmp_path):
    root = _libritts(tmp_path / "LibriTTS")
    utts, skips = load_libritts(root)
    assert [u.id for u in utts] == [f"84_121123_000007_00000{i}" for i in range(3)]
    assert [u.text for u in utts] == ["Sentence normalized 0.", "Sentence original 1.", "Sentence normalized 2."]
    assert {u.speaker for u in utts} == {"84"}
    assert [s.id for s in skips] == ["84_121123_000008_000000"] and "transcript" in skips[0].reason
    assert load_any(root) == (utts, skips)


def _vctk(root: Path, version: str) -> Path:
    for spk in ("p225", "p226"):
        for i in (1, 2):
            (root / "txt" / spk).mkdir(parents=True, exist_ok=True)
            (root / "txt" / spk / f"{spk}_00{i}.txt").write_text(f"Please call Stella {i}.\n")
            if version == "0.80":
                _wav(root / "wav48" / spk / f"{spk}_00{i}.wav", sr=48000)
            else:
                _wav(root / "wav48_silence_trimmed" / spk / f"{spk}_00{i}_mic1.flac", sr=48000)
                _wav(root / "wav48_silence_trimmed" / spk / f"{spk}_00{i}_mic2.flac", sr=48000)
    return root


@pytest.mark.parametrize("version", ["0.80", "0.92"])
def test_vctk_layouts(tmp_path, version):
    root = _vctk(tmp_path / "VCTK", version)
    (root / "txt" / "p226" / "p226_003.txt").write_text("No audio for this one.\n")
    utts, skips = load_vctk(root)
    assert [u.id for u in utts] == ["p225_001", "p225_002", "p226_001", "p226_002"]
    assert utts[0].speaker == "p225" and utts[0].text == "Please call Stella 1."
    if version == "0.92":
        assert all(u.audio.endswith("_mic1.flac") for u in utts)  # one mic, not both
    assert [s.id for s in skips] == ["p226_003"]
    assert load_any(root) == (utts, skips)


def test_load_any_rejects_unknown_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    _wav(tmp_path / "stuff" / "x.wav")
    with pytest.raises(ValueError, match="cannot tell what corpus"):
        load_any(tmp_path / "stuff")
    with pytest.raises(ValueError, match="does not exist"):
        load_any(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- prompts, splits


def _pool(n_speakers=3, n_sentences=6):
    return [Utterance(f"s{s}_{i}", f"/d/s{s}_{i}.wav", f"Sentence number {i}.", f"s{s}")
            for s in range(n_speakers) for i in range(n_sentences)]


def test_choose_prompt_same_speaker_never_self_and_deterministic():
    pool = _pool()
    for u in pool:
        p = choose_prompt(u, pool, seed=0)
        assert p.speaker == u.speaker and p.id != u.id and p.text != u.text
        # independent of pool order, stable across calls
        assert choose_prompt(u, list(reversed(pool)), seed=0) == p
    picks = lambda seed: [choose_prompt(u, pool, seed).id for u in pool]  # noqa: E731
    assert picks(0) == picks(0)
    assert picks(0) != picks(1)  # the seed matters
    assert len(set(picks(0))) > 3  # not always the same prompt


def test_choose_prompt_refuses_to_leak_the_target():
    lonely = Utterance("x", "/d/x.wav", "Hello.", "solo")
    same_sentence = Utterance("y", "/d/y.wav", "hello", "solo")  # same sentence read again
    pool = _pool() + [lonely, same_sentence]
    with pytest.raises(ValueError, match="no voice prompt for 'x'.*leaks the target"):
        choose_prompt(lonely, pool, seed=0)


def test_split_by_text_keeps_held_out_sentences_out_of_train():
    pool = _pool(n_speakers=3, n_sentences=10)
    pool.append(Utterance("s9_x", "/d/x.wav", "SENTENCE NUMBER 3", "s9"))  # same sentence, other spelling
    split = split_by_text(pool, n_dev_texts=2, n_test_texts=3, seed=0)
    texts = {k: {normalize_text(u.text) for u in v} for k, v in split.items()}
    assert len(texts["dev"]) == 2 and len(texts["test"]) == 3 and len(texts["train"]) == 5
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["dev"])
    assert not (texts["dev"] & texts["test"])
    assert sum(len(v) for v in split.values()) == len(pool)
    assert split == split_by_text(pool, 2, 3, seed=0)
    # input order does not change which sentences are held out
    rev = split_by_text(list(reversed(pool)), 2, 3, seed=0)
    assert {u.id for u in rev["test"]} == {u.id for u in split["test"]}
    with pytest.raises(ValueError, match="leaves no training sentence"):
        split_by_text(pool, 5, 5, seed=0)


def test_eval_manifest_prompt_columns_load_from_jsonl_and_csv(tmp_path):
    """`speechalign eval` manifests name their voice prompt; both formats carry it, relative to the file."""
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "p.wav")
    jl = _jsonl(tmp_path / "m.jsonl", [{"id": "u1", "audio": "a.wav", "text": "hi", "speaker": "s",
                                         "prompt_audio": "p.wav", "prompt_text": "the prompt"}])
    csv = tmp_path / "m.csv"
    csv.write_text("id,audio,text,speaker,prompt_audio,prompt_text\nu1,a.wav,hi,s,p.wav,the prompt\n")
    for path in (jl, csv):
        (u,), skips = load_manifest(path)
        assert u.prompt_audio == str(tmp_path / "p.wav") and u.prompt_text == "the prompt" and not skips
    # a missing prompt file is a recorded skip, not a crash later in evaluation
    _jsonl(jl, [{"id": "u1", "audio": "a.wav", "text": "hi", "speaker": "s", "prompt_audio": "gone.wav"},
                {"id": "u2", "audio": "a.wav", "text": "hi", "speaker": "s"}])
    utts, skips = load_manifest(jl)
    assert [u.id for u in utts] == ["u2"] and "prompt audio file not found" in skips[0].reason
    # and a written manifest keeps the prompt
    write_manifest(tmp_path / "out.jsonl", [Utterance("u1", str(tmp_path / "a.wav"), "hi", "s",
                                                      prompt_audio=str(tmp_path / "p.wav"))])
    (u,), _ = load_manifest(tmp_path / "out.jsonl")
    assert u.prompt_audio == str(tmp_path / "p.wav")
