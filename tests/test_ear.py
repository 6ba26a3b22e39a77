"""The second ear (eval/ear.py): shapes, a few training steps lower its CTC loss, save/load round-trips exactly, bad
input is refused with the fix, and on real speech it scores finite values and hears damage. Toy sizes only."""
import json

import numpy as np
import pytest
import torch

from eval.ear import (Ear, EarConfig, EarInputError, EarTrainConfig, reference_units, score_audio, score_logmel,
                      train_ear)
from models.audio import load_audio
from models.layout import TEXT_UNITS

N_MELS = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models on one thread: a second thread only waits for a core that the suite's other work holds (measured:
    80 toy steps 12 s on two threads beside another job, 1 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy(n_mels: int = N_MELS, seed: int = 0) -> Ear:
    torch.manual_seed(seed)
    return Ear(EarConfig.named("toy", n_mels=n_mels))


def _synthetic(texts: list[str], seed: int = 0) -> list[tuple[torch.Tensor, str]]:
    """A log-mel per text in which each phone is its own fixed spectrum held for 4 frames: learnable in seconds."""
    g = torch.Generator().manual_seed(seed)
    spectra = torch.randn(len(TEXT_UNITS), N_MELS, generator=g) * 2
    index = {u: i for i, u in enumerate(TEXT_UNITS)}
    out = []
    for t in texts:
        frames = [spectra[index[u]].expand(4, N_MELS) for u in reference_units(t)]
        silence = torch.full((3, N_MELS), -8.0)
        mel = torch.cat([silence, *frames, silence]) + 0.1 * torch.randn(3 + 4 * len(frames) + 3, N_MELS, generator=g)
        out.append((mel, t))
    return out


def test_shapes_and_scores():
    ear = _toy()
    x = torch.randn(3, 41, N_MELS)
    logp = ear(x, torch.tensor([41, 30, 7]))
    assert logp.shape == (3, 21, len(TEXT_UNITS) + 1)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 21), atol=1e-5)
    items = _synthetic(["the cat sat", "a dog"])
    scores = score_logmel(ear, [m for m, _ in items] + [torch.zeros(0, N_MELS)], ["the cat sat", "a dog", "cat"])
    assert [s.ref for s in scores[:2]] == [reference_units("the cat sat"), reference_units("a dog")]
    assert all(np.isfinite([s.per, s.nll, s.nll_frame]).all() for s in scores)
    assert scores[2].per == 1.0 and scores[2].hyp == []  # an empty sample: every phone deleted, a finite NLL


