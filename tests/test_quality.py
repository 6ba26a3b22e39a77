"""DNSMOS (speechmos's shipped ONNX models, offline) and UTMOS (TorchScript) quality scores."""
import json
import logging

import numpy as np
import pytest
import torch

from models.audio import load_audio
from eval.quality import UTMOS, build_quality


@pytest.fixture(scope="module")
def real_wavs(real_speech_dir):
    rows = [json.loads(line) for line in (real_speech_dir / "manifest.jsonl").read_text().splitlines()]
    return [load_audio(real_speech_dir / r["audio"], 16000) for r in rows]


def test_dnsmos_p808_on_real_speech_beats_noise(real_wavs, caplog):
    q = build_quality("dnsmos_p808")
    assert q.keys == ("dnsmos",)
    scores = [s["dnsmos"] for s in q.score(real_wavs)]
    assert all(1.0 <= s <= 5.0 for s in scores)
    # the same clips buried in white noise at ~0 dB SNR must score lower, clip by clip
    rng = np.random.default_rng(0)
    noisy = [np.clip(w + np.std(w) * rng.standard_normal(len(w)), -1, 1).astype(np.float32) for w in real_wavs[:4]]
    noisy_scores = [s["dnsmos"] for s in q.score(noisy)]
    assert all(n < c for n, c in zip(noisy_scores, scores[:4]))
    with caplog.at_level(logging.WARNING, logger="speechalign"):
        assert np.isnan(q.score([np.zeros(100, np.float32)])[0]["dnsmos"])  # no endless tiling of nothing
    assert "scored NaN" in caplog.text


def test_dnsmos_matches_the_speechmos_reference(real_wavs):
    from speechmos import dnsmos

    q = build_quality("dnsmos")
    ours = q.score([real_wavs[6]])[0]  # 1.8 s: repeated to 9 s before scoring
    ref = dnsmos.run(np.clip(real_wavs[6], -1, 1), 16000)
    for key, ref_key in (("dnsmos", "p808_mos"), ("dnsmos_sig", "sig_mos"), ("dnsmos_bak", "bak_mos"),
                         ("dnsmos_ovrl", "ovrl_mos")):
        assert ours[key] == pytest.approx(float(ref[ref_key]), abs=1e-4)


def test_utmos_torchscript_checkpoint(tmp_path):
    class Loudness(torch.nn.Module):  # stands in for an exported UTMOS: wav [1, T] -> [1]
        def forward(self, wav):
            return 1.0 + 4.0 * wav.abs().mean(dim=1).clamp(max=1.0)

    path = tmp_path / "utmos.pt"
    torch.jit.script(Loudness()).save(str(path))
    q = build_quality("utmos", checkpoint=str(path))
    out = q.score([np.full(16000, 0.5, np.float32), np.zeros(16000, np.float32)])
    assert out[0]["utmos"] == pytest.approx(3.0) and np.isnan(out[1]["utmos"])
    with pytest.raises(ValueError, match="TorchScript"):
        UTMOS(str(tmp_path / "missing.pt"))
    assert build_quality("none") is None
    with pytest.raises(ValueError, match="dnsmos_p808"):
        build_quality("pesq")
