"""Audio codecs: waveform <-> discrete tokens ``[n_q, T]``.

One interface, three backends:

* ``mel_rvq`` (the embedded default): a residual vector quantiser over log-mel frames whose
  codebooks are fitted by k-means on the training corpus (the first few over whole frames, the
  rest one mel band each), decoded by mel inversion and a Griffin-Lim that holds the mel. It needs
  no download and no GPU, fits in a minute, and its first codebook is a phone-like spectral
  cluster, which is what the AR policy has to predict.
* ``encodec`` (the ``encodec`` package's 24 kHz SEANet + RVQ model): pretrained weights from a
  local checkpoint or the torch hub cache (never downloaded); random weights only in tests.
* ``speechtokenizer`` (the ``speechtokenizer`` package; 16 kHz, 50 Hz, 8 x 1024): the codec of
  SpeechGPT-Gen and SpeechAlign, whose RVQ-1 is distilled from HuBERT and so carries the content
  (the AR policy predicts it) while RVQ 2..8 carry the voice (the NAR model predicts them).
  Weights from a local ``config.json`` + checkpoint.

Every codec carries an ``identity`` string: golden tokens are cached per (identity, audio file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("speechalign.codec")


@dataclass
class CodecConfig:
    """Which codec turns audio into tokens, and its shape."""

    backend: Literal["mel_rvq", "encodec", "speechtokenizer"] = field(default="mel_rvq", metadata={
        "help": "mel_rvq: embedded k-means RVQ over log-mel (no download); encodec: the encodec package's "
                "24 kHz model; speechtokenizer: SpeechTokenizer (16 kHz, 50 Hz, 8 x 1024, RVQ-1 semantic)"})
    sample_rate: int = field(default=16000, metadata={"help": "mel_rvq: audio rate in Hz (encodec is fixed at 24000)"})
    n_fft: int = field(default=1024, metadata={"help": "mel_rvq: STFT size"})
    hop_length: int = field(default=256, metadata={
        "help": "mel_rvq: samples per token frame (256 at 16 kHz = 62.5 Hz)"})
    n_mels: int = field(default=80, metadata={"help": "mel_rvq: mel bands quantised per frame"})
    n_q: int = field(default=24, metadata={
        "help": "mel_rvq: residual codebooks; the AR policy predicts the first, the NAR model the rest "
                "(configs/tiny.yaml: 32 x 256, 4 of them whole-frame, holds the embedded codec bar)"})
    codebook_size: int = field(default=256, metadata={"help": "mel_rvq: entries per codebook"})
    fit_max_frames: int = field(default=40000, metadata={
        "help": "mel_rvq: frames sampled from the training audio for k-means (more = slower fit, little gain)"})
    full_levels: int = field(default=4, metadata={
        "help": "mel_rvq: leading codebooks that quantise the whole log-mel frame; each later one quantises one "
                "contiguous mel band of the residual (the bands split n_mels evenly). A 256-entry codebook over a "
                "few bands leaves far less error than over all of them; n_q <= full_levels = plain RVQ"})
    griffin_lim_iters: int = field(default=64, metadata={"help": "mel_rvq: Griffin-Lim iterations when decoding"})
    griffin_lim_warmup: int = field(default=16, metadata={
        "help": "mel_rvq: Griffin-Lim iterations towards the inverted linear magnitudes; the rest only hold the "
                "signal's mel projection to the decoded mel, keeping the fine structure the phase brings "
                "(>= griffin_lim_iters: plain Griffin-Lim)"})
    nnls_iters: int = field(default=30, metadata={
        "help": "mel_rvq: projected-gradient steps refining the mel -> linear inversion (0 = clamped pseudo-inverse)"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "encodec: a local encodec_24khz state dict (.th/.pt/.safetensors), or 'hub' for the copy in the "
                "torch hub cache (never downloaded); speechtokenizer: its checkpoint (SpeechTokenizer.pt or "
                ".safetensors). null = random weights, refused unless allow_random_weights"})
    allow_random_weights: bool = field(default=False, metadata={
        "help": "encodec/speechtokenizer: let codec.checkpoint: null build a codec with random weights (tests and "
                "smoke runs only: every figure it yields is meaningless). Off: a missing checkpoint is an error"})
    config_path: str | None = field(default=None, metadata={
        "help": "speechtokenizer: the model's config.json (from the same release as the checkpoint)"})
    bandwidth: float = field(default=6.0, metadata={
        "help": "encodec: target kbps (1.5, 3, 6, 12, 24) which sets n_q (2, 4, 8, 16, 32)"})
    seed: int = field(default=0, metadata={"help": "k-means seed (mel_rvq); random-init seed (encodec tests)"})

    def __post_init__(self):
        if self.backend not in ("mel_rvq", "encodec", "speechtokenizer"):
            raise ValueError(f"codec.backend={self.backend!r}: choose mel_rvq (embedded), encodec or speechtokenizer")
        if self.backend == "speechtokenizer" and not self.config_path:
            raise ValueError("codec.backend=speechtokenizer needs codec.config_path (the model's config.json) and "
                             "codec.checkpoint (its weights), e.g. from the fnlp/SpeechTokenizer release "
                             "speechtokenizer_hubert_avg/")
        if self.n_q < 1 or self.codebook_size < 2:
            raise ValueError(f"codec.n_q={self.n_q}, codec.codebook_size={self.codebook_size}: need n_q >= 1, size >= 2")
        if self.full_levels < 1:
            raise ValueError(f"codec.full_levels={self.full_levels}: at least the first codebook covers the whole frame")
        if self.backend == "mel_rvq" and self.n_q - self.full_levels > self.n_mels:
            raise ValueError(f"codec.n_q={self.n_q} leaves {self.n_q - self.full_levels} band codebooks for "
                             f"n_mels={self.n_mels} bands: raise full_levels or n_mels")
        if self.griffin_lim_iters < 1 or self.griffin_lim_warmup < 0:
            raise ValueError(f"codec.griffin_lim_iters={self.griffin_lim_iters} must be >= 1 and "
                             f"codec.griffin_lim_warmup={self.griffin_lim_warmup} >= 0")
        if self.hop_length <= 0 or self.n_fft < self.hop_length:
            raise ValueError(f"codec.hop_length={self.hop_length} must be in (0, n_fft={self.n_fft}]")
        if self.backend == "encodec" and self.bandwidth not in (1.5, 3.0, 6.0, 12.0, 24.0):
            raise ValueError(f"codec.bandwidth={self.bandwidth}: encodec_24khz supports 1.5, 3, 6, 12 or 24")


class Codec(Protocol):
    """What the loop needs from a codec."""

    sample_rate: int
    frame_rate: float
    n_q: int
    codebook_size: int
    identity: str

    def encode(self, wav: np.ndarray) -> torch.LongTensor:
        """wav: float32 mono [n_samples] at ``sample_rate`` -> codes: LongTensor [n_q, T]."""

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes: LongTensor [n_q, T] -> wav: float32 mono [n_samples]."""

    def save(self, path: str | Path) -> None:
        """Write everything needed to rebuild this codec into folder ``path``."""


