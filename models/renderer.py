"""The phone-conditioned renderer: RVQ-1 codes + each frame's text unit + a voice prompt -> codec latent.

The VALL-E-style NAR (models/nar.py) predicts one token per codebook level; on the embedded codec
those per-level choices do not add up to a coherent frame, and golden RVQ-1 through it lost most of
the words (where_wer_is_lost.md: WER 0.74 against 0.23 for the codec round trip). This renderer
regresses the continuous latent instead (the codec's dequantised latent, log-mel for mel_rvq) and the
policy quantises it through the codec, as SpeechGPT-Gen's perceptual model works on continuous
latents. It reads the interleaved layout's units (models/layout.py), so the content it renders is
the text's, at the durations and with the coarse spectra the AR policy chose.

Inputs per target frame: the RVQ-1 code, the unit, the units before and after it, and where the
frame sits in its unit (fraction, frames in, unit length); the voice prompt enters as its latent
frames ahead of the target, with a segment embedding. A bidirectional transformer encoder, an L1
loss on real frames.

It is trained on golden RVQ-1 but renders the AR's samples, whose codes are wrong where golden ones
are right; ``corrupt_codes`` replaces a fraction of the training codes by random ones, so that it
learns to take the content from the units where the codes disagree with them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.layout import TEXT_UNITS


@dataclass
class RendererConfig:
    """Shape of the renderer; ``latent_dim`` and ``codebook_size`` come from the codec."""

    latent_dim: int = field(default=128, metadata={"help": "width of the codec latent it predicts"})
    codebook_size: int = field(default=256, metadata={"help": "RVQ-1 entries"})
    n_units: int = field(default=len(TEXT_UNITS), metadata={"help": "text units (phones and letters)"})
    dim: int = field(default=192, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "transformer layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    ffn: int = field(default=768, metadata={"help": "feed-forward width"})
    max_frames: int = field(default=2048, metadata={"help": "longest prompt + target in frames"})

    @classmethod
    def named(cls, size: str, latent_dim: int, codebook_size: int) -> "RendererConfig":
        # tiny: 3.4M parameters, trained in minutes on 2 CPU cores; small: ~0.9M, the CI loop's (its committed round-0
        # policy, configs/ci_round0/, stays a few MB)
        sizes = {"small": dict(dim=128, layers=3, heads=4, ffn=512),
                 "tiny": dict(dim=192, layers=4, heads=4, ffn=768),
                 "base": dict(dim=384, layers=8, heads=6, ffn=1536),
                 "paper": dict(dim=1024, layers=12, heads=16, ffn=4096)}
        if size not in sizes:
            raise ValueError(f"renderer size {size!r} unknown; choose one of {sorted(sizes)}")
        return cls(latent_dim=latent_dim, codebook_size=codebook_size, **sizes[size])


def unit_context(unit_ids: torch.Tensor, unit_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame context of one utterance's units.

    unit_ids / unit_pos: LongTensor [T] (models.layout.split_stream). Returns (previous unit id [T],
    next unit id [T], features FloatTensor [T, 3]: fraction through the unit, frames into it / 20,
    unit length / 20). A missing neighbour is the id ``n_units`` (one extra embedding row).
    """
    T = len(unit_pos)
    if T == 0:
        return unit_ids, unit_ids, torch.zeros(0, 3)
    n_pos = int(unit_pos.max()) + 1
    length = torch.bincount(unit_pos, minlength=n_pos)
    first = torch.cumsum(length, 0) - length
    into = torch.arange(T) - first[unit_pos]
    ids_by_pos = torch.full((n_pos,), -1, dtype=torch.long)
    ids_by_pos[unit_pos] = unit_ids
    prev = torch.where(unit_pos > 0, ids_by_pos[(unit_pos - 1).clamp_min(0)], torch.tensor(-1))
    nxt = torch.where(unit_pos < n_pos - 1, ids_by_pos[(unit_pos + 1).clamp(max=n_pos - 1)], torch.tensor(-1))
    n = length[unit_pos].float()
    feats = torch.stack([(into.float() + 0.5) / n, into.float() / 20, n / 20], dim=1)
    return prev, nxt, feats


def corrupt_codes(codes: torch.Tensor, rate: float, codebook_size: int, generator: torch.Generator) -> torch.Tensor:
    """codes: LongTensor [T] -> [T], each code replaced with probability ``rate`` by a uniform draw from the
    codebook (which may be the same code). ``generator`` makes the draw reproducible."""
    if rate <= 0:
        return codes
    hit = torch.rand(codes.shape, generator=generator) < rate
    return torch.where(hit, torch.randint(0, codebook_size, codes.shape, generator=generator), codes)


