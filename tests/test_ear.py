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
    with pytest.raises(ValueError, match="unknown ear key"):
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
