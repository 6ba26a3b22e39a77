"""Flow-matching perceptual model (SpeechGPT-Gen): RVQ-1 semantics + a voice prompt -> codec latent.

The AR policy writes the semantic tokens (RVQ-1); this model adds everything else (timbre,
prosody, the finer RVQ levels) by conditional flow matching in the codec's continuous latent:

* target x1 = the codec's quantised latent summed over all RVQ levels, ``codec.latent(codes)`` [T, D];
* semantic condition v1 = the RVQ-1 codebook vector of each frame, ``codec.semantic_latent(codes)``.

Two ways to bring v1 in (``FlowConfig.chain``):

* ``implicit`` (SpeechGPT-Gen's chain of information): the prior is centred on the semantics,
  x0 = N(0, I) + v1; the straight path w_t = (1 - t) x0 + t x1 is regressed with the velocity
  x1 - x0. The network never sees v1 as an input: it only has to add what RVQ-1 lacks.
* ``explicit`` (the baseline): x0 = N(0, I), v1 is an extra input, and the flow generates the
  residual y = x1 - v1 (velocity y - x0); the latent is v1 + y.

Prompting (Voicebox style): in training a random prefix of the target latent (up to
``max_prompt_frames``) is given as context and left out of the loss; at inference the prompt
utterance's latent is that prefix and the target frames follow it. The ODE is solved with a
fixed-step Euler or midpoint solver; classifier-free guidance drops the context in training with
probability ``cfg_dropout`` and extrapolates away from the context-free velocity at inference.

All flow arithmetic happens in a per-dimension standardised latent space (mean/std of the
training latents, stored with the model): the N(0, I) prior only makes sense at unit scale.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

CHAINS = ("implicit", "explicit")
SOLVERS = ("euler", "midpoint")

# Named sizes. 'paper' is SpeechGPT-Gen's published backbone (conformer-style, 1024 x 12, 16 heads).
FLOW_SIZES = {
    "tiny": dict(dim=128, depth=4, heads=4, ffn=512, conv_kernel=15),
    "paper": dict(dim=1024, depth=12, heads=16, ffn=4096, conv_kernel=31),
}


@dataclass
class FlowConfig:
    """Shape of the flow model and how it samples; ``latent_dim`` comes from the codec."""

    latent_dim: int = field(default=80, metadata={"help": "codec latent width D (mel_rvq: n_mels; encodec: 128)"})
    dim: int = field(default=128, metadata={"help": "transformer width"})
    depth: int = field(default=4, metadata={"help": "conformer blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    ffn: int = field(default=512, metadata={"help": "feed-forward width"})
    conv_kernel: int = field(default=15, metadata={"help": "depthwise convolution kernel (frames) per block"})
    dropout: float = field(default=0.0, metadata={"help": "dropout (0 keeps tiny CPU runs deterministic)"})
    chain: str = field(default="implicit", metadata={
        "help": "implicit: prior N(0,I) + v1 (SpeechGPT-Gen); explicit: prior N(0,I), v1 as input, residual target"})
    max_prompt_frames: int = field(default=300, metadata={
        "help": "longest random prompt prefix in training (the paper's 300 frames)"})
    cfg_dropout: float = field(default=0.0, metadata={
        "help": "probability of training without the prompt context; > 0 enables classifier-free guidance"})
    solver: str = field(default="midpoint", metadata={"help": "ODE solver at inference: euler or midpoint"})
    steps: int = field(default=8, metadata={
        "help": "solver steps at inference (NFE = steps for euler, 2 x steps for midpoint)"})
    guidance: float = field(default=0.0, metadata={
        "help": "classifier-free guidance strength alpha: v = (1 + alpha) v(ctx) - alpha v(no ctx); 0 = off"})

    def __post_init__(self):
        if self.chain not in CHAINS:
            raise ValueError(f"flow chain={self.chain!r}: choose one of {CHAINS}")
        if self.solver not in SOLVERS:
            raise ValueError(f"flow solver={self.solver!r}: choose one of {SOLVERS}")
        if self.steps < 1:
            raise ValueError(f"flow steps={self.steps} must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"flow dim={self.dim} must be divisible by heads={self.heads}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"flow cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.guidance < 0:
            raise ValueError(f"flow guidance={self.guidance} must be >= 0")
        if self.guidance > 0 and self.cfg_dropout == 0:
            raise ValueError("flow guidance > 0 needs a model trained with cfg_dropout > 0 (it never saw the "
                             "context-free case); set cfg_dropout, or guidance=0")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"flow conv_kernel={self.conv_kernel} must be odd (same-length convolution)")

    @classmethod
    def named(cls, size: str, latent_dim: int, **overrides) -> "FlowConfig":
        if size not in FLOW_SIZES:
            raise ValueError(f"flow size {size!r} unknown; choose one of {sorted(FLOW_SIZES)}")
        return cls(latent_dim=latent_dim, **{**FLOW_SIZES[size], **overrides})


# ---------------------------------------------------------------------------------------------
# The chains and the solver: plain functions, so tests can check them by hand
# ---------------------------------------------------------------------------------------------
def prior(chain: str, v1: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow start x0 [.., D]: implicit N(0, I) + v1 (semantics through the prior); explicit N(0, I)."""
    return noise + v1 if chain == "implicit" else noise


