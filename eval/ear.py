"""The second ear: a small in-domain CTC phone recogniser that reads the log-mel the renderer makes.

pocketsphinx hears the policy through Griffin-Lim audio, at ~2 judged samples/s, with retest noise
(issue 32: r 0.88 under 50 dB white noise) about half the spread between the samples of one text.
This ear is trained by the project on its own corpus, so it hears the domain it judges: raw flite
audio, the same audio through the codec, and golden tokens through the policy's renderer (what a
perfect AR policy would produce). It reads the log-mel frames directly, so a judge of a phone
renderer's output skips the vocoder; ``features`` computes the same log-mel from a waveform
(``MelRVQCodec.features``), so it also judges audio (real speech, perturbed copies).

Two scores per utterance, against the reference phones of the project's text frontend
(``models.layout.text_units(text, "phones")``, letters for words the dictionary lacks):

* ``per``: phone error rate of the greedy CTC transcript (edit distance / reference phones);
* ``nll``: the CTC negative log-likelihood of the reference phones, per reference phone (and
  ``nll_frame`` per input frame) - continuous, as the TTS-RL work's ASR NLL (arXiv 2509.18798).

Model: per-utterance normalisation (a floor relative to the loudest frames, then per-band mean
removal, so gain does not matter), a 1-D convolution that halves the frame rate, residual dilated
convolutions (~1 s of context), one bidirectional GRU layer and a linear CTC head over ``TEXT_UNITS``
+ blank. ``EarConfig.named("small")`` has 0.41M parameters (1.6 MB float32) and trains in 15 min on
one CPU thread (``train_ear``; scripts/train_ear.py). benchmarks/results/judges.md measures it beside
pocketsphinx.

    ear = Ear.load("runs/ears/<name>")
    scores = score_logmel(ear, mels, texts)            # mels: FloatTensor [T, n_mels] each
    scores = score_audio(ear, wavs, 16000, texts)      # float32 waveforms at ear.cfg.sample_rate
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.configutil import from_dict
from models.layout import TEXT_UNITS, edit_distance, text_units

log = logging.getLogger("speechalign.ear")

BLANK = 0  # CTC blank; unit i of TEXT_UNITS is class i + 1
_CLASS = {u: i + 1 for i, u in enumerate(TEXT_UNITS)}


class EarInputError(ValueError):
    """Audio or log-mel the ear cannot judge; the message says the fix."""


@dataclass
class EarConfig:
    """Shape of the ear and of the log-mel it reads (the codec's: ``MelRVQCodec.features`` with these settings)."""

    sample_rate: int = field(default=16000, metadata={"help": "audio rate the log-mel is computed at (Hz)"})
    n_fft: int = field(default=1024, metadata={"help": "STFT size of the log-mel"})
    hop_length: int = field(default=256, metadata={"help": "samples per frame (256 at 16 kHz = 62.5 Hz)"})
    n_mels: int = field(default=128, metadata={"help": "mel bands (the main job's codec: 128)"})
    channels: int = field(default=128, metadata={"help": "width of the convolutions"})
    blocks: int = field(default=3, metadata={
        "help": "residual dilated convolutions after the first (dilations 1, 2, 4, ...: ~1 s of context)"})
    hidden: int = field(default=64, metadata={"help": "GRU units per direction"})
    rnn_layers: int = field(default=1, metadata={
        "help": "bidirectional GRU layers on top (0 = convolutions only); the GRU is most of the step time on a CPU"})
    stride: int = field(default=2, metadata={
        "help": "frame-rate reduction of the first convolution: 2 = 31 Hz, still ~2.5 frames per phone of flite "
                "speech, and half the GRU's time"})
    floor_nats: float = field(default=7.0, metadata={
        "help": "log-mel values more than this below the utterance's loud frames (95th percentile of the frame peaks) are raised to "
                "it: digital silence (log 1e-5) and a faint noise floor then read the same"})
    n_units: int = field(default=len(TEXT_UNITS), metadata={"help": "text units it recognises (TEXT_UNITS)"})

    def __post_init__(self):
        for key in ("sample_rate", "n_fft", "hop_length", "n_mels", "channels", "hidden", "stride"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"ear.{key}={getattr(self, key)!r} must be a positive integer")
        if self.blocks < 0 or self.rnn_layers < 0:
            raise ValueError(f"ear.blocks={self.blocks} and ear.rnn_layers={self.rnn_layers} must be >= 0")
        if self.n_fft < self.hop_length:
            raise ValueError(f"ear.hop_length={self.hop_length} must be <= ear.n_fft={self.n_fft}")
        if self.floor_nats <= 0:
            raise ValueError(f"ear.floor_nats={self.floor_nats} must be > 0 (7 = about 60 dB below the loud frames)")
        if self.n_units != len(TEXT_UNITS):
            raise ValueError(f"ear.n_units={self.n_units} but the text frontend has {len(TEXT_UNITS)} units; "
                             "retrain the ear with this code")

    @classmethod
    def named(cls, size: str, **features) -> "EarConfig":
        """A named size: ``toy`` (tests: convolutions only, ~33k parameters at 128 mels) or ``small`` (the judge, ~0.4M, 1.6 MB). ``features``:
        the log-mel settings (sample_rate, n_fft, hop_length, n_mels) of the codec it listens through."""
        sizes = {"toy": dict(channels=32, blocks=2, hidden=16, rnn_layers=0),
                 "small": dict(channels=128, blocks=3, hidden=64, rnn_layers=1)}
        if size not in sizes:
            raise ValueError(f"ear size {size!r} unknown; choose one of {sorted(sizes)}")
        return cls(**sizes[size], **features)

    @classmethod
    def from_dict(cls, data: dict | None) -> "EarConfig":
        return from_dict(cls, data, "ear.")


@dataclass
class EarTrainConfig:
    """How ``train_ear`` trains: AdamW on the CTC loss, with the augmentations that keep it deaf to what no listener
    hears (a noise floor, masked bands and frames)."""

    steps: int = field(default=2500, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=24, metadata={"help": "utterances per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (linear warm-up, cosine decay)"})
    warmup_steps: int = field(default=100, metadata={"help": "warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    noise_prob: float = field(default=0.5, metadata={
        "help": "share of training items given a white-noise floor in the mel domain (the 50 dB retest's change)"})
    noise_db: tuple[float, float] = field(default=(30.0, 70.0), metadata={
        "help": "range of the noise floor, dB below the utterance's mean mel level"})
    freq_masks: int = field(default=2, metadata={"help": "SpecAugment bands masked per item (width <= n_mels / 10)"})
    time_masks: int = field(default=2, metadata={"help": "SpecAugment frame spans masked per item (<= 4 frames)"})
    seed: int = field(default=0, metadata={"help": "batch order, augmentation and initialisation seed"})
    log_every: int = field(default=100, metadata={"help": "steps between log lines"})

    def __post_init__(self):
        self.noise_db = tuple(float(x) for x in self.noise_db)
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("ear_train.steps, .batch_size >= 1, .lr > 0 and .warmup_steps >= 0 are required")
        if not 0 <= self.noise_prob <= 1 or len(self.noise_db) != 2 or self.noise_db[0] > self.noise_db[1]:
            raise ValueError(f"ear_train.noise_prob={self.noise_prob} must be in [0, 1] and ear_train.noise_db="
                             f"{self.noise_db} a (low, high) pair")
        if self.freq_masks < 0 or self.time_masks < 0:
            raise ValueError("ear_train.freq_masks and .time_masks must be >= 0")

    @classmethod
    def from_dict(cls, data: dict | None) -> "EarTrainConfig":
        return from_dict(cls, data, "ear_train.")


@dataclass
class EarScore:
    """One utterance's verdict: ``per`` (phone error rate, 0 = every reference phone heard), ``nll`` (CTC negative
    log-likelihood of the reference per reference phone, nats), ``nll_frame`` (the same per input frame), the
    greedy transcript ``hyp`` and the reference ``ref`` (units)."""

    per: float
    nll: float
    nll_frame: float
    hyp: list[str]
    ref: list[str]


class Ear(nn.Module):
    """log-mel [B, T, n_mels] -> CTC log-probabilities [B, T', n_units + 1], T' = ceil(T / stride)."""

    def __init__(self, cfg: EarConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.conv1 = nn.Conv1d(cfg.n_mels, c, 5, stride=cfg.stride, padding=2)
        self.blocks = nn.ModuleList(nn.Conv1d(c, c, 5, padding=2 * 2 ** i, dilation=2 ** i) for i in range(cfg.blocks))
        self.norm = nn.LayerNorm(c)
        self.rnn = (nn.GRU(c, cfg.hidden, cfg.rnn_layers, batch_first=True, bidirectional=True)
                    if cfg.rnn_layers else None)
        self.head = nn.Linear(2 * cfg.hidden if cfg.rnn_layers else c, cfg.n_units + 1)
        self._features = {}  # the mel transform, built on first use; a dict so that it is no submodule (not saved)

    # -- features ------------------------------------------------------------------------------
    def features(self, wav: np.ndarray, sample_rate: int) -> torch.Tensor:
        """wav: float32 [n_samples] at ``cfg.sample_rate`` -> log-mel FloatTensor [n_samples // hop + 1, n_mels],
        exactly ``MelRVQCodec.features`` with the same settings. Raises EarInputError on empty, non-finite or
        wrongly sampled audio."""
        cfg = self.cfg
        if sample_rate != cfg.sample_rate:
            raise EarInputError(f"audio at {sample_rate} Hz; the ear hears {cfg.sample_rate} Hz: resample it first "
                                f"(models.audio.resample(wav, {sample_rate}, {cfg.sample_rate}))")
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise EarInputError(f"audio must be mono [n_samples], got shape {wav.shape}: mix the channels down")
        if len(wav) == 0:
            raise EarInputError("audio has 0 samples: a sample that said nothing is judged by score_logmel with an "
                                "empty log-mel [0, n_mels] (read as all phones deleted)")
        if not np.isfinite(wav).all():
            raise EarInputError("audio contains NaN or infinite samples; regenerate it (a diverged model?)")
        if "mel" not in self._features:
            import torchaudio

            self._features["mel"] = torchaudio.transforms.MelSpectrogram(
                cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, power=1.0)
        with torch.no_grad():
            return torch.log(self._features["mel"](torch.from_numpy(wav)).clamp_min(1e-5)).T.contiguous()

    def normalise(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """mel: FloatTensor [B, T, n_mels], lengths: LongTensor [B] -> [B, T, n_mels]: values below the utterance's
        loud frames' peak (95th percentile over frames of the frame maximum) minus ``floor_nats`` raised to that floor, then each band's mean over the real frames
        removed (a gain is a constant in the log domain: it goes), divided by 3 to unit-ish scale; padding 0."""
        B, T, _ = mel.shape
        valid = (torch.arange(T)[None] < lengths[:, None])  # [B, T]
        out = torch.zeros_like(mel)
        for b in range(B):
            x = mel[b, : int(lengths[b])]
            if x.numel() == 0:
                continue
            top = torch.quantile(x.amax(1), 0.95)  # the loud frames' peak band, robust to a click
            x = x.clamp_min(top - self.cfg.floor_nats)
            out[b, : x.shape[0]] = (x - x.mean(0, keepdim=True)) / 3.0
        return out * valid[..., None]

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Input frames [B] -> output frames [B] (the first convolution's stride)."""
        return (lengths + self.cfg.stride - 1) // self.cfg.stride

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """mel: FloatTensor [B, T, n_mels] (raw log-mel, zero-padded), lengths: LongTensor [B] -> log-probabilities
        FloatTensor [B, T', n_units + 1]."""
        x = self.normalise(mel, lengths).transpose(1, 2)
        x = F.gelu(self.conv1(x))
        for conv in self.blocks:
            x = x + F.gelu(conv(x))
        h = self.norm(x.transpose(1, 2))
        if self.rnn is not None:
            out_len = self.out_lengths(lengths)
            packed = nn.utils.rnn.pack_padded_sequence(h, out_len.clamp_min(1).cpu(), batch_first=True,
                                                       enforce_sorted=False)
            h, _ = self.rnn(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[2])
        return F.log_softmax(self.head(h), dim=-1)

    # -- persistence ---------------------------------------------------------------------------
    @property
    def digest(self) -> str:
        """sha1 (12 hex) of the config and the weights: a cache key for anything this ear judged."""
        h = hashlib.sha1(json.dumps(dataclasses.asdict(self.cfg), sort_keys=True).encode())
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Write ``ear.safetensors`` + ``ear.json`` (config, digest, ``meta``: how it was trained) atomically."""
        from safetensors.torch import save_file

        from models.io import atomic_dir

        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "ear.safetensors"))
            (tmp / "ear.json").write_text(json.dumps({"config": dataclasses.asdict(self.cfg), "digest": self.digest,
                                                      "meta": meta or {}}, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> "Ear":
        """The ear saved in folder ``path``; refuses weights whose digest differs from the one saved beside them."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "ear.json").is_file():
            raise FileNotFoundError(f"{path}/ear.json not found: train an ear first (scripts/train_ear.py)")
        info = json.loads((path / "ear.json").read_text())
        ear = cls(EarConfig.from_dict(info["config"]))
        ear.load_state_dict(load_file(str(path / "ear.safetensors")))
        if ear.digest != info["digest"]:
            raise ValueError(f"{path}: weights digest {ear.digest} != saved {info['digest']}: the folder is damaged "
                             "or mixed from two ears; retrain it")
        return ear.eval()

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Reference phones and batching
# ---------------------------------------------------------------------------------------------
def reference_units(text: str) -> list[str]:
    """The phones (letters for out-of-dictionary words) the ear expects to hear for ``text``."""
    return text_units(text, "phones")


def _check_mel(mel: torch.Tensor, n_mels: int) -> torch.Tensor:
    mel = torch.as_tensor(mel, dtype=torch.float32)
    if mel.ndim != 2 or mel.shape[1] != n_mels:
        raise EarInputError(f"log-mel must be [T, {n_mels}], got {tuple(mel.shape)}: this ear was trained on the "
                            f"{n_mels}-band log-mel of its codec")
    if not torch.isfinite(mel).all():
        raise EarInputError("log-mel contains NaN or infinite values; the renderer diverged or the mel was not logged")
    return mel


def _batch(mels: list[torch.Tensor], refs: list[list[str]], stride: int, floor: float = math.log(1e-5)):
    """Pad mels into [B, T, n_mels] (a mel too short for CTC to place its reference is padded with silence, so it
    scores as badly as it deserves instead of infinitely), targets [sum U], lengths."""
    need = []
    for m, r in zip(mels, refs):
        ids = [_CLASS[u] for u in r]
        repeats = sum(a == b for a, b in zip(ids, ids[1:]))
        need.append(max(m.shape[0], (len(ids) + repeats) * stride, stride))
    T = max(need)
    x = torch.full((len(mels), T, mels[0].shape[1]), 0.0)
    for i, (m, n) in enumerate(zip(mels, need)):
        x[i, :n] = floor
        x[i, : m.shape[0]] = m
    targets = torch.tensor([_CLASS[u] for r in refs for u in r], dtype=torch.long)
    return x, torch.tensor(need), targets, torch.tensor([len(r) for r in refs])


def greedy_units(logp: torch.Tensor) -> list[str]:
    """logp: FloatTensor [T', n_units + 1] -> the greedy CTC transcript (repeats merged, blanks dropped)."""
    best = logp.argmax(-1).tolist()
    out, prev = [], BLANK
    for c in best:
        if c != prev and c != BLANK:
            out.append(TEXT_UNITS[c - 1])
        prev = c
    return out


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_logmel(ear: Ear, mels: list[torch.Tensor], texts: list[str], batch_size: int = 32) -> list[EarScore]:
    """Judge log-mels (FloatTensor [T, n_mels] each, as ``Policy.render_logmel`` or ``Ear.features`` give them)
    against ``texts``. An empty mel [0, n_mels] (a sample that said nothing) scores as silence: every phone
    deleted (PER 1) and the NLL of the reference under silence."""
    if len(mels) != len(texts):
        raise ValueError(f"{len(mels)} log-mels but {len(texts)} texts")
    mels = [_check_mel(m, ear.cfg.n_mels) for m in mels]
    refs = [reference_units(t) for t in texts]
    ear.eval()
    out: list[EarScore | None] = [None] * len(mels)
    order = sorted(range(len(mels)), key=lambda i: mels[i].shape[0])  # similar lengths share a batch
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        x, lengths, targets, tlen = _batch([mels[i] for i in idx], [refs[i] for i in idx], ear.cfg.stride)
        logp = ear(x, lengths)
        olen = ear.out_lengths(lengths)
        nll = F.ctc_loss(logp.transpose(0, 1), targets, olen, tlen, blank=BLANK, reduction="none", zero_infinity=False)
        for j, i in enumerate(idx):
            hyp = greedy_units(logp[j, : int(olen[j])]) if mels[i].shape[0] else []  # silence said nothing
            ref = refs[i]
            errors = edit_distance([_CLASS[u] for u in ref], [_CLASS[u] for u in hyp])
            frames = max(mels[i].shape[0], 1)
            out[i] = EarScore(per=errors / len(ref), nll=float(nll[j]) / len(ref), nll_frame=float(nll[j]) / frames,
                              hyp=hyp, ref=ref)
    return out


def score_audio(ear: Ear, wavs: list[np.ndarray], sample_rate: int, texts: list[str],
                batch_size: int = 32) -> list[EarScore]:
    """Judge waveforms (float32 [n] each at ``sample_rate`` = ``ear.cfg.sample_rate``) against ``texts``: the log-mel
    of each (``Ear.features``), then ``score_logmel``. Raises EarInputError for empty, non-finite or wrongly sampled
    audio."""
    return score_logmel(ear, [ear.features(w, sample_rate) for w in wavs], texts, batch_size)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _template(ear: Ear) -> torch.Tensor:
    """The mean mel magnitude [n_mels] of unit-variance white noise through the ear's mel filterbank."""
    g = np.random.default_rng(0)
    noise = g.standard_normal(ear.cfg.sample_rate * 2).astype(np.float32)
    return torch.exp(ear.features(noise, ear.cfg.sample_rate)).mean(0)


def _augment(mel: torch.Tensor, cfg: EarTrainConfig, template: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One training item's log-mel [T, n_mels] with a random white-noise floor and SpecAugment masks."""
    x = mel.clone()
    T, M = x.shape
    if float(torch.rand((), generator=g)) < cfg.noise_prob:
        level = 0.5 * torch.logsumexp(2 * x.reshape(-1), 0) - 0.5 * math.log(x.numel())  # log rms of the mel
        lo, hi = cfg.noise_db
        db = lo + (hi - lo) * float(torch.rand((), generator=g))
        scale = torch.exp(level - db / 20 * math.log(10)) / template.pow(2).mean().sqrt()
        # white noise's mel magnitude fluctuates frame to frame about its mean (a Rayleigh-like spread)
        wobble = torch.exp(0.35 * torch.randn(T, M, generator=g))
        x = torch.logaddexp(x, torch.log(scale * template * wobble))
    for _ in range(cfg.freq_masks):
        w = int(torch.randint(0, max(1, M // 10) + 1, (), generator=g))
        f0 = int(torch.randint(0, max(1, M - w), (), generator=g))
        x[:, f0: f0 + w] = x.mean()
    for _ in range(cfg.time_masks):
        w = int(torch.randint(0, 5, (), generator=g))
        if T > w:
            t0 = int(torch.randint(0, T - w, (), generator=g))
            x[t0: t0 + w] = x.min()
    return x


def train_ear(ear: Ear, items: list[tuple[torch.Tensor, str]], cfg: EarTrainConfig,
              progress: bool = False) -> list[float]:
    """Train ``ear`` in place on (log-mel FloatTensor [T, n_mels], text) items by CTC against the text's phones;
    returns the loss (mean CTC NLL per reference phone) of every step. Single process; set the thread count
    before calling (torch.set_num_threads)."""
    if not items:
        raise ValueError("train_ear needs at least one (log-mel, text) item")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    mels = [_check_mel(m, ear.cfg.n_mels) for m, _ in items]
    refs = [reference_units(t) for _, t in items]
    template = _template(ear)
    opt = torch.optim.AdamW(ear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    ear.train()
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="ear", leave=False)
    for step in range(cfg.steps):
        idx = torch.randint(0, len(items), (min(cfg.batch_size, len(items)),), generator=g).tolist()
        x, lengths, targets, tlen = _batch([_augment(mels[i], cfg, template, g) for i in idx],
                                           [refs[i] for i in idx], ear.cfg.stride)
        logp = ear(x, lengths)
        loss = F.ctc_loss(logp.transpose(0, 1), targets, ear.out_lengths(lengths), tlen, blank=BLANK,
                          reduction="sum", zero_infinity=True) / tlen.sum()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ear.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log.info("ear step %d/%d: CTC loss %.3f per phone", step + 1, cfg.steps,
                     float(np.mean(losses[-cfg.log_every:])))
    if bar is not None:
        bar.close()
    ear.eval()
    return losses

