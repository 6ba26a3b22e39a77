"""The positive control's parts (issue 31): a corpus that plants long pauses in a fraction of its training
recordings, an exact detector that finds them without ASR (in the audio and in the rendered log-mel), and the
judges built on it (the ``pause`` pair scorer, GRPO's pause reward, the evaluation's ``defect`` metric); and the
validation split that checkpoint choice reads instead of dev (issue 33, item 3)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .conftest import CI_CONFIG


def _speech(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced-speech stand-in: a 150 Hz buzz with a 4 Hz syllable envelope that dips ~12 dB, never silent."""
    t = np.arange(int(seconds * sr)) / sr
    env = 0.4 + 0.6 * np.abs(np.sin(2 * np.pi * 4 * t))
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.3 * env * np.sign(np.sin(2 * np.pi * 150 * t)) + noise).astype(np.float32)


def _quiet(seconds: float, sr: int = 16000, dbfs: float = -70.0) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(int(seconds * sr)) * 10 ** (dbfs / 20)).astype(np.float32)


def test_the_detector_finds_the_inner_pause_and_only_it():
    from eval.defects import DefectConfig, has_pause, pause_of_wav

    sr = 16000
    clean = np.concatenate([_quiet(0.3), _speech(1.2), _quiet(0.5)])  # silence before and after: not a pause
    paused = np.concatenate([_quiet(0.3), _speech(0.6), _quiet(0.55), _speech(0.6, seed=2), _quiet(0.5)])
    assert pause_of_wav(clean, sr) == 0.0
    assert pause_of_wav(paused, sr) == pytest.approx(0.55, abs=0.02)
    assert not has_pause(pause_of_wav(clean, sr)) and has_pause(pause_of_wav(paused, sr))
    short = np.concatenate([_speech(0.6), _quiet(0.12), _speech(0.6, seed=2)])  # a closure-length gap
    assert pause_of_wav(short, sr) == pytest.approx(0.12, abs=0.02) and not has_pause(pause_of_wav(short, sr))
    assert pause_of_wav(np.zeros(0, np.float32), sr) == 0.0 and pause_of_wav(_quiet(1.0), sr) == 0.0
    # a pause in a noisy room (-40 dBFS, ~28 dB under this speech) is not silent at the default 35 dB threshold, and
    # is at 20 dB: the settings say what counts as silence
    room = np.concatenate([_speech(0.6), _quiet(0.5, dbfs=-40.0), _speech(0.6, seed=2)])
    assert not has_pause(pause_of_wav(room, sr)) and has_pause(pause_of_wav(room, sr, DefectConfig(rel_db=20.0)))


def test_the_log_mel_front_reads_the_pause_the_audio_front_reads():
    """The detector on a codec's log-mel (the rendered latent, before Griffin-Lim) and on the waveform agree."""
    from eval.defects import pause_of_logmel, pause_of_wav
    from models.codec import load_codec

    codec = load_codec(Path(CI_CONFIG).parent / "ci_round0" / "codec")
    # the log-mel's analysis window (n_fft samples) reaches into the gap from both sides: it reads it one window
    # shorter, to within a frame; the audio front's 10 ms frames read it to within one of them
    window, frame = codec.cfg.n_fft / codec.sample_rate, 1 / codec.frame_rate
    for gap in (0.0, 0.3, 0.6):
        wav = np.concatenate([_speech(0.7), _quiet(gap), _speech(0.7, seed=3)]) if gap else _speech(1.4)
        a = pause_of_wav(wav, codec.sample_rate)
        b = pause_of_logmel(codec.features(wav), codec.frame_rate)
        c = pause_of_logmel(codec.dequantize(codec.encode(wav)), codec.frame_rate)  # through the codec's codes
        expect = max(0.0, gap - window)
        assert abs(a - gap) <= 0.01 + 1e-9 and abs(b - expect) <= frame + 1e-9 and abs(c - expect) <= frame + 1e-9, \
            (gap, a, b, c)


def test_the_corpus_plants_pauses_in_train_only_and_keeps_every_split_in_place():
    from align.config import CorpusConfig
    from align.corpus import _plan, planted_defect

    clean = CorpusConfig(n_sentences=300, n_dev_sentences=10, n_test_sentences=20)
    defect = CorpusConfig(n_sentences=300, n_dev_sentences=10, n_test_sentences=20, defect="pause", n_val_sentences=5)
    a, b = _plan(clean), _plan(defect)
    for split in ("train", "dev", "test"):
        assert a[split] == b[split]  # the defect and the validation split move no utterance
    assert len(b["val"]) == 5 * len(defect.voices)
    assert not {t for _, _, t in b["val"]} & {t for s in ("train", "dev", "test") for _, _, t in b[s]}
    drawn = {s: [planted_defect(defect, s, u, t) for u, _, t in b[s]] for s in b}
    assert all(d is None for s in ("dev", "test", "val") for d in drawn[s])
    train = [d for d in drawn["train"] if d is not None]
    share = len(train) / len(drawn["train"])
    n = len(drawn["train"])
    assert abs(share - 0.3) < 3 * np.sqrt(0.3 * 0.7 / n), share  # ~30%, a binomial draw per utterance
    for (u, _, text), d in zip(b["train"], drawn["train"]):
        if d is not None:
            assert 1 <= d["after_word"] < len(text.split()) and 0.5 <= d["seconds"] <= 0.8
    assert planted_defect(defect, "train", b["train"][0][0], b["train"][0][2]) == drawn["train"][0]  # deterministic
    assert clean.identity() == CorpusConfig(n_sentences=300, n_dev_sentences=10, n_test_sentences=20,
                                            defect_fraction=0.9).identity()  # no defect: its settings shape nothing