def flow_target(chain: str, x1: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """What the flow transports x0 to: implicit the latent x1; explicit the residual x1 - v1."""
    return x1 if chain == "implicit" else x1 - v1


def path_and_velocity(x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight path w_t = (1 - t) x0 + t y and its constant velocity y - x0.

    x0, y: [B, T, D]; t: [B] in [0, 1]. Returns (w_t, velocity), both [B, T, D].
    """
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * y, y - x0


def integrate(fn: Callable[[torch.Tensor, float], torch.Tensor], x0: torch.Tensor, steps: int,
              solver: str = "midpoint") -> torch.Tensor:
    """Solve dx/dt = fn(x, t) from t = 0 to 1 with ``steps`` fixed steps; returns x(1), shaped like x0."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {SOLVERS}")
    x, h = x0, 1.0 / steps
    for i in range(steps):
        t = i * h
        if solver == "euler":
            x = x + h * fn(x, t)
        else:  # midpoint: second order, exact for velocities linear in t
            x = x + h * fn(x + 0.5 * h * fn(x, t), t + 0.5 * h)
    return x


def nfe(steps: int, solver: str) -> int:
    """Network evaluations per synthesis (x2 with classifier-free guidance)."""
    return steps * (2 if solver == "midpoint" else 1)


# ---------------------------------------------------------------------------------------------
# The network: a conformer-style transformer over frames
# ---------------------------------------------------------------------------------------------
def _sinusoid(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x: [N] positions or times -> [N, dim] sin/cos features (log-spaced frequencies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = x.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def _ffn(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class ConformerBlock(nn.Module):
    """Macaron FFN / self-attention / depthwise-conv / FFN, pre-norm, with the flow time added in."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        d = cfg.dim
        self.time = nn.Linear(d, d)
        self.ff1 = _ffn(d, cfg.ffn, cfg.dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.conv_norm = nn.LayerNorm(d)
        self.conv_in = nn.Linear(d, 2 * d)
        self.depthwise = nn.Conv1d(d, d, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=d)
        self.conv_act_norm = nn.LayerNorm(d)
        self.conv_out = nn.Linear(d, d)
        self.ff2 = _ffn(d, cfg.ffn, cfg.dropout)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim]; temb: [B, dim]; keep: BoolTensor [B, T] (True on real frames) -> [B, T, dim]."""
        x = x + self.time(temb)[:, None]
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, key_padding_mask=~keep, need_weights=False)[0]
        # padded frames are zeroed before the convolution so they cannot leak into real ones
        h = F.glu(self.conv_in(self.conv_norm(x)), dim=-1) * keep[..., None]
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        x = x + self.conv_out(F.silu(self.conv_act_norm(h)))
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)


class FlowModel(nn.Module):
    """Velocity network v(w_t, t | context[, v1]) and the sampler around it.

    Inputs are in the standardised latent space; ``loss`` and ``synthesize`` take raw codec latents
    and standardise with the stored ``latent_mean`` / ``latent_std`` [D].
    """

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.latent_dim
        n_in = 3 if cfg.chain == "explicit" else 2  # w_t, context (+ v1 for the explicit chain)
        self.in_proj = nn.Linear(n_in * D, cfg.dim)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.dim, D)
        self.register_buffer("latent_mean", torch.zeros(D))
        self.register_buffer("latent_std", torch.ones(D))

    # -- normalisation --------------------------------------------------------------------------
    def set_normalizer(self, latents: list[torch.Tensor]) -> None:
        """Per-dimension mean/std from training latents (each [T_i, D])."""
        x = torch.cat([torch.as_tensor(latent, dtype=torch.float32) for latent in latents])
        self.latent_mean.copy_(x.mean(0))
        self.latent_std.copy_(x.std(0).clamp_min(1e-3))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.latent_mean) / self.latent_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean

    # -- network --------------------------------------------------------------------------------
    def forward(self, w: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted velocity [B, T, D].

        w: point on the path [B, T, D]; t: [B] flow time; context: [B, T, D] prompt latent on the
        prompt frames, zeros elsewhere; cond: [B, T, D] v1 (explicit chain only); mask: BoolTensor
        [B, T], True on real frames (None = all real).
        """
        B, T, _ = w.shape
        keep = torch.ones(B, T, dtype=torch.bool, device=w.device) if mask is None else mask
        parts = [w, context] + ([cond] if self.cfg.chain == "explicit" else [])
        h = self.in_proj(torch.cat(parts, dim=-1)) + _sinusoid(torch.arange(T, device=w.device), self.cfg.dim)
        # times are scaled so the sinusoid's fastest frequencies resolve steps of 1/16 and finer
        temb = self.time_mlp(_sinusoid(t * 1000.0, self.cfg.dim))
        for block in self.blocks:
            h = block(h, temb, keep)
        return self.out(h)

    def velocity(self, w, t, context, cond=None, mask=None, guidance: float = 0.0) -> torch.Tensor:
        """``forward`` with classifier-free guidance: (1 + g) v(context) - g v(no context)."""
        v = self(w, t, context, cond, mask)
        if guidance > 0:
            v = (1 + guidance) * v - guidance * self(w, t, torch.zeros_like(context), cond, mask)
        return v

    # -- training -------------------------------------------------------------------------------
    def loss(self, x1: torch.Tensor, v1: torch.Tensor, mask: torch.Tensor, prompt_len: torch.Tensor | None = None,
             generator: torch.Generator | None = None, return_parts: bool = False):
        """Flow-matching MSE on the non-prompt frames.

        x1: raw latents [B, T, D]; v1: raw RVQ-1 latents [B, T, D]; mask: BoolTensor [B, T];
        prompt_len: LongTensor [B] prompt-prefix frames (None = drawn uniformly from
        [0, min(max_prompt_frames, length - 1)]). Returns the scalar loss (and, with
        ``return_parts``, a dict of the intermediate tensors for tests).
        """
        B, T, D = x1.shape
        dev = x1.device
        m = mask[..., None].float()
        x1n, v1n = self.normalize(x1) * m, self.normalize(v1) * m
        lengths = mask.sum(1)
        if prompt_len is None:
            hi = torch.clamp(torch.minimum(lengths - 1, torch.full_like(lengths, self.cfg.max_prompt_frames)), min=0)
            u = torch.rand(B, generator=generator).to(dev)
            prompt_len = (u * (hi + 1).float()).long().clamp(max=hi)
        prompt = torch.arange(T, device=dev)[None] < prompt_len.to(dev)[:, None]  # [B, T]
        noise = torch.randn(B, T, D, generator=generator).to(dev)
        t = torch.rand(B, generator=generator).to(dev)
        x0 = prior(self.cfg.chain, v1n, noise)
        w, target = path_and_velocity(x0, flow_target(self.cfg.chain, x1n, v1n), t)
        context = x1n * prompt[..., None]
        if self.training and self.cfg.cfg_dropout > 0:
            drop = torch.rand(B, generator=generator).to(dev) < self.cfg.cfg_dropout
            context = context * (~drop)[:, None, None]
        pred = self(w, t, context, v1n if self.cfg.chain == "explicit" else None, mask)
        scored = mask & ~prompt
        if not scored.any():
            raise ValueError("every frame of the batch is padding or prompt; utterances need >= 2 frames")
        loss = ((pred - target) ** 2).mean(-1)[scored].mean()
        if return_parts:
            return loss, {"x0": x0, "w": w, "target": target, "t": t, "prompt": prompt, "scored": scored,
                          "context": context, "pred": pred}
        return loss

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, v1: torch.Tensor, prompt_latent: torch.Tensor | None = None,
                   prompt_v1: torch.Tensor | None = None, *, steps: int | None = None, solver: str | None = None,
                   guidance: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent for the target frames.

        v1: raw RVQ-1 latents [T, D] of the target; prompt_latent / prompt_v1: the prompt utterance's
        full latent and RVQ-1 latent [Tp, D] (both or neither). Returns the raw latent [T, D].
        Defaults for steps / solver / guidance come from the config.
        """
        cfg = self.cfg
        steps, solver = steps or cfg.steps, solver or cfg.solver
        guidance = cfg.guidance if guidance is None else guidance
        dev = self.latent_mean.device
        T, D = v1.shape
        if (prompt_latent is None) != (prompt_v1 is None):
            raise ValueError("pass both prompt_latent and prompt_v1, or neither")
        if prompt_latent is None:
            prompt_latent = prompt_v1 = torch.zeros(0, D)
        Tp = prompt_latent.shape[0]
        v1n = self.normalize(torch.cat([prompt_v1, v1]).float().to(dev))[None]  # [1, Tp + T, D]
        context = torch.cat([self.normalize(prompt_latent.float().to(dev)), torch.zeros(T, D, device=dev)])[None]
        x0 = prior(cfg.chain, v1n, torch.randn(1, Tp + T, D, generator=generator).to(dev))
        cond = v1n if cfg.chain == "explicit" else None

        def field_fn(x: torch.Tensor, t: float) -> torch.Tensor:
            return self.velocity(x, torch.full((1,), t, device=dev), context, cond, None, guidance)

        y = integrate(field_fn, x0, steps, solver)
        latent = y if cfg.chain == "implicit" else y + v1n
        return self.denormalize(latent[0, Tp:]).cpu()

    @torch.no_grad()
    def render(self, codec, first: torch.Tensor, prompt: torch.Tensor, *, seed: int = 0, **kw) -> np.ndarray:
        """RVQ-1 codes [T] + prompt codes [n_q, Tp] -> waveform float32 through ``codec.decode_latent``."""
        first = torch.as_tensor(first).long().cpu()
        if first.numel() == 0:
            return np.zeros(0, dtype=np.float32)
        prompt = torch.as_tensor(prompt).long().cpu()
        gen = torch.Generator().manual_seed(seed)
        latent = self.synthesize(codec.semantic_latent(first), codec.latent(prompt), codec.semantic_latent(prompt),
                                 generator=gen, **kw)
        return codec.decode_latent(latent)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "flow.safetensors"))
        (path / "flow.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "FlowModel":
        path = Path(path)
        if not (path / "flow.json").is_file():
            raise ValueError(f"{path} holds no flow model (flow.json missing)")
        model = cls(FlowConfig(**json.loads((path / "flow.json").read_text())))
        model.load_state_dict(load_file(str(path / "flow.safetensors")))
        return model.eval()


def flow_batch(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad (x1 [T_i, D], v1 [T_i, D]) pairs -> x1 [B, T, D], v1 [B, T, D], mask BoolTensor [B, T]."""
    T = max(x.shape[0] for x, _ in items)
    D = items[0][0].shape[1]
    x1 = torch.zeros(len(items), T, D)
    v1 = torch.zeros(len(items), T, D)
    mask = torch.zeros(len(items), T, dtype=torch.bool)
    for i, (x, v) in enumerate(items):
        x1[i, : len(x)] = x
        v1[i, : len(v)] = v
        mask[i, : len(x)] = True
    return x1, v1, mask