# ---------------------------------------------------------------------------------------------
# mel_rvq: the embedded codec
# ---------------------------------------------------------------------------------------------
class MelRVQCodec:
    """Residual VQ over log-mel frames, decoded by mel inversion + mel-consistent Griffin-Lim.

    codebooks: FloatTensor [n_q, codebook_size, n_mels] in log-mel units. The first ``full_levels``
    quantise whole frames (RVQ-1 is the coarse spectral class the AR policy predicts); each later
    level quantises one mel band of the residual and is zero outside it, so dequantising is the same
    sum over levels either way.
    """

    def __init__(self, cfg: CodecConfig, codebooks: torch.Tensor):
        import torchaudio

        if codebooks.shape != (cfg.n_q, cfg.codebook_size, cfg.n_mels):
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)} do not match the config "
                             f"({cfg.n_q}, {cfg.codebook_size}, {cfg.n_mels})")
        self.cfg = cfg
        self.codebooks = codebooks.float().contiguous()
        self.sample_rate = cfg.sample_rate
        self.frame_rate = cfg.sample_rate / cfg.hop_length
        self.n_q = cfg.n_q
        self.codebook_size = cfg.codebook_size
        self._mel = torchaudio.transforms.MelSpectrogram(
            cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, power=1.0)
        # Least-squares inverse of the mel filterbank: [n_freq, n_mels]. (torch.linalg.lstsq on CPU
        # returns zeros for this under-determined system; the pseudo-inverse is right.)
        self._mel_inverse = torch.linalg.pinv(self._mel.mel_scale.fb.T)
        fb = self._mel.mel_scale.fb.T  # [n_mels, n_freq]
        self._bin_share = (fb / fb.sum(0, keepdim=True).clamp_min(1e-8)).T  # [n_freq, n_mels]: each bin's band weights
        self._window = torch.hann_window(cfg.n_fft)
        self.bands = level_bands(cfg)
        for q, (lo, hi) in enumerate(self.bands):
            outside = torch.cat([self.codebooks[q, :, :lo], self.codebooks[q, :, hi:]], dim=1)
            if outside.numel() and bool(outside.abs().max() > 0):
                raise ValueError(f"codebook {q} has entries outside its mel band [{lo}, {hi}): the codebooks were "
                                 f"fitted with another codec.full_levels than {cfg.full_levels}")
        digest = hashlib.sha1(self.codebooks.numpy().tobytes()).hexdigest()[:12]
        self.identity = (f"mel_rvq-sr{cfg.sample_rate}-hop{cfg.hop_length}-mel{cfg.n_mels}-"
                         f"{cfg.n_q}x{cfg.codebook_size}-{digest}")

    # -- features --------------------------------------------------------------------------
    def features(self, wav: np.ndarray) -> torch.Tensor:
        """wav: float32 [n_samples] -> log-mel frames: FloatTensor [T, n_mels]."""
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
        with torch.no_grad():
            return torch.log(self._mel(x).clamp_min(1e-5)).T.contiguous()

    @classmethod
    def fit(cls, cfg: CodecConfig, wavs: list[np.ndarray]) -> "MelRVQCodec":
        """Fit the codebooks by k-means, level by level on the residual of the previous ones (a band
        level on its band of the residual only)."""
        from sklearn.cluster import KMeans

        probe = cls(cfg, torch.zeros(cfg.n_q, cfg.codebook_size, cfg.n_mels))
        frames = torch.cat([probe.features(w) for w in wavs]).numpy()
        if len(frames) < cfg.codebook_size * 4:
            raise ValueError(f"only {len(frames)} frames to fit {cfg.codebook_size} codes; "
                             "give the codec more training audio or a smaller codec.codebook_size")
        rng = np.random.default_rng(cfg.seed)
        if len(frames) > cfg.fit_max_frames:
            frames = frames[rng.choice(len(frames), cfg.fit_max_frames, replace=False)]
        residual = frames.astype(np.float64)
        books = []
        for q, (lo, hi) in enumerate(level_bands(cfg)):
            km = KMeans(cfg.codebook_size, n_init=1, max_iter=60, random_state=cfg.seed + q).fit(residual[:, lo:hi])
            centres = np.zeros((cfg.codebook_size, cfg.n_mels))
            centres[:, lo:hi] = km.cluster_centers_
            books.append(centres)
            residual = residual - centres[km.labels_]
            log.info("codec level %d/%d fitted: residual rms %.3f", q + 1, cfg.n_q, float(np.sqrt((residual ** 2).mean())))
        return cls(cfg, torch.tensor(np.stack(books), dtype=torch.float32))

    def quantize(self, frames: torch.Tensor) -> torch.LongTensor:
        """frames: FloatTensor [T, n_mels] -> codes: LongTensor [n_q, T] (greedy residual assignment)."""
        residual = frames.clone()
        codes = []
        for book, (lo, hi) in zip(self.codebooks, self.bands):
            # Distances on the level's own band: the rest of the frame adds the same to every entry.
            idx = torch.cdist(residual[:, lo:hi], book[:, lo:hi]).argmin(dim=1)
            codes.append(idx)
            residual = residual - book[idx]
        return torch.stack(codes)

    def encode(self, wav: np.ndarray) -> torch.LongTensor:
        """wav: float32 mono [n_samples] -> codes: LongTensor [n_q, T], T = n_samples // hop + 1."""
        return self.quantize(self.features(wav))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: LongTensor [n_q', T] (n_q' <= n_q leading levels) -> log-mel FloatTensor [T, n_mels]."""
        codes = torch.as_tensor(codes).long()
        self._check_codes(codes)
        return sum(self.codebooks[q][codes[q]] for q in range(codes.shape[0]))

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes: LongTensor [n_q, T] -> wav: float32 [T * hop]. Empty codes give an empty wav."""
        codes = torch.as_tensor(codes).long()
        if codes.ndim != 2 or codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        if codes.shape[1] < 4:
            # Griffin-Lim cannot invert fewer frames than its window spans; a policy that stops
            # after a frame or two said nothing: decode as silence (scored as such), not a crash.
            self._check_codes(codes)
            return np.zeros(codes.shape[1] * self.cfg.hop_length, dtype=np.float32)
        mel = torch.exp(self.dequantize(codes)).T  # [n_mels, T]
        return self._synthesise(mel)

    def _synthesise(self, mel: torch.Tensor) -> np.ndarray:
        """mel magnitudes [n_mels, T] -> wav float32 [(T-1) * hop]: mel inversion, then Griffin-Lim.

        Fast Griffin-Lim (torchaudio's iteration, momentum 0.99) from a random phase drawn by a private
        seeded generator, so the same codes always decode to the same audio and the caller's RNG is
        untouched. The inverted magnitudes are smooth within each mel band (the inversion cannot know
        the harmonics there), and no signal has that STFT; Griffin-Lim forced towards them leaves
        phasey, breathy speech. So after ``griffin_lim_warmup`` iterations only the mel projection is
        held: each bin keeps the magnitude the current signal gives it, rescaled by its bands'
        target / current mel ratio.
        Measured on the embedded test split (benchmarks/results/codec_sweep.md; raw audio 0.205):
        pocketsphinx WER of 32-level golden tokens 0.238 -> 0.231, of 24 whole-frame ones 0.280 -> 0.257,
        of the unquantised log-mel 0.234 -> 0.229.
        """
        cfg = self.cfg
        fb = self._mel.mel_scale.fb.T  # [n_mels, n_freq]
        momentum = 0.99
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            magnitude = self._invert_mel(mel)  # [n_freq, T]
            angles = torch.rand(magnitude.shape, generator=generator, dtype=torch.complex64)
            previous = torch.zeros_like(angles)
            for it in range(cfg.griffin_lim_iters):
                wav = torch.istft(magnitude * angles, cfg.n_fft, cfg.hop_length, window=self._window)
                rebuilt = torch.stft(wav, cfg.n_fft, cfg.hop_length, window=self._window, return_complex=True)
                if it >= cfg.griffin_lim_warmup:
                    current = rebuilt.abs()
                    magnitude = current * (self._bin_share @ (mel / (fb @ current).clamp_min(1e-8)))
                angles = rebuilt - previous * (momentum / (1 + momentum))
                angles = angles / (angles.abs() + 1e-16)
                previous = rebuilt
            wav = torch.istft(magnitude * angles, cfg.n_fft, cfg.hop_length, window=self._window)
        return wav.numpy().astype(np.float32)

    def _invert_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """mel: [n_mels, T] magnitudes -> linear magnitudes [n_freq, T] >= 0.

        Non-negative least squares by projected gradient, started from the clamped pseudo-inverse:
        clamping alone leaves spectral holes that Griffin-Lim turns into musical noise.
        """
        fb = self._mel.mel_scale.fb.T  # [n_mels, n_freq]
        x = (self._mel_inverse @ mel).clamp_min(0.0)
        step = 1.0 / float(torch.linalg.matrix_norm(fb, 2) ** 2)
        for _ in range(self.cfg.nnls_iters):
            x = (x - step * (fb.T @ (fb @ x - mel))).clamp_min(0.0)
        return x

    # -- continuous latents (the flow-matching renderer works on these) ---------------------
    @property
    def latent_dim(self) -> int:
        """Width D of ``latent`` / ``semantic_latent`` frames (= n_mels)."""
        return self.cfg.n_mels

    def latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: LongTensor [n_q, T] -> FloatTensor [T, D]: the quantised latent summed over all levels."""
        return self.dequantize(codes)

    def semantic_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: LongTensor [>=1, T] or RVQ-1 [T] -> FloatTensor [T, D]: the RVQ-1 codebook vectors alone."""
        codes = torch.as_tensor(codes).long()
        return self.dequantize(codes[None] if codes.ndim == 1 else codes[:1])

    def decode_latent(self, latent: torch.Tensor) -> np.ndarray:
        """latent: FloatTensor [T, D] (log-mel) -> wav float32 [T * hop]; the same inversion as ``decode``."""
        latent = torch.as_tensor(latent, dtype=torch.float32)
        if latent.ndim != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"latent must be [T, {self.latent_dim}], got {tuple(latent.shape)}")
        if latent.shape[0] < 4:  # Griffin-Lim cannot invert fewer frames than its window (see decode)
            return np.zeros(latent.shape[0] * self.cfg.hop_length, dtype=np.float32)
        # A generated latent can overshoot what any code sequence dequantises to; exp() of it must
        # stay finite, so cap it at that bound (sum over levels of each level's largest entry).
        ceiling = float(self.codebooks.amax(dim=1).sum(0).max())
        mel = torch.exp(latent.clamp(max=ceiling)).T  # [n_mels, T]
        return self._synthesise(mel)

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[0] > self.n_q:
            raise ValueError(f"codes must be [n_q<={self.n_q}, T], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes out of range [0, {self.codebook_size}): min {int(codes.min())}, max {int(codes.max())}")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"codebooks": self.codebooks}, str(path / "codebooks.safetensors"))
        _write_json(path / "codec.json", {"backend": "mel_rvq", "config": dataclasses.asdict(self.cfg),
                                          "identity": self.identity})

    @classmethod
    def load(cls, path: str | Path) -> "MelRVQCodec":
        path = Path(path)
        meta = json.loads((path / "codec.json").read_text())
        config = dict(meta["config"])
        config.setdefault("full_levels", config["n_q"])  # saved before band levels existed: plain RVQ
        return cls(CodecConfig(**config), load_file(str(path / "codebooks.safetensors"))["codebooks"])


