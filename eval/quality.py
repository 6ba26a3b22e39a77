"""Speech quality (a MOS proxy) per utterance: DNSMOS from the speechmos package, UTMOS from a checkpoint.

A quality model is any object with `name`, `sample_rate`, `keys` and `score(wavs) -> list[dict]`
(one dict of named scores per waveform; NaN for audio it cannot score).

* ``dnsmos_p808`` (the evaluation default): DNSMOS P.808, one overall MOS from a small model on a
  log-mel spectrogram; measured 0.10 s of CPU time per utterance (2.6 s clips) on this machine.
* ``dnsmos``: P.808 plus DNSMOS P.835 SIG / BAK / OVRL from the waveform model; measured 2.1 s of
  CPU time per utterance, so it is opt-in (the paper config, on GPU machines, turns it on).
* ``utmos``: a UTMOS predictor exported to TorchScript (``wav [B, T] at 16 kHz -> MOS [B]``), only
  when a checkpoint path is given; nothing is downloaded.

Both DNSMOS models are the ONNX files the speechmos package ships, so they run offline. DNSMOS
scores 9 s windows at a 1 s hop; a shorter clip is repeated (doubled until >= 9 s) first, as
the reference implementation does, so the numbers equal ``speechmos.dnsmos.run``'s.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from models.audio import check_mono, is_silent_or_short

log = logging.getLogger("speechalign.eval.quality")

DNSMOS_WINDOW_S = 9.01  # the P.835 model's fixed input length (speechmos.dnsmos.INPUT_LENGTH)


class DNSMOS:
    """Microsoft's DNSMOS (Deep Noise Suppression MOS), non-intrusive: needs no reference audio.

    Scores: ``dnsmos`` (DNSMOS P.808 overall MOS, 1..5) always; with ``p835=True`` also
    ``dnsmos_sig`` (speech signal), ``dnsmos_bak`` (background) and ``dnsmos_ovrl`` (overall) of P.835.
    """

    sample_rate = 16000

    def __init__(self, p835: bool = False, threads: int = 1):
        """
        Args:
            p835: also run the P.835 waveform model (SIG/BAK/OVRL), ~15x the cost of P.808.
            threads: onnxruntime intra-op threads; 1 on shared CPUs, more on an idle machine.
        """
        import onnxruntime as ort
        import speechmos.dnsmos as sm

        self.p835 = p835
        self.name = "dnsmos" if p835 else "dnsmos_p808"
        self.keys = ("dnsmos", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl") if p835 else ("dnsmos",)
        models = Path(sm.__file__).parent / "dnsmos_models"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self._p808 = ort.InferenceSession(str(models / "model_v8.onnx"), opts, providers=providers)
        self._p835 = (ort.InferenceSession(str(models / "sig_bak_ovr.onnx"), opts, providers=providers)
                      if p835 else None)
        # speechmos's helpers (its melspectrogram and polynomial calibration), reused so the numbers
        # match the package's own dnsmos.run; the class is built without its ONNX sessions.
        self._ref = sm.DNSMOS.__new__(sm.DNSMOS)

    def _score_one(self, wav: np.ndarray) -> dict:
        fs = self.sample_rate
        n = int(DNSMOS_WINDOW_S * fs)
        audio = np.clip(wav, -1.0, 1.0).astype(np.float32)
        while len(audio) < n:  # doubling, as Microsoft's dnsmos_local.py: same windows, same numbers
            audio = np.concatenate([audio, audio])
        hops = int(np.floor(len(audio) / fs) - DNSMOS_WINDOW_S) + 1  # 1 s hop, as speechmos
        out = {k: [] for k in self.keys}
        for h in range(hops):
            seg = audio[h * fs: h * fs + n]
            if len(seg) < n:
                continue
            mel = self._ref.audio_melspec(audio=seg[:-160]).astype(np.float32)[None]
            out["dnsmos"].append(float(self._p808.run(None, {"input_1": mel})[0][0][0]))
            if self._p835 is not None:
                raw = self._p835.run(None, {"input_1": seg[None]})[0][0]
                sig, bak, ovrl = self._ref.get_polyfit_val(*raw, False)
                out["dnsmos_sig"].append(float(sig))
                out["dnsmos_bak"].append(float(bak))
                out["dnsmos_ovrl"].append(float(ovrl))
        return {k: float(np.mean(v)) for k, v in out.items()}

    def score(self, wavs: list[np.ndarray]) -> list[dict]:
        """wavs: B float32 `[n_samples]` mono at 16 kHz -> B dicts {key: MOS}; NaN for silence or < 0.1 s
        (DNSMOS of nothing is meaningless, and tiling an empty clip never ends)."""
        out = []
        degenerate = []
        for i, w in enumerate(wavs):
            w = check_mono(w, f"waveform {i}")
            if is_silent_or_short(w, self.sample_rate):
                degenerate.append(i)
                out.append({k: float("nan") for k in self.keys})
            else:
                out.append(self._score_one(w))
        if degenerate:
            log.warning("%s: %d of %d waveforms are silent or shorter than 0.1 s (indices %s); scored NaN",
                        self.name, len(degenerate), len(wavs), degenerate[:20])
        return out


class UTMOS:
    """UTMOS (UTokyo-SaruLab MOS predictor) from a TorchScript file; scores key ``utmos`` (1..5).

    Export once on a machine with the model, e.g. with tarepan/SpeechMOS's ``utmos22_strong``::

        predictor = torch.hub.load("tarepan/SpeechMOS:v1.2.0", "utmos22_strong")
        torch.jit.trace(lambda w: predictor(w, 16000), torch.randn(1, 16000)).save("utmos22.pt")

    Any TorchScript module mapping ``wav: FloatTensor [1, T] at 16 kHz -> FloatTensor [1]`` works.
    """

    name = "utmos"
    sample_rate = 16000
    keys = ("utmos",)

    def __init__(self, checkpoint: str | None = None, device: str = "cpu"):
        if not checkpoint or not Path(checkpoint).is_file():
            raise ValueError(f"eval.utmos_checkpoint={checkpoint}: UTMOS needs a local TorchScript file "
                             "(see eval/quality.py for the one-line export); nothing is downloaded")
        self.model = torch.jit.load(checkpoint, map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def score(self, wavs: list[np.ndarray]) -> list[dict]:
        """wavs: B float32 `[n_samples]` mono 16 kHz -> B dicts {'utmos': MOS}; NaN for silence or < 0.1 s."""
        out = []
        for i, w in enumerate(wavs):
            w = check_mono(w, f"waveform {i}")
            if is_silent_or_short(w, self.sample_rate):
                out.append({"utmos": float("nan")})
                continue
            x = torch.from_numpy(np.asarray(w, dtype=np.float32))[None].to(self.device)
            out.append({"utmos": float(self.model(x).reshape(-1)[0])})
        return out


QUALITY_MODELS = {"dnsmos_p808": lambda **kw: DNSMOS(p835=False, **kw),
                  "dnsmos": lambda **kw: DNSMOS(p835=True, **kw),
                  "utmos": UTMOS}


def build_quality(name: str, **kwargs):
    """Build a quality model by name (dnsmos_p808, dnsmos, utmos); 'none' gives None."""
    if name == "none":
        return None
    if name not in QUALITY_MODELS:
        raise ValueError(f"unknown quality model {name!r}; known: none, {', '.join(sorted(QUALITY_MODELS))}")
    return QUALITY_MODELS[name](**kwargs)
