"""Speaker encoders and speaker similarity.

An encoder is any object with `name`, `sample_rate`, `embed(wavs) -> [B, D]` (L2-normalised rows)
and `similarity(a, b) -> [B]`. Degenerate audio (silence, < 0.1 s) embeds to a zero row, so its
similarity to anything is 0.0: the worst score, which is what a silent generation deserves.

Encoders: `resemblyzer` (embedded GE2E d-vectors, the offline default), `ecapa` (speechbrain's
ECAPA-TDNN, e.g. speechbrain/spkrec-ecapa-voxceleb, from a local folder) and `wavlm` (transformers'
WavLMForXVector, e.g. microsoft/wavlm-base-plus-sv, the SIM model of VALL-E-style papers). Neither
of the last two is downloaded unless `allow_download=True`.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from models.audio import check_mono, is_silent_or_short

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


def _embed_rows(wavs: list[np.ndarray], sample_rate: int, dim: int, batch_size: int, forward, name: str) -> np.ndarray:
    """Shared by the neural encoders: skip degenerate audio, batch the rest through
    `forward(list of [n_samples] arrays) -> FloatTensor [b, D]`, L2-normalise.

    batch_size 1 (the encoders' default) makes each embedding a function of its own audio; in a
    padded batch the zeros leak into convolutions and normalisation (measured on a tiny ECAPA:
    cosine 0.98 between one utterance embedded alone and padded), which is worth it on a GPU only.

    Returns float32 `[B, D]`; zero rows for silence, audio under 0.1 s or a zero embedding.
    """
    out = np.zeros((len(wavs), dim), dtype=np.float32)
    wavs = [check_mono(w, f"waveform {i}") for i, w in enumerate(wavs)]
    degenerate = [i for i, w in enumerate(wavs) if is_silent_or_short(w, sample_rate)]
    todo = [i for i in range(len(wavs)) if i not in set(degenerate)]
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        emb = forward([wavs[i] for i in idx]).float().cpu().numpy()
        norms = np.linalg.norm(emb, axis=1)
        for i, e, n in zip(idx, emb, norms):
            if n > 0 and np.isfinite(n):
                out[i] = e / n
            else:
                degenerate.append(i)
    if degenerate:
        log.warning("%s: %d of %d waveforms are silent, shorter than 0.1 s or unembeddable (indices %s); given "
                    "zero embeddings (similarity 0.0)", name, len(degenerate), len(wavs), sorted(degenerate)[:20])
    return out


def _pad(wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """B arrays -> (FloatTensor [B, T_max] zero-padded, lengths LongTensor [B])."""
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.zeros(len(wavs), int(lengths.max()))
    for i, w in enumerate(wavs):
        batch[i, :len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return batch, lengths


def _cosine_pairs(encoder, a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"similarity got {len(a)} and {len(b)} waveforms; pass pairs of "
                         f"equal-length lists (a[i] is compared with b[i])")
    return np.sum(encoder.embed(a) * encoder.embed(b), axis=1).astype(np.float32)


def _not_local(kind: str, model: str, key: str) -> ValueError:
    return ValueError(
        f"{kind} model {model!r} is not a local folder (or not in the cache) and downloads are off: on a machine "
        f"with network run `huggingface-cli download {model} --local-dir DIR`, copy DIR here and set "
        f"eval.{key}=DIR")


class ECAPASpeaker:
    """speechbrain's ECAPA-TDNN speaker encoder (192-d x-vectors; cosine in [-1, 1]).

    Loaded with ``EncoderClassifier.from_hparams`` from a folder holding the model's
    ``hyperparams.yaml`` and the checkpoints it names (``embedding_model.ckpt``, ...), i.e. a local
    copy of ``speechbrain/spkrec-ecapa-voxceleb``. The yaml's ``pretrained_path`` (which names the
    hub repo) is pointed at the folder, so nothing is fetched.
    """

    name = "ecapa"
    sample_rate = 16000

    def __init__(self, model: str = "speechbrain/spkrec-ecapa-voxceleb", device: str = "cpu", batch_size: int = 1,
                 allow_download: bool = False):
        import tempfile
        from pathlib import Path

        from speechbrain.inference.speaker import EncoderClassifier

        src = Path(model).expanduser()
        if not (src / "hyperparams.yaml").is_file():
            if not allow_download:
                raise _not_local("ECAPA", model, "speaker_model")
            source, overrides = model, {}
        else:
            source = str(src.absolute())
            # Released hparams fetch '<pretrained_path>/embedding_model.ckpt' where pretrained_path is the hub
            # repo; overriding it (only if present: speechbrain rejects unknown overrides) keeps the load local.
            text = (src / "hyperparams.yaml").read_text()
            overrides = {"pretrained_path": source} if "\npretrained_path:" in "\n" + text else {}
        # speechbrain links the checkpoints into savedir; a private temp folder keeps the source untouched.
        self._savedir = tempfile.mkdtemp(prefix="speechalign-ecapa-")
        self.model = EncoderClassifier.from_hparams(source=source, savedir=self._savedir, overrides=overrides,
                                                    run_opts={"device": device})
        self.model.eval()
        self.device, self.batch_size = device, batch_size
        with torch.no_grad():
            self.dim = int(self._forward([np.zeros(self.sample_rate, dtype=np.float32)]).shape[-1])

    @torch.no_grad()
    def _forward(self, wavs: list[np.ndarray]) -> torch.Tensor:
        batch, lengths = _pad(wavs)
        emb = self.model.encode_batch(batch, wav_lens=lengths.float() / lengths.max())  # [b, 1, D]
        return emb.reshape(len(wavs), -1)

    def embed(self, wavs: list[np.ndarray]) -> np.ndarray:
        """wavs: B float32 `[n_samples]` mono 16 kHz -> float32 `[B, D]` L2-normalised (zero rows if degenerate)."""
        return _embed_rows(wavs, self.sample_rate, self.dim, self.batch_size, self._forward, self.name)

    def similarity(self, a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
        """Cosine of a[i] and b[i]: float32 `[B]`; 0.0 where either side is degenerate."""
        return _cosine_pairs(self, a, b)


class WavLMSpeaker:
    """WavLM + x-vector head through transformers (``WavLMForXVector``), e.g. microsoft/wavlm-base-plus-sv.

    Loads the model and its feature extractor from a hub id already in the Hugging Face cache or a
    local folder written by ``save_pretrained``; no download unless ``allow_download``.
    """

    name = "wavlm"
    sample_rate = 16000

    def __init__(self, model: str = "microsoft/wavlm-base-plus-sv", device: str = "cpu", batch_size: int = 1,
                 allow_download: bool = False):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(model, local_files_only=not allow_download)
            self.model = WavLMForXVector.from_pretrained(model, local_files_only=not allow_download).to(device).eval()
        except OSError as e:
            raise _not_local("WavLM", model, "speaker_model") from e
        self.device, self.batch_size = device, batch_size
        self.dim = int(self.model.config.xvector_output_dim)

    @torch.no_grad()
    def _forward(self, wavs: list[np.ndarray]) -> torch.Tensor:
        feats = self.extractor(wavs, sampling_rate=self.sample_rate, return_tensors="pt", padding=True,
                               return_attention_mask=True)
        feats = {k: v.to(self.device) for k, v in feats.items()}
        return self.model(**feats).embeddings  # [b, D]

    def embed(self, wavs: list[np.ndarray]) -> np.ndarray:
        """wavs: B float32 `[n_samples]` mono 16 kHz -> float32 `[B, D]` L2-normalised (zero rows if degenerate)."""
        return _embed_rows(wavs, self.sample_rate, self.dim, self.batch_size, self._forward, self.name)

    def similarity(self, a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
        """Cosine of a[i] and b[i]: float32 `[B]`; 0.0 where either side is degenerate."""
        return _cosine_pairs(self, a, b)


SPEAKER_ENCODERS = {"resemblyzer": ResemblyzerSpeaker, "ecapa": ECAPASpeaker, "wavlm": WavLMSpeaker}


def build_speaker_encoder(name: str = "resemblyzer", **kwargs):
    """Build a speaker encoder by name; kwargs go to its constructor (ecapa/wavlm: model=, device=, ...)."""
    if name not in SPEAKER_ENCODERS:
        raise ValueError(f"unknown speaker encoder {name!r}; known: {sorted(SPEAKER_ENCODERS)}")
    return SPEAKER_ENCODERS[name](**kwargs)