# ---------------------------------------------------------------------------------------------
# encodec: the encodec package's 24 kHz model
# ---------------------------------------------------------------------------------------------
class EncodecCodec:
    """The ``encodec`` package's 24 kHz model (SEANet encoder/decoder + RVQ, 75 Hz, 1024 codes).

    Pretrained weights come from ``cfg.checkpoint`` (a local state dict, e.g. the file
    ``encodec_24khz-d7cc33bc.th`` from the torch hub cache); with ``checkpoint=None`` the weights are
    random, which only tests should use.
    """

    def __init__(self, cfg: CodecConfig, model=None):
        from encodec import EncodecModel

        self.cfg = cfg
        if model is None:
            torch.manual_seed(cfg.seed)
            model = EncodecModel.encodec_model_24khz(pretrained=False)
            if cfg.checkpoint is not None:
                model.load_state_dict(_load_state_dict(encodec_checkpoint_path(cfg.checkpoint)))
            else:
                _random_weights_or_refuse(cfg)
        model.set_target_bandwidth(cfg.bandwidth)
        self.model = model.eval()
        self.sample_rate = model.sample_rate
        self.frame_rate = model.frame_rate
        self.n_q = model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, cfg.bandwidth)
        self.codebook_size = model.quantizer.bins
        digest = hashlib.sha1()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])
        self.identity = f"encodec_24khz-bw{cfg.bandwidth:g}-{digest.hexdigest()[:12]}"

    def encode(self, wav: np.ndarray) -> torch.LongTensor:
        """wav: float32 mono [n_samples] at 24 kHz -> codes: LongTensor [n_q, T] at 75 Hz."""
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None, None]
        with torch.no_grad():
            frames = self.model.encode(x)
        return torch.cat([codes for codes, _scale in frames], dim=-1)[0].long()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes: LongTensor [n_q, T] -> wav: float32 [n_samples] at 24 kHz."""
        codes = torch.as_tensor(codes).long()
        if codes.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            wav = self.model.decode([(codes[None], None)])
        return wav[0, 0].numpy().astype(np.float32)

    # -- continuous latents: the quantizer's summed output, what the SEANet decoder consumes --
    @property
    def latent_dim(self) -> int:
        """Width D of ``latent`` frames (the quantizer dimension, 128)."""
        return int(self.model.quantizer.dimension)

    def latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: LongTensor [n_q, T] -> FloatTensor [T, D]: the RVQ output summed over all levels."""
        codes = torch.as_tensor(codes).long()
        with torch.no_grad():
            return self.model.quantizer.decode(codes[:, None])[0].T.contiguous()

    def semantic_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: LongTensor [>=1, T] or RVQ-1 [T] -> FloatTensor [T, D]: the first level's vectors alone."""
        codes = torch.as_tensor(codes).long()
        return self.latent(codes[None] if codes.ndim == 1 else codes[:1])

    def decode_latent(self, latent: torch.Tensor) -> np.ndarray:
        """latent: FloatTensor [T, D] -> wav float32 [n_samples] at 24 kHz (SEANet decoder)."""
        latent = torch.as_tensor(latent, dtype=torch.float32)
        if latent.ndim != 2 or latent.shape[1] != self.latent_dim:
            raise ValueError(f"latent must be [T, {self.latent_dim}], got {tuple(latent.shape)}")
        if latent.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            return self.model.decoder(latent.T[None])[0, 0].numpy().astype(np.float32)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path / "encodec.safetensors"))
        cfg = dataclasses.replace(self.cfg, checkpoint="encodec.safetensors")
        _write_json(path / "codec.json", {"backend": "encodec", "config": dataclasses.asdict(cfg),
                                          "identity": self.identity})

    @classmethod
    def load(cls, path: str | Path) -> "EncodecCodec":
        path = Path(path)
        meta = json.loads((path / "codec.json").read_text())
        cfg = CodecConfig(**meta["config"])
        cfg.checkpoint = str(path / cfg.checkpoint) if not Path(cfg.checkpoint).is_absolute() else cfg.checkpoint
        return cls(cfg)


