"""The pause detector: does an utterance stop for a long silence between its words? Exact, fast, no ASR.

The positive control (configs/positive_control.yaml) plants this defect in 30% of the training recordings
(``corpus.defect: pause``: a sentence spoken in two parts with 0.5-0.8 s of low noise between them), so a base
trained on them pauses in some of its own samples, and preferences must remove it. The detector reads a frame
energy envelope (dB), from a waveform or from a log-mel (the phone renderer's output, before Griffin-Lim):

    energy = frame_energy_db(wav, sample_rate)        # [T] dB, 10 ms frames
    energy = logmel_energy_db(logmel)                  # [T] dB, one per codec frame
    pause = longest_pause(energy, frame_rate)          # seconds of the longest silence inside the speech

A frame is silent when it is more than ``rel_db`` below the utterance's speech level (the 90th percentile of its
frames: loud enough to be speech, robust to one click); a pause is a run of silent frames strictly between the first
and the last loud frame, so the silence before and after an utterance never counts. flite's own speech has no
internal silence near 0.25 s (stop closures are < 0.15 s), so ``min_pause`` separates planted pauses from speech
with room on both sides; ``benchmarks/results/positive_control.md`` measures it on the recordings (planted vs clean)
and on the codec's and the renderer's versions of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A pause shorter than this is speech (closures, breaths between words); the planted ones are >= 0.5 s.
MIN_PAUSE_S = 0.25
# Silence threshold below the utterance's speech level (dB): speech frames sit within ~30 dB of it, the planted
# pause's noise ~50 dB below.
REL_DB = 35.0


@dataclass
class DefectConfig:
    """``eval.defect``: the pause detector's settings (a metric of every evaluation, a judge of pairs)."""

    min_pause: float = field(default=MIN_PAUSE_S, metadata={
        "help": "seconds of internal silence that count as a pause (the defect)"})
    rel_db: float = field(default=REL_DB, metadata={
        "help": "a frame is silent when this many dB below the utterance's speech level (its 90th percentile)"})

    def __post_init__(self):
        if not 0 < self.min_pause < 10 or not 5 <= self.rel_db <= 80:
            raise ValueError(f"eval.defect: min_pause={self.min_pause} must be in (0, 10) s and rel_db={self.rel_db} "
                             "in [5, 80] dB")


def frame_energy_db(wav: np.ndarray, sample_rate: int, frame_s: float = 0.01) -> np.ndarray:
    """wav: float [n] -> mean power per ``frame_s`` frame in dB: float64 [n // frame] (empty for a short wav)."""
    frame = max(1, int(round(frame_s * sample_rate)))
    n = len(wav) // frame
    if n == 0:
        return np.zeros(0)
    power = (np.asarray(wav[: n * frame], dtype=np.float64).reshape(n, frame) ** 2).mean(axis=1)
    return 10 * np.log10(power + 1e-12)


def logmel_energy_db(logmel) -> np.ndarray:
    """Log-mel magnitudes [T, n_mels] (natural log, as ``MelRVQCodec.features``) -> energy per frame in dB [T]."""
    x = np.asarray(logmel, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"logmel must be [T, n_mels], got shape {x.shape}")
    if len(x) == 0:
        return np.zeros(0)
    m = x.max(axis=1, keepdims=True)
    # log(sum exp(2 x)) stably: the power summed over the bands
    return 10 / np.log(10) * (2 * m[:, 0] + np.log(np.exp(2 * (x - m)).sum(axis=1)))


def longest_pause(energy_db: np.ndarray, frame_rate: float, rel_db: float = REL_DB) -> float:
    """Seconds of the longest run of silent frames strictly inside the speech (see the module docstring); 0 when
    the utterance has no internal silence or no speech at all. energy_db: float [T]."""
    e = np.asarray(energy_db, dtype=np.float64)
    if len(e) < 3:
        return 0.0
    level = np.percentile(e, 90)
    loud = e > level - rel_db
    idx = np.flatnonzero(loud)
    if len(idx) < 2:
        return 0.0
    inner = ~loud[idx[0]: idx[-1] + 1]
    if not inner.any():
        return 0.0
    # lengths of the runs of True in `inner`
    padded = np.concatenate([[0], inner.astype(np.int8), [0]])
    starts = np.flatnonzero(np.diff(padded) == 1)
    ends = np.flatnonzero(np.diff(padded) == -1)
    return float((ends - starts).max() / frame_rate)


def pause_of_wav(wav: np.ndarray, sample_rate: int, cfg: DefectConfig | None = None) -> float:
    """The longest internal pause of a waveform, in seconds."""
    cfg = cfg or DefectConfig()
    return longest_pause(frame_energy_db(wav, sample_rate), 100.0, cfg.rel_db)


def pause_of_logmel(logmel, frame_rate: float, cfg: DefectConfig | None = None) -> float:
    """The longest internal pause of a log-mel [T, n_mels] at ``frame_rate`` frames per second, in seconds. The
    mel's analysis window reaches into a pause from both sides, so this front reads a pause about one window
    shorter than the audio front (0.064 s at the embedded codec's n_fft 1024 and 16 kHz), to within a frame
    (tests/test_positive_control.py); the planted pauses (>= 0.5 s) clear ``min_pause`` either way."""
    cfg = cfg or DefectConfig()
    return longest_pause(logmel_energy_db(logmel), frame_rate, cfg.rel_db)


def has_pause(seconds: float, cfg: DefectConfig | None = None) -> bool:
    """Whether a longest-pause length is the defect."""
    return seconds >= (cfg or DefectConfig()).min_pause