class PhoneRenderer(nn.Module):
    """RVQ-1 + frame units + prompt latent -> codec latent per target frame."""

    def __init__(self, cfg: RendererConfig):
        super().__init__()
        self.cfg = cfg
        self.code_embed = nn.Embedding(cfg.codebook_size, cfg.dim)
        # one table per role (this, previous, next unit); row n_units = no neighbour
        self.unit_embed = nn.ModuleList(nn.Embedding(cfg.n_units + 1, cfg.dim) for _ in range(3))
        self.feature_proj = nn.Linear(3, cfg.dim)
        self.prompt_proj = nn.Linear(cfg.latent_dim, cfg.dim)
        self.segment_embed = nn.Embedding(2, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_frames, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ffn, 0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.latent_dim)

    def forward(self, prompt: torch.Tensor, codes: torch.Tensor, units: torch.Tensor, prev: torch.Tensor,
                nxt: torch.Tensor, feats: torch.Tensor, prompt_mask: torch.Tensor, target_mask: torch.Tensor
                ) -> torch.Tensor:
        """prompt: FloatTensor [B, Tp, D] (prompt latent); codes, units, prev, nxt: LongTensor [B, T]
        (neighbours -1 where none); feats: FloatTensor [B, T, 3]; masks: BoolTensor [B, Tp] / [B, T].
        Returns the predicted latent FloatTensor [B, T, D]."""
        Tp, T = prompt.shape[1], codes.shape[1]
        if Tp + T > self.cfg.max_frames:
            raise ValueError(f"prompt + target = {Tp + T} frames exceeds renderer max_frames={self.cfg.max_frames}")
        none = self.cfg.n_units
        x_t = (self.code_embed(codes) + self.unit_embed[0](units) + self.unit_embed[1](prev.masked_fill(prev < 0, none))
               + self.unit_embed[2](nxt.masked_fill(nxt < 0, none)) + self.feature_proj(feats)
               + self.segment_embed.weight[1])
        x_p = self.prompt_proj(prompt) + self.segment_embed.weight[0]
        x = torch.cat([x_p, x_t], dim=1) + self.pos_embed(torch.arange(Tp + T, device=codes.device))
        h = self.encoder(x, src_key_padding_mask=~torch.cat([prompt_mask, target_mask], dim=1))
        return self.head(self.norm(h[:, Tp:]))

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean L1 between predicted and target latent on real target frames (``renderer_batch`` dict)."""
        pred = self(batch["prompt"], batch["codes"], batch["units"], batch["prev"], batch["next"], batch["feats"],
                    batch["prompt_mask"], batch["target_mask"])
        err = (pred - batch["latent"]).abs().mean(-1)
        return err[batch["target_mask"]].mean()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, codes: torch.Tensor, unit_ids: torch.Tensor,
                 unit_pos: torch.Tensor) -> torch.Tensor:
        """One utterance. prompt: FloatTensor [Tp, D]; codes, unit_ids, unit_pos: LongTensor [T] -> latent [T, D]."""
        device = next(self.parameters()).device
        batch = renderer_batch([(prompt, codes, unit_ids, unit_pos, None)])
        batch = {k: v.to(device) for k, v in batch.items() if v is not None}
        return self(batch["prompt"], batch["codes"], batch["units"], batch["prev"], batch["next"], batch["feats"],
                    batch["prompt_mask"], batch["target_mask"])[0].cpu()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "renderer.safetensors"))
        (path / "renderer.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "PhoneRenderer":
        path = Path(path)
        model = cls(RendererConfig(**json.loads((path / "renderer.json").read_text())))
        model.load_state_dict(load_file(str(path / "renderer.safetensors")))
        return model.eval()


def renderer_batch(items: list[tuple]) -> dict:
    """Pad (prompt latent [Tp, D], codes [T], unit ids [T], unit positions [T], target latent [T, D] | None)
    rows into a batch dict of [B, ...] tensors (``latent`` None when no row has a target)."""
    B = len(items)
    Tp = max(p.shape[0] for p, *_ in items)
    T = max(len(c) for _, c, *_ in items)
    D = items[0][0].shape[1]
    out = {"prompt": torch.zeros(B, Tp, D), "codes": torch.zeros(B, T, dtype=torch.long),
           "units": torch.zeros(B, T, dtype=torch.long), "prev": torch.full((B, T), -1, dtype=torch.long),
           "next": torch.full((B, T), -1, dtype=torch.long), "feats": torch.zeros(B, T, 3),
           "prompt_mask": torch.zeros(B, Tp, dtype=torch.bool), "target_mask": torch.zeros(B, T, dtype=torch.bool),
           "latent": torch.zeros(B, T, D) if items[0][4] is not None else None}
    for i, (p, c, u, pos, lat) in enumerate(items):
        n = len(c)
        prev, nxt, feats = unit_context(u, pos)
        out["prompt"][i, : p.shape[0]] = p
        out["prompt_mask"][i, : p.shape[0]] = True
        out["codes"][i, :n], out["units"][i, :n], out["prev"][i, :n], out["next"][i, :n] = c, u, prev, nxt
        out["feats"][i, :n] = feats
        out["target_mask"][i, :n] = True
        if lat is not None:
            out["latent"][i, :n] = lat
    return out