# ---------------------------------------------------------------------------------------------
# speechtokenizer: SpeechTokenizer (SpeechGPT-Gen / SpeechAlign's codec)
# ---------------------------------------------------------------------------------------------
class SpeechTokenizerCodec:
    """SpeechTokenizer: SEANet encoder/decoder + 8-level RVQ (1024 codes) at 16 kHz, 50 Hz (stride 320).

    RVQ-1 is distilled from HuBERT (the content tokens the AR policy predicts); RVQ 2..8 add the
    acoustic detail. Built from the release's ``config.json`` and checkpoint (``cfg.config_path``,
    ``cfg.checkpoint``); ``checkpoint=None`` gives random weights, which only tests should use.
    """

    def __init__(self, cfg: CodecConfig, model=None):
        self.cfg = cfg
        if model is None:
            model = self._build(cfg)
        self.model = model.eval()
        self.sample_rate = int(model.sample_rate)
        self.hop_length = int(model.downsample_rate)
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_q = int(model.n_q)
        self.codebook_size = int(model.quantizer.bins)
        self.identity = f"speechtokenizer-{self.n_q}x{self.codebook_size}-{_state_digest(self.model)}"

    @staticmethod
    def _build(cfg: CodecConfig):
        try:
            from speechtokenizer import SpeechTokenizer
        except ImportError as e:  # the package pins nothing we lack, but is installed with --no-deps
            raise ValueError(f"codec.backend=speechtokenizer needs the speechtokenizer package ({e}); "
                             "run scripts/setup.sh or pip install --no-deps speechtokenizer==1.0.1 beartype "
                             "lion-pytorch tensorboard") from e
        model_cfg = speechtokenizer_config(cfg.config_path)
        torch.manual_seed(cfg.seed)
        model = SpeechTokenizer(model_cfg)
        if cfg.checkpoint is not None:
            # SpeechTokenizer.load_from_checkpoint does the same with an unrestricted torch.load.
            model.load_state_dict(_load_state_dict(cfg.checkpoint))
        else:
            _random_weights_or_refuse(cfg)
        return model

    def encode(self, wav: np.ndarray) -> torch.LongTensor:
        """wav: float32 mono [n_samples] at 16 kHz -> codes: LongTensor [n_q, T], T = ceil(n_samples / 320)."""
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None, None]
        with torch.no_grad():
            codes = self.model.encode(x)  # [n_q, B, T]
        return codes[:, 0].long()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes: LongTensor [n_q' <= n_q, T] (leading levels) -> wav: float32 [T * 320] at 16 kHz."""
        codes = torch.as_tensor(codes).long()
        if codes.ndim != 2 or codes.shape[0] > self.n_q:
            raise ValueError(f"codes must be [n_q<={self.n_q}, T], got {tuple(codes.shape)}")
        if codes.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes out of range [0, {self.codebook_size})")
        with torch.no_grad():
            wav = self.model.decode(codes[:, None, :])  # [B, 1, n_samples]
        return wav[0, 0].numpy().astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write config.json + speechtokenizer.safetensors + codec.json into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _write_json(path / "config.json", speechtokenizer_config(self.cfg.config_path))
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  str(path / "speechtokenizer.safetensors"))
        cfg = dataclasses.replace(self.cfg, config_path="config.json", checkpoint="speechtokenizer.safetensors")
        _write_json(path / "codec.json", {"backend": "speechtokenizer", "config": dataclasses.asdict(cfg),
                                          "identity": self.identity})

    @classmethod
    def load(cls, path: str | Path) -> "SpeechTokenizerCodec":
        path = Path(path)
        cfg = CodecConfig(**json.loads((path / "codec.json").read_text())["config"])
        # The same constructor a user's release files go through, with paths made absolute.
        cfg.config_path, cfg.checkpoint = str(path / cfg.config_path), str(path / cfg.checkpoint)
        return cls(cfg)


