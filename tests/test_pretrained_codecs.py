"""Pretrained codecs (speechtokenizer, encodec) through the loading path a user's checkpoint takes.

Weights are random (no download here); each test writes the files a release ships, loads them
through the config the user would write, and checks shapes, rates and the save/load round trip.
"""
import json

import numpy as np
import pytest
import torch

from align.config import load_config
from models.codec import (
    ENCODEC_24KHZ_FILE,
    CodecConfig,
    EncodecCodec,
    SpeechTokenizerCodec,
    build_codec,
    codec_sample_rate,
    load_codec,
)

# The release's config.json (fnlp/SpeechTokenizer speechtokenizer_hubert_avg) with the widths cut
# down: same keys, strides (so 50 Hz at 16 kHz), 8 levels of 1024 codes.
TINY_ST = {"n_filters": 4, "dimension": 16, "semantic_dimension": 8, "strides": [8, 5, 4, 2], "lstm_layers": 1,
           "bidirectional": True, "dilation_base": 2, "residual_kernel_size": 3, "n_residual_layers": 1,
           "activation": "ELU", "sample_rate": 16000, "codebook_size": 1024, "n_q": 8}


@pytest.fixture
def speechtokenizer_release(tmp_path):
    """A folder laid out like the SpeechTokenizer release: config.json + a torch .pt state dict."""
    pytest.importorskip("speechtokenizer")
    from speechtokenizer import SpeechTokenizer

    torch.manual_seed(0)
    (tmp_path / "config.json").write_text(json.dumps(TINY_ST))
    torch.save(SpeechTokenizer(TINY_ST).state_dict(), tmp_path / "SpeechTokenizer.pt")
    return tmp_path


def _wav(seconds, sr):
    t = np.arange(int(seconds * sr)) / sr
    return (0.1 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_speechtokenizer_release_files_load_and_round_trip(speechtokenizer_release, tmp_path):
    rel = speechtokenizer_release
    cfg = load_config(None, ["codec.backend=speechtokenizer", f"codec.config_path={rel / 'config.json'}",
                             f"codec.checkpoint={rel / 'SpeechTokenizer.pt'}"]).codec
    assert codec_sample_rate(cfg) == 16000
    codec = build_codec(cfg)
    assert isinstance(codec, SpeechTokenizerCodec)
    assert (codec.sample_rate, codec.frame_rate, codec.n_q, codec.codebook_size) == (16000, 50.0, 8, 1024)
    # the weights are the file's, not a fresh random init
    ref = torch.load(rel / "SpeechTokenizer.pt", weights_only=True)
    assert all(torch.equal(v, ref[k]) for k, v in codec.model.state_dict().items())
    wav = _wav(1.0, 16000)
    codes = codec.encode(wav)
    assert codes.dtype == torch.long and codes.shape == (8, 50)
    assert 0 <= int(codes.min()) and int(codes.max()) < 1024
    out = codec.decode(codes)
    assert out.dtype == np.float32 and out.shape == (16000,)
    assert codec.decode(codes[:1]).shape == (16000,)  # RVQ-1 alone (semantic tokens) decodes too
    codec.save(tmp_path / "saved")
    again = load_codec(tmp_path / "saved")
    assert again.identity == codec.identity and torch.equal(again.encode(wav), codes)
    with pytest.raises(ValueError, match="out of range"):
        codec.decode(torch.full((8, 4), 1024))


def test_speechtokenizer_missing_files_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs codec.config_path"):
        CodecConfig(backend="speechtokenizer")
    with pytest.raises(ValueError, match="config.json shipped"):
        build_codec(CodecConfig(backend="speechtokenizer", config_path=str(tmp_path / "nope.json")))
    (tmp_path / "config.json").write_text(json.dumps({"n_q": 8}))
    with pytest.raises(ValueError, match="not a SpeechTokenizer config"):
        build_codec(CodecConfig(backend="speechtokenizer", config_path=str(tmp_path / "config.json")))
    (tmp_path / "config.json").write_text(json.dumps(TINY_ST))
    with pytest.raises(ValueError, match="does not exist"):
        build_codec(CodecConfig(backend="speechtokenizer", config_path=str(tmp_path / "config.json"),
                                checkpoint=str(tmp_path / "missing.pt")))


def test_encodec_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """codec.checkpoint=hub reads encodec's own cache file and never downloads."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="torch hub cache"):
        EncodecCodec(CodecConfig(backend="encodec", checkpoint="hub"))
    from encodec import EncodecModel

    torch.manual_seed(1)
    state = EncodecModel.encodec_model_24khz(pretrained=False).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / ENCODEC_24KHZ_FILE)
    codec = EncodecCodec(CodecConfig(backend="encodec", checkpoint="hub", bandwidth=3.0))
    assert all(torch.equal(v, state[k]) for k, v in codec.model.state_dict().items())
    assert (codec.sample_rate, codec.frame_rate, codec.n_q) == (24000, 75, 4)  # 3 kbps = 4 levels
    wav = _wav(0.5, 24000)
    codes = codec.encode(wav)
    assert codes.shape == (4, 38) and codec.decode(codes).shape[0] >= len(wav)
    codec.save(tmp_path / "saved")
    assert torch.equal(load_codec(tmp_path / "saved").encode(wav), codes)
