"""Codecs: shapes, rates, save/load identity, and the embedded codec's intelligibility bar."""
import numpy as np
import pytest
import torch

from models.audio import load_audio
from models.data import load_manifest
from models.codec import CodecConfig, EncodecCodec, MelRVQCodec, load_codec


@pytest.fixture(scope="module")
def real_wavs(real_speech_dir):
    utts, _ = load_manifest(real_speech_dir / "manifest.jsonl")
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
    codec = EncodecCodec(CodecConfig(backend="encodec", bandwidth=1.5, allow_random_weights=True))
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


def test_mel_rvq_band_levels_partition_the_mel_axis(real_wavs, tmp_path):
    from models.codec import level_bands

    cfg = CodecConfig(n_q=6, full_levels=2, codebook_size=16, n_mels=40, fit_max_frames=3000)
    assert level_bands(cfg) == [(0, 40), (0, 40), (0, 10), (10, 20), (20, 30), (30, 40)]
    codec = MelRVQCodec.fit(cfg, real_wavs)
    for q, (lo, hi) in enumerate(codec.bands):  # a band level's entries are zero outside its band
        book = codec.codebooks[q]
        assert book[:, lo:hi].abs().sum() > 0 and book[:, :lo].abs().sum() == 0 and book[:, hi:].abs().sum() == 0
    feats = codec.features(real_wavs[1])
    codes = codec.quantize(feats)
    errs = [float(((codec.dequantize(codes[:q]) - feats) ** 2).mean()) for q in range(1, 7)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    codec.save(tmp_path / "c")
    assert torch.equal(load_codec(tmp_path / "c").encode(real_wavs[1]), codec.encode(real_wavs[1]))
    # codebooks and a config that disagree on the bands are refused, not silently misread
    with pytest.raises(ValueError, match="full_levels"):
        MelRVQCodec(CodecConfig(n_q=6, full_levels=1, codebook_size=16, n_mels=40), codec.codebooks)
    with pytest.raises(ValueError, match="band codebooks"):
        CodecConfig(n_q=50, full_levels=4, n_mels=40)


def test_mel_consistent_griffin_lim_holds_the_decoded_mel(real_wavs):
    """After the warm-up the decoder only holds the mel projection; the audio it makes must then match
    the decoded mel better than plain Griffin-Lim towards the smooth inverted magnitudes does."""
    books = torch.zeros(1, 2, 128)
    wav = real_wavs[0][:16000 * 2]
    errors = {}
    for warmup in (16, 64):  # 64 = griffin_lim_iters: plain Griffin-Lim
        codec = MelRVQCodec(CodecConfig(n_q=1, codebook_size=2, n_mels=128, griffin_lim_warmup=warmup), books)
        target = codec.features(wav)
        out = codec._synthesise(torch.exp(target).T)
        again = codec.features(out)[: len(target)]
        speech = target > target.max() - 6.0  # compare where there is signal, not the -11.5 floor
        errors[warmup] = float(((again - target)[speech] ** 2).mean())
    assert errors[16] < 0.8 * errors[64], errors


def test_pretrained_codec_without_checkpoint_refuses_random_weights():
    """codec.checkpoint: null used to run a whole experiment on a random-weight EnCodec after a warning."""
    with pytest.raises(ValueError, match="RANDOM weights.*allow_random_weights=true"):
        EncodecCodec(CodecConfig(backend="encodec", bandwidth=1.5))
    assert EncodecCodec(CodecConfig(backend="encodec", bandwidth=1.5, allow_random_weights=True)).n_q == 2