# Keys SpeechTokenizer(config) reads; a config.json without one of them is not a SpeechTokenizer config.
SPEECHTOKENIZER_KEYS = ("n_filters", "dimension", "semantic_dimension", "strides", "lstm_layers", "bidirectional",
                        "dilation_base", "residual_kernel_size", "n_residual_layers", "activation", "sample_rate",
                        "codebook_size", "n_q")


def speechtokenizer_config(config_path: str | None) -> dict:
    """Read and check a SpeechTokenizer ``config.json`` (the file shipped beside its checkpoint)."""
    if not config_path or not Path(config_path).is_file():
        raise ValueError(f"codec.config_path={config_path} does not exist: point it at the config.json shipped "
                         "with the SpeechTokenizer checkpoint (no download is attempted)")
    cfg = json.loads(Path(config_path).read_text())
    missing = [k for k in SPEECHTOKENIZER_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{config_path} lacks {missing}: it is not a SpeechTokenizer config.json")
    return cfg


def level_bands(cfg: CodecConfig) -> list[tuple[int, int]]:
    """The mel-band slice [lo, hi) each mel_rvq level quantises: the whole frame for the first
    ``full_levels``, then contiguous bands splitting ``n_mels`` evenly, one per remaining level."""
    n_full = min(cfg.full_levels, cfg.n_q)
    edges = np.linspace(0, cfg.n_mels, cfg.n_q - n_full + 1).round().astype(int)
    return [(0, cfg.n_mels)] * n_full + [(int(edges[b]), int(edges[b + 1])) for b in range(cfg.n_q - n_full)]


def _random_weights_or_refuse(cfg: CodecConfig) -> None:
    """A pretrained-codec backend without a checkpoint: refuse, unless the config allows random weights."""
    if not cfg.allow_random_weights:
        raise ValueError(f"codec.backend={cfg.backend} has codec.checkpoint unset, which would run the whole experiment "
                         "on a codec with RANDOM weights; set codec.checkpoint to the released weights (see the README's "
                         "'Real checkpoints'), or codec.allow_random_weights=true for a test")
    log.warning("%s codec has random weights (codec.checkpoint unset, allow_random_weights): fine for tests only",
                cfg.backend)


def prompt_frames(seconds: float, frame_rate: float) -> int:
    """Codec frames of a ``seconds``-long voice prompt: at least one, so a prompt is never empty."""
    return max(1, int(round(seconds * frame_rate)))


def codec_sample_rate(cfg: CodecConfig) -> int:
    """The audio rate a codec config implies, known before the codec is built (no weights loaded)."""
    if cfg.backend == "encodec":
        return 24000
    if cfg.backend == "speechtokenizer":
        return int(speechtokenizer_config(cfg.config_path)["sample_rate"])
    return cfg.sample_rate


def _state_digest(model) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:12]


