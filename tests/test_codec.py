"""Codecs: shapes, rates, save/load identity, and the embedded codec's intelligibility bar."""
import numpy as np
import pytest
import torch

from align.audio import load_audio
from align.data import load_manifest
from models.codec import CodecConfig, EncodecCodec, MelRVQCodec, load_codec


@pytest.fixture(scope="module")
def real_wavs():
    from .conftest import REAL_SPEECH

    if not (REAL_SPEECH / "manifest.jsonl").exists():
        pytest.skip("real recordings missing")
    utts, _ = load_manifest(REAL_SPEECH / "manifest.jsonl")
    return [load_audio(u.audio, 16000) for u in utts]


def test_mel_rvq_shapes_and_save_load(real_wavs, tmp_path):
    cfg = CodecConfig(n_q=3, codebook_size=32, fit_max_frames=4000)
    codec = MelRVQCodec.fit(cfg, real_wavs)
    wav = real_wavs[0]
    codes = codec.encode(wav)
    assert codes.dtype == torch.long and codes.shape == (3, len(wav) // cfg.hop_length + 1)
    assert codes.min() >= 0 and codes.max() < 32
    assert codec.frame_rate == 16000 / 256
    out = codec.decode(codes)
    assert out.dtype == np.float32 and abs(len(out) - len(wav)) <= cfg.hop_length
    # decoding is a function of the codes: the same audio whatever the global RNG, which it leaves alone
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert np.array_equal(codec.decode(codes), out) and torch.equal(torch.get_rng_state(), state)
    codec.save(tmp_path / "c")
    again = load_codec(tmp_path / "c")
    assert again.identity == codec.identity and torch.equal(again.encode(wav), codes)
    # more levels = smaller reconstruction error in the feature domain
    feats = codec.features(wav)
    errs = [float(((codec.dequantize(codes[:q]) - feats) ** 2).mean()) for q in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="out of range"):
        codec.decode(torch.full((3, 4), 99))


def test_encodec_random_init_round_trip(tmp_path):
    codec = EncodecCodec(CodecConfig(backend="encodec", bandwidth=1.5))
    assert codec.sample_rate == 24000 and codec.frame_rate == 75 and codec.n_q == 2 and codec.codebook_size == 1024
    wav = (0.1 * np.sin(np.linspace(0, 400, 24000))).astype(np.float32)
    codes = codec.encode(wav)
    assert codes.shape == (2, 75)
    out = codec.decode(codes)
    assert out.shape == (24000,)
    # the saved model reloads through the same path a user's local checkpoint takes
    codec.save(tmp_path / "enc")
    again = load_codec(tmp_path / "enc")
    assert again.identity == codec.identity and torch.equal(again.encode(wav), codes)


def test_encodec_missing_checkpoint_says_so():
    with pytest.raises(ValueError, match="does not exist"):
        EncodecCodec(CodecConfig(backend="encodec", checkpoint="/nonexistent/encodec.th"))


def test_mel_rvq_decodes_a_too_short_output_as_silence():
    codec = MelRVQCodec(CodecConfig(n_q=2, codebook_size=8), torch.randn(2, 8, 80))
    for t in (1, 2, 3):
        out = codec.decode(torch.zeros(2, t, dtype=torch.long))
        assert out.shape == (t * 256,) and not out.any()
    assert codec.decode(torch.zeros(2, 0, dtype=torch.long)).shape == (0,)
    assert len(codec.decode(torch.zeros(2, 10, dtype=torch.long))) > 0
