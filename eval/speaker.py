"""Speaker encoders and speaker similarity.

An encoder is any object with `name`, `sample_rate`, `embed(wavs) -> [B, D]` (L2-normalised rows)
and `similarity(a, b) -> [B]`. Degenerate audio (silence, < 0.1 s) embeds to a zero row, so its
similarity to anything is 0.0: the worst score, which is what a silent generation deserves.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from align.audio import check_mono, is_silent_or_short

log = logging.getLogger("speechalign.eval.speaker")


class ResemblyzerSpeaker:
    """Resemblyzer's GE2E d-vector encoder (3-layer LSTM on 40-band mels, 256-d embeddings).

    The weights ship inside the resemblyzer package, so it runs offline. Embeddings are
    non-negative (ReLU before the norm), so cosines lie in [0, 1]; different speakers still
    score around 0.5 to 0.8, so compare means, not single pairs against a fixed threshold.
    """

    name = "resemblyzer"
    sample_rate = 16000

    def __init__(self, device: str = "cpu", trim_silence: bool = True):
        """
        Args:
            device: torch device for the LSTM.
            trim_silence: apply resemblyzer's `preprocess_wav` (volume normalisation and
                webrtcvad trimming of pauses longer than ~0.2 s), as the encoder was trained on.
                When the VAD finds no speech the untrimmed, volume-normalised audio is used.
        """
        # Imported here: resemblyzer pulls in librosa and webrtcvad, which importing
        # eval.speaker for its registry should not pay for.
        with warnings.catch_warnings():
            # resemblyzer imports scipy.ndimage.morphology, deprecated in SciPy 1.x; not ours.
            warnings.simplefilter("ignore", DeprecationWarning)
            from resemblyzer import VoiceEncoder, audio, hparams

        self._audio = audio
        self._target_dbfs = hparams.audio_norm_target_dBFS  # -30, what the encoder was trained at
        self.trim_silence = trim_silence
        self._encoder = VoiceEncoder(device=device, verbose=False).eval()
        self.dim = self._encoder.linear.out_features
        self.max_batch = 256  # windows per LSTM call: [256, 160, 40] floats is 6.5 MB

    def _preprocess(self, wav: np.ndarray, index: int) -> np.ndarray:
        # Mirrors resemblyzer.preprocess_wav (which takes no fallback) for 16 kHz input.
        wav = self._audio.normalize_volume(np.clip(wav, -1.0, 1.0), self._target_dbfs,
                                             increase_only=True)
        if not self.trim_silence:
            return wav
        # The VAD packs samples to int16, so the boosted signal must stay inside [-1, 1].
        trimmed = self._audio.trim_long_silences(np.clip(wav, -1.0, 1.0))
        if trimmed.size < 0.1 * self.sample_rate:
            log.debug("resemblyzer: VAD kept %d samples of waveform %d; using it untrimmed",
                      trimmed.size, index)
            return wav
        return trimmed

    def embed(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed each waveform.

        Args:
            wavs: B float32 `[n_samples]` arrays, mono at 16 kHz.

        Returns:
            float32 `[B, D]` (D = 256), rows L2-normalised; a zero row (with one warning per
            call) for silence or audio shorter than 0.1 s.
        """
        out = np.zeros((len(wavs), self.dim), dtype=np.float32)
        degenerate, mels, owner = [], [], []
        for i, wav in enumerate(wavs):
            wav = check_mono(wav, f"waveform {i}")
            if is_silent_or_short(wav, self.sample_rate):
                degenerate.append(i)
                continue
            for mel in self._partials(self._preprocess(wav, i)):
                mels.append(mel)
                owner.append(i)
        if mels:
            partial = self._forward(np.stack(mels))
            owner = np.asarray(owner)
            for i in np.unique(owner):
                # As VoiceEncoder.embed_utterance: the utterance embedding is the normalised
                # mean of its partial (1.6 s window) embeddings.
                e = partial[owner == i].mean(axis=0)
                norm = float(np.linalg.norm(e))
                if norm > 0.0 and np.isfinite(norm):
                    out[i] = e / norm
                else:
                    # Every partial can be ReLU-zero on odd inputs; 0/0 would give NaN.
                    degenerate.append(int(i))
        if degenerate:
            log.warning("resemblyzer: %d of %d waveforms are silent, shorter than 0.1 s or "
                        "unembeddable (indices %s); given zero embeddings (similarity 0.0)",
                        len(degenerate), len(wavs), sorted(degenerate)[:20])
        return out

    def _partials(self, wav: np.ndarray) -> list[np.ndarray]:
        """Mel windows `[160, 40]` of one preprocessed waveform, as VoiceEncoder.embed_utterance
        cuts them (1.6 s windows, 1.3 per second, last one kept if >= 75 % covered)."""
        wav_slices, mel_slices = self._encoder.compute_partial_slices(len(wav), 1.3, 0.75)
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = self._audio.wav_to_mel_spectrogram(wav.astype(np.float32))
        return [mel[s] for s in mel_slices]

    @torch.no_grad()
    def _forward(self, mels: np.ndarray) -> np.ndarray:
        """mels: float32 `[N, 160, 40]` -> partial embeddings float32 `[N, D]`."""
        # All windows have the same length, so the whole evaluation batch goes through the LSTM
        # at once: 160 sequential steps in all instead of 160 per utterance, as resemblyzer's
        # own embed_utterance does. Each step is a tiny matmul followed by a thread barrier, so
        # on CPU it also runs single-threaded: on 2 cores with one busy, 2 threads took 3.6 s
        # for [60, 160, 40] windows and 1 thread 0.39 s; a big matmul gained under 2x.
        threads = torch.get_num_threads()
        on_cpu = self._encoder.device.type == "cpu"
        if on_cpu:
            torch.set_num_threads(1)
        try:
            out = []
            for start in range(0, len(mels), self.max_batch):
                x = torch.from_numpy(mels[start:start + self.max_batch]).to(self._encoder.device)
                out.append(self._encoder(x).float().cpu().numpy())
        finally:
            if on_cpu:
                torch.set_num_threads(threads)
        return np.concatenate(out).astype(np.float32)

    def similarity(self, a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
        """Cosine similarity of a[i] and b[i].

        Returns:
            float32 `[B]`; 0.0 where either side is degenerate.
        """
        if len(a) != len(b):
            raise ValueError(f"similarity got {len(a)} and {len(b)} waveforms; pass pairs of "
                             f"equal-length lists (a[i] is compared with b[i])")
        return np.sum(self.embed(a) * self.embed(b), axis=1).astype(np.float32)


SPEAKER_ENCODERS = {"resemblyzer": ResemblyzerSpeaker}


def build_speaker_encoder(name: str = "resemblyzer", **kwargs):
    """Build a speaker encoder by name; kwargs go to its constructor."""
    if name not in SPEAKER_ENCODERS:
        raise ValueError(f"unknown speaker encoder {name!r}; known: {sorted(SPEAKER_ENCODERS)}")
    return SPEAKER_ENCODERS[name](**kwargs)