ENCODEC_24KHZ_FILE = "encodec_24khz-d7cc33bc.th"  # the name encodec's own loader caches it under


def encodec_checkpoint_path(checkpoint: str) -> str:
    """``codec.checkpoint`` for encodec -> a local file. ``'hub'`` means the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/encodec_24khz-d7cc33bc.th``, where ``EncodecModel.encodec_model_24khz()``
    puts it); we look there but never download, so a machine without network fails here with the fix."""
    if checkpoint != "hub":
        return checkpoint
    path = Path(torch.hub.get_dir()) / "checkpoints" / ENCODEC_24KHZ_FILE
    if not path.is_file():
        raise ValueError(f"codec.checkpoint=hub but {path} is not there: on a machine with network run "
                         "python -c 'import encodec; encodec.EncodecModel.encodec_model_24khz()' (it fills the "
                         "torch hub cache), or copy the file and set codec.checkpoint=/path/to/" + ENCODEC_24KHZ_FILE)
    return str(path)


def _load_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"codec.checkpoint={path} does not exist: point it at a local state dict of the "
                         "codec (no download is attempted)")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    return torch.load(p, map_location="cpu", weights_only=True)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
def build_codec(cfg: CodecConfig, fit_wavs: list[np.ndarray] | None = None) -> Codec:
    """Build the codec a config names; ``mel_rvq`` needs ``fit_wavs`` (training audio) to fit."""
    if cfg.backend == "mel_rvq":
        if not fit_wavs:
            raise ValueError("the mel_rvq codec is fitted on training audio: pass fit_wavs")
        return MelRVQCodec.fit(cfg, fit_wavs)
    if cfg.backend == "speechtokenizer":
        return SpeechTokenizerCodec(cfg)
    return EncodecCodec(cfg)


def load_codec(path: str | Path) -> Codec:
    """Rebuild a codec written by ``save``."""
    path = Path(path)
    meta_path = path / "codec.json"
    if not meta_path.is_file():
        raise ValueError(f"{path} holds no codec (codec.json missing)")
    backend = json.loads(meta_path.read_text())["backend"]
    return {"mel_rvq": MelRVQCodec, "encodec": EncodecCodec, "speechtokenizer": SpeechTokenizerCodec}[backend].load(path)