def test_a_planted_pause_is_in_the_audio_and_its_alignment(tmp_path):
    from align.corpus import check_flite, synthesise
    from eval.defects import has_pause, pause_of_wav
    from models.audio import load_audio
    from models.phones import read_alignment

    exe = check_flite()
    text = "my uncle likes the green kite"
    synthesise(exe, "slt", text, tmp_path / "clean.wav", 16000, True)
    planted = synthesise(exe, "slt", text, tmp_path / "paused.wav", 16000, True, {"after_word": 3, "seconds": 0.6})
    clean, paused = load_audio(tmp_path / "clean.wav", 16000), load_audio(tmp_path / "paused.wav", 16000)
    assert not has_pause(pause_of_wav(clean, 16000))
    # the 0.6 s of noise plus the 50 ms of silence each part keeps after trimming
    assert pause_of_wav(paused, 16000) == pytest.approx(0.7, abs=0.05)
    segs = read_alignment(tmp_path / "paused.wav")
    pau = [(s, e) for p, s, e in segs if p == "pau" and e - s > 0.5]
    assert pau == [(pytest.approx(planted["start"], abs=1e-4), pytest.approx(planted["end"], abs=1e-4))]
    speech = [p for p, _, _ in segs if p != "pau"]
    assert speech == [p for p, _, _ in read_alignment(tmp_path / "clean.wav") if p != "pau"]  # the same phones


def test_the_pause_scorer_and_grpo_reward_read_the_detector():
    from align import methods, pairs
    from align.config import load_config

    cfg = load_config(CI_CONFIG)
    ctx = SimpleNamespace(cfg=cfg)
    paused = np.concatenate([_speech(0.6), _quiet(0.5), _speech(0.6, seed=2)])
    batch = SimpleNamespace(logmels=None, wavs=[_speech(1.2), paused, np.zeros(0, np.float32)], sample_rate=16000)
    assert pairs.SCORERS["pause"](ctx)(batch) == [0.0, 1.0, 0.0]
    assert methods.speech_reward(None, 0.0, frames=10, sim_weight=0.0, pause=1.0) == 0.0  # reward: pause
    assert methods.speech_reward(None, 0.0, frames=10, sim_weight=0.0, pause=0.0) == 1.0
    assert methods.speech_reward(0.25, 0.8, frames=10, sim_weight=0.5, pause=1.0, pause_weight=1.0) == pytest.approx(0.15)
    assert methods.speech_reward(None, 0.0, frames=0, sim_weight=0.0, pause=0.0) == 0.0  # said nothing: 0


def test_evaluation_measures_the_defect_on_extra_samples(tmp_path):
    """Every evaluated clip carries its longest pause; eval.defect_samples adds detector-only samples per
    utterance, and the summary's defect rate is over all of them."""
    import soundfile as sf

    from eval.evaluate import EvalItem, evaluate_policy
    from .fakes import tiny_policy

    policy = tiny_policy()
    ref = tmp_path / "ref.wav"
    sf.write(ref, _speech(0.5), 16000)
    items = [EvalItem(f"u{i}", "a cat", "s0", str(ref), str(ref), prompt_codes=torch.tensor([[1, 2, 3, 4]]))
             for i in range(3)]
    scorers = SimpleNamespace(quality=None, wer=lambda w, sr, t: ([0.0] * len(w), ["x"] * len(w)),
                              sim=lambda w, sr, r: [0.5] * len(w), speaker=SimpleNamespace(sample_rate=16000),
                              phones=lambda w, sr, t: [{} for _ in w])
    summary, rows = evaluate_policy(policy, items, scorers=scorers, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                                    batch_size=2, quality=False, defect_samples=3)
    assert summary["defect_n"] == 3 * 4 and all(len(r["pauses"]) == 3 for r in rows)
    assert all(isinstance(r["pause"], float) and 0 <= r["defect"] <= 1 for r in rows)
    assert summary["defect_rate"] == pytest.approx(np.mean([r["defect"] for r in rows]))
    again, rows2 = evaluate_policy(policy, items, scorers=scorers, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                                   batch_size=2, quality=False, defect_samples=3)
    assert [r["pauses"] for r in rows2] == [r["pauses"] for r in rows]  # seeded


def test_checkpoint_choice_reads_the_validation_split_never_dev(tmp_path):
    from align.config import load_config
    from align.run import Splits
    from align.validation import dev_items
    from models.data import Utterance

    with pytest.raises(ValueError, match="corpus.n_val_sentences"):  # refused when the config is read
        load_config(CI_CONFIG, [f"out_dir={tmp_path}", "train.validate_every=2"])
    cfg = load_config(CI_CONFIG, [f"out_dir={tmp_path}", "train.validate_every=2", "corpus.n_val_sentences=2"])
    utt = lambda i, split: Utterance(f"{split}{i}", f"/{split}{i}.wav", f"text {i}", "s0")  # noqa: E731
    ctx = SimpleNamespace(cfg=cfg, splits=Splits([utt(i, "t") for i in range(4)], [utt(i, "d") for i in range(4)],
                                                 [utt(i, "x") for i in range(4)]))
    with pytest.raises(ValueError, match="corpus.n_val_sentences"):
        dev_items(ctx, 2)  # no validation split: refused, not silently dev
    ctx.splits.val = [utt(i, "v") for i in range(4)]
    ctx.prompt_for = lambda u, pool, min_seconds=0.0: next(p for p in pool if p.id != u.id)
    ctx.codes = lambda u: torch.zeros(1, 4, dtype=torch.long)
    items = dev_items(ctx, 2)
    assert len(items) == 2 and all(it.id.startswith("v") and it.prompt_id.startswith("v") for it in items)
