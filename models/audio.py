"""Audio I/O: load any WAV/FLAC as float32 mono at one sample rate, resample, save atomically.

Every waveform in the package is a float32 numpy array `[n_samples]` in [-1, 1] at a known
sample rate; this module is the only place that touches files, so bad audio is caught here,
with the file's path and the fix in the message, rather than deep inside a codec or an ASR model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

log = logging.getLogger("speechalign.audio")


class AudioError(ValueError):
    """Bad audio: message names the file and the fix."""


def load_audio(path, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Read an audio file as float32 mono at `sample_rate`.

    Args:
        path: file readable by libsndfile (WAV, FLAC, OGG, ...).
        sample_rate: rate of the returned waveform; the file is resampled if it differs.
        max_seconds: refuse files longer than this (None: no limit).

    Returns:
        wav: float32 `[n_samples]`, multichannel files mixed down by averaging the channels.

    Raises:
        AudioError: missing, unreadable/corrupt, empty, non-finite, or too long.
    """
    path = Path(path)
    _check_rate(sample_rate, "sample_rate")
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found; check the path (manifest paths are "
                         f"relative to the manifest's folder)")
    try:
        # The header alone tells the duration, so an over-long file fails before it is read.
        info = sf.info(str(path))
        if max_seconds is not None and info.frames > max_seconds * info.samplerate:
            raise AudioError(
                f"{path}: {info.frames / info.samplerate:.2f} s is longer than the limit of "
                f"{max_seconds} s; trim the file or raise `data.max_seconds` in the config")
        data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"{path}: cannot read audio ({e}); the file is corrupt or not an audio "
                         f"format libsndfile reads: re-export it as 16-bit PCM WAV") from e

    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio has 0 samples; remove it from the manifest or "
                         f"re-record it")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples; regenerate the file "
                         f"(a float WAV written from a diverged model?)")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(wav, int(file_sr), sample_rate)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling along the last axis.

    Args:
        wav: float `[..., n_samples]` at `orig_sr`.
        orig_sr, target_sr: sample rates in Hz.

    Returns:
        float32 `[..., ceil(n_samples * target_sr / orig_sr)]`; the input itself (as float32)
        when the rates are equal.
    """
    _check_rate(orig_sr, "orig_sr")
    _check_rate(target_sr, "target_sr")
    wav = np.asarray(wav, dtype=np.float32)
    if orig_sr == target_sr:
        return wav
    # The gcd-reduced ratio keeps the polyphase filter short: 22050 -> 16000 is 320/441.
    g = math.gcd(orig_sr, target_sr)
    out = resample_poly(wav, target_sr // g, orig_sr // g, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)


def save_audio(path, wav: np.ndarray, sample_rate: int) -> None:
    """Write a mono waveform as 16-bit PCM WAV, atomically.

    Args:
        path: destination; parent folders are created.
        wav: float `[n_samples]`; values outside [-1, 1] are clipped (16-bit PCM cannot hold them).
        sample_rate: rate in Hz written into the header.

    Raises:
        AudioError: not 1-D, empty, or non-finite.
    """
    path = Path(path)
    _check_rate(sample_rate, "sample_rate")
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"{path}: save_audio takes a mono [n_samples] array, got shape "
                         f"{tuple(wav.shape)}; squeeze the channel axis (e.g. wav[0] for [1, n])")
    if wav.size == 0:
        raise AudioError(f"{path}: refusing to write 0 samples; check the generation step")
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: refusing to write NaN/inf samples; the model output diverged")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder so os.replace is a rename on one filesystem: a reader never
    # sees a half-written WAV, even if the process is killed mid-write.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; audio is meant to be shared and listened to
    os.close(fd)
    try:
        sf.write(tmp, np.clip(wav, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_silent_or_short(wav: np.ndarray, sample_rate: int, min_seconds: float = 0.1,
                       threshold_dbfs: float = -60.0) -> bool:
    """True when `wav` is too short or too quiet for an ASR or speaker model to say anything.

    Evaluation backends use it to return '' / a zero embedding instead of a hallucinated
    transcript (pocketsphinx hears "it" in 1 s of digital silence).

    Args:
        wav: float `[n_samples]`.
        min_seconds: anything shorter counts as degenerate.
        threshold_dbfs: silent when no 20 ms frame has an RMS above this level. -60 dBFS is
            far below speech (loudest frames sit around -10 to -30 dBFS) and above 16-bit
            dither and typical room noise floors.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.size < min_seconds * sample_rate:
        return True
    frame = max(1, int(0.02 * sample_rate))
    n = wav.size // frame * frame
    frames = wav[:n].reshape(-1, frame) if n else wav[None, :]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    return bool(rms.max() < 10.0 ** (threshold_dbfs / 20.0))


def check_mono(wav, what: str) -> np.ndarray:
    """`wav` as float32 `[n_samples]`; ValueError naming `what` if it is not 1-D or not finite."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"{what} has shape {tuple(wav.shape)}; expected a mono [n_samples] "
                         f"array (squeeze or average the channel axis first)")
    if not np.isfinite(wav).all():
        raise ValueError(f"{what} contains NaN or inf samples; the model that generated it "
                         f"diverged: fix it rather than scoring its output")
    return wav


def _check_rate(sr, what: str) -> None:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"{what} must be a positive integer number of Hz, got {sr!r}")