def test_few_steps_lower_the_ctc_loss():
    texts = ["the cat sat on the mat", "a dog ran home", "she will keep the ticket"]
    items = _synthetic(texts)
    ear = _toy()
    before = np.mean([s.nll for s in score_logmel(ear, [m for m, _ in items], texts)])
    losses = train_ear(ear, items, EarTrainConfig(steps=30, batch_size=3, lr=1e-2, warmup_steps=5, log_every=0))
    after = np.mean([s.nll for s in score_logmel(ear, [m for m, _ in items], texts)])
    assert after < 0.7 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_save_load_round_trips_and_refuses_damage(tmp_path):
    ear = _toy()
    ear.save(tmp_path / "ear", {"note": "toy"})
    back = Ear.load(tmp_path / "ear")
    assert back.digest == ear.digest and back.cfg == ear.cfg
    x, lengths = torch.randn(2, 25, N_MELS), torch.tensor([25, 19])
    assert torch.equal(ear.eval()(x, lengths), back(x, lengths))
    info = json.loads((tmp_path / "ear" / "ear.json").read_text())
    assert info["meta"] == {"note": "toy"}
    info["digest"] = "0" * 12
    (tmp_path / "ear" / "ear.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="digest"):
        Ear.load(tmp_path / "ear")
    with pytest.raises(FileNotFoundError, match="train_ear"):
        Ear.load(tmp_path / "nothing")


def test_bad_input_gives_a_clear_error():
    ear = _toy()
    sr = ear.cfg.sample_rate
    with pytest.raises(EarInputError, match="0 samples"):
        score_audio(ear, [np.zeros(0, np.float32)], sr, ["hello"])
    with pytest.raises(EarInputError, match="NaN"):
        score_audio(ear, [np.full(4000, np.nan, np.float32)], sr, ["hello"])
    with pytest.raises(EarInputError, match="resample"):
        score_audio(ear, [np.zeros(4000, np.float32)], 22050, ["hello"])
    with pytest.raises(EarInputError, match=f"\\[T, {N_MELS}\\]"):
        score_logmel(ear, [torch.zeros(10, N_MELS + 1)], ["hello"])
    with pytest.raises(EarInputError, match="NaN"):
        score_logmel(ear, [torch.full((10, N_MELS), float("nan"))], ["hello"])
    with pytest.raises(ValueError, match="no speakable"):
        score_logmel(ear, [torch.zeros(10, N_MELS)], ["?!"])
    with pytest.raises(ValueError, match=r"unknown config key.*'ear\."):
        EarConfig.from_dict({"chanels": 8})
    with pytest.raises(ValueError, match="choose one of"):
        EarConfig.named("huge")
    with pytest.raises(ValueError, match="noise_db"):
        EarTrainConfig(noise_db=(60.0, 30.0))


def test_features_are_the_codecs_log_mel():
    from models.codec import CodecConfig, MelRVQCodec

    cfg = CodecConfig(n_q=1, full_levels=1, codebook_size=2, n_mels=N_MELS)
    codec = MelRVQCodec(cfg, torch.zeros(1, 2, N_MELS))
    wav = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    ear = _toy()
    assert torch.allclose(ear.features(wav, 16000), codec.features(wav))


def test_real_speech_scores_finite_and_hears_damage(real_speech_dir):
    """A toy ear that heard three real clips for a few steps: finite scores, and each clip time-reversed (the same
    spectra, the phones in the wrong order) scores worse than the clip itself."""
    rows = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").read_text().splitlines()][:3]
    wavs = [load_audio(real_speech_dir / r["audio"], 16000) for r in rows]
    texts = [r["text"] for r in rows]
    ear = Ear(EarConfig.named("toy", n_mels=40))
    torch.manual_seed(0)
    mels = [ear.features(w, 16000) for w in wavs]
    train_ear(ear, list(zip(mels, texts)), EarTrainConfig(steps=80, batch_size=3, lr=1e-2, warmup_steps=5,
                                                          noise_prob=0.0, log_every=0))
    clean = score_audio(ear, wavs, 16000, texts)
    reversed_ = score_audio(ear, [w[::-1].copy() for w in wavs], 16000, texts)
    assert all(np.isfinite([s.per, s.nll]).all() for s in clean + reversed_)
    assert all(r.nll > c.nll for c, r in zip(clean, reversed_)), ([c.nll for c in clean], [r.nll for r in reversed_])


def test_an_evaluation_reads_both_ears_and_the_tables_and_gate_read_the_second(tmp_path):
    """eval.ear set: every evaluated clip carries the second ear's PER, phone counts and NLL beside pocketsphinx's
    WER, the summary its corpus PER, and the study statistics and the gate read ``per`` like any metric."""
    from types import SimpleNamespace

    import soundfile as sf

    from eval.evaluate import EvalItem, evaluate_policy
    from eval.gate import GateConfig, run_gate, write_baseline
    from eval.scorers import EvalConfig, Scorers
    from eval.stats import metric_arrays
    from eval.table import rows_frame
    from models.io import write_jsonl

    from .fakes import tiny_policy

    _toy(n_mels=64).save(tmp_path / "ear")
    ear = Scorers(EvalConfig(ear=str(tmp_path / "ear")), "cpu")
    ref = tmp_path / "ref.wav"
    sf.write(ref, np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1, 16000)
    items = [EvalItem(f"u{i}", "a cat", "s0", str(ref), str(ref), prompt_codes=torch.tensor([[1, 2, 3, 4]]))
             for i in range(3)]
    scorers = SimpleNamespace(quality=None, wer=lambda w, sr, t: ([0.5] * len(w), ["a"] * len(w)),
                              sim=lambda w, sr, r: [0.5] * len(w), speaker=SimpleNamespace(sample_rate=16000),
                              phones=ear.phones)
    summary, rows = evaluate_policy(tiny_policy(), items, scorers=scorers, temperature=1.0, top_k=0, top_p=1.0,
                                    seed=0, batch_size=2, quality=False)
    n_ref = len(reference_units("a cat"))
    assert all(r["ref_phones"] == n_ref and 0 <= r["per"] and np.isfinite(r["ear_nll"]) for r in rows)
    assert summary["per"] == pytest.approx(sum(r["phone_errors"] for r in rows) / (3 * n_ref))
    table = rows_frame([dict(r, round=1) for r in rows])
    num, den = metric_arrays(table, "per")
    assert num.sum() / den.sum() == pytest.approx(summary["per"])
    # the gate on the second ear: the same rows pass against themselves
    run = tmp_path / "run"
    write_jsonl(run / "round_001" / "eval" / "rows.jsonl", [dict(r, sample=0) for r in rows])
    write_baseline(run, tmp_path / "base.json")
    result = run_gate(run, tmp_path / "base.json", GateConfig(metrics=["wer", "per", "ear_nll"], n_boot=200,
                                                              first_step=False))
    assert result.passed and "per +0.0000" in result.message, result.message


def test_the_ear_judges_pairs_from_the_rendered_log_mel_or_the_audio(tmp_path):
    """Pair scorers ``per`` / ``ear_nll``: the ear's own verdict on the renderer's log-mel where there is one, on the
    audio where not; without ``eval.ear`` the scorer refuses with the fix."""
    from types import SimpleNamespace

    from align.pairs import SCORERS
    from eval.scorers import EvalConfig, Scorers

    _toy(n_mels=N_MELS).save(tmp_path / "ear")
    scorers = Scorers(EvalConfig(ear=str(tmp_path / "ear")), "cpu")
    ctx = SimpleNamespace(cfg=SimpleNamespace(eval=SimpleNamespace(ear=str(tmp_path / "ear"))), scorers=scorers)
    items = _synthetic(["the cat sat", "a dog"])
    batch = SimpleNamespace(logmels=[m for m, _ in items], rows=[{"text": t} for _, t in items], wavs=None)
    direct = score_logmel(scorers.ear, [m for m, _ in items], [t for _, t in items])
    assert SCORERS["per"](ctx)(batch) == [s.per for s in direct]
    assert SCORERS["ear_nll"](ctx)(batch) == [s.nll for s in direct]
    wavs = [np.random.default_rng(i).standard_normal(6000).astype(np.float32) * 0.1 for i in range(2)]
    audio = SimpleNamespace(logmels=None, rows=batch.rows, wavs=wavs, sample_rate=16000)
    assert SCORERS["per"](ctx)(audio) == [v["per"] for v in scorers.phones(wavs, 16000, ["the cat sat", "a dog"])]
    with pytest.raises(ValueError, match="eval.ear"):
        SCORERS["per"](SimpleNamespace(cfg=SimpleNamespace(eval=SimpleNamespace(ear=None))))
