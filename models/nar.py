"""Non-autoregressive models for the acoustic codebooks: RVQ 2..n_q from RVQ-1 and a voice prompt.

The AR policy writes RVQ-1; a NAR model fills the finer levels. Two kinds share one interface
(``loss(prompt, target, prompt_mask, target_mask, level)``, ``generate(prompt, first)``,
``save``/``load``), chosen by ``NARConfig.kind`` (``policy.nar_type`` in a run config):

* ``vall_e``: one level at a time, all frames at once (VALL-E): to predict level q it sees the
  prompt's full codes and the target's levels < q.
* ``soundstorm``: masked-token prediction (SoundStorm, the NAR the SpeechAlign paper used): level
  q is partly masked with a cosine schedule, levels > q fully masked; decoding fills each level by
  a few rounds of confidence-based unmasking.

It is trained once in the base stage and carried unchanged from round to round: DPO aligns the
AR policy only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

NAR_KINDS = ("vall_e", "soundstorm")


@dataclass
class NARConfig:
    """Shape of the NAR model; ``n_q`` and ``codebook_size`` come from the codec."""

    n_q: int = field(default=4, metadata={"help": "codebooks of the codec (levels 2..n_q are predicted)"})
    codebook_size: int = field(default=256, metadata={"help": "entries per codebook"})
    dim: int = field(default=128, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "transformer layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    ffn: int = field(default=512, metadata={"help": "feed-forward width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout (0 keeps tiny CPU runs deterministic)"})
    max_frames: int = field(default=2048, metadata={"help": "longest prompt + target in frames"})
    kind: str = field(default="vall_e", metadata={
        "help": "vall_e: level-by-level greedy NAR; soundstorm: masked-token NAR with iterative decoding"})
    decode_steps: int = field(default=8, metadata={
        "help": "soundstorm: unmasking rounds for level 2; finer levels take one round (as in SoundStorm)"})

    def __post_init__(self):
        if self.kind not in NAR_KINDS:
            raise ValueError(f"NAR kind {self.kind!r} unknown; choose one of {NAR_KINDS}")
        if self.decode_steps < 1:
            raise ValueError(f"NAR decode_steps={self.decode_steps} must be >= 1")

    @classmethod
    def named(cls, size: str, n_q: int, codebook_size: int, kind: str = "vall_e") -> "NARConfig":
        sizes = {"tiny": dict(dim=128, layers=4, heads=4, ffn=512),
                 "base": dict(dim=384, layers=8, heads=6, ffn=1536),
                 "paper": dict(dim=1024, layers=12, heads=16, ffn=4096)}
        if size not in sizes:
            raise ValueError(f"NAR size {size!r} unknown; choose one of {sorted(sizes)}")
        return cls(n_q=n_q, codebook_size=codebook_size, kind=kind, **sizes[size])


class NARModel(nn.Module):
    """Predicts codebook level q (1-based q >= 2) for every target frame.

    Inputs per frame: the sum of code embeddings of levels < q (target) or of all levels (prompt),
    plus a segment embedding (prompt / target), a learned position and the level-q embedding.
    """

    def __init__(self, cfg: NARConfig):
        super().__init__()
        self.cfg = cfg
        self.code_embed = nn.ModuleList(nn.Embedding(cfg.codebook_size, cfg.dim) for _ in range(cfg.n_q))
        self.level_embed = nn.Embedding(cfg.n_q, cfg.dim)
        self.segment_embed = nn.Embedding(2, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_frames, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ffn, cfg.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.codebook_size) for _ in range(cfg.n_q - 1))

    def _embed_levels(self, codes: torch.Tensor, n_levels: int) -> torch.Tensor:
        """codes: LongTensor [B, >=n_levels, T] -> FloatTensor [B, T, dim] (sum of the first n_levels)."""
        out = 0
        for lvl in range(n_levels):
            out = out + self.code_embed[lvl](codes[:, lvl])
        return out

    def forward(self, prompt: torch.Tensor, target: torch.Tensor, level: int,
                prompt_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Logits for level ``level`` (1-based, >= 2) on the target frames.

        prompt: LongTensor [B, n_q, Tp]; target: LongTensor [B, >=level-1, T];
        prompt_mask / target_mask: BoolTensor [B, Tp] / [B, T], True on real frames.
        Returns FloatTensor [B, T, codebook_size].
        """
        if not 2 <= level <= self.cfg.n_q:
            raise ValueError(f"level must be in [2, {self.cfg.n_q}], got {level}")
        B, _, Tp = prompt.shape
        T = target.shape[-1]
        if Tp + T > self.cfg.max_frames:
            raise ValueError(f"prompt + target = {Tp + T} frames exceeds nar max_frames={self.cfg.max_frames}")
        x = torch.cat([self._embed_levels(prompt, self.cfg.n_q) + self.segment_embed.weight[0],
                       self._embed_levels(target, level - 1) + self.segment_embed.weight[1]], dim=1)
        x = x + self.pos_embed(torch.arange(Tp + T, device=x.device)) + self.level_embed.weight[level - 1]
        keep = torch.cat([prompt_mask, target_mask], dim=1)
        h = self.encoder(x, src_key_padding_mask=~keep)
        return self.heads[level - 2](self.norm(h[:, Tp:]))

    def loss(self, prompt, target, prompt_mask, target_mask, level: int) -> torch.Tensor:
        """Cross-entropy of level ``level`` on real target frames. target: LongTensor [B, n_q, T]."""
        logits = self(prompt, target, level, prompt_mask, target_mask)
        labels = target[:, level - 1].masked_fill(~target_mask, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Greedy fill of levels 2..n_q for one utterance.

        prompt: LongTensor [n_q, Tp]; first: LongTensor [T] (RVQ-1) -> LongTensor [n_q, T].
        """
        T = first.shape[0]
        codes = torch.zeros(self.cfg.n_q, T, dtype=torch.long, device=first.device)
        codes[0] = first
        if T == 0:
            return codes
        pm = torch.ones(1, prompt.shape[-1], dtype=torch.bool, device=first.device)
        tm = torch.ones(1, T, dtype=torch.bool, device=first.device)
        for level in range(2, self.cfg.n_q + 1):
            logits = self(prompt[None], codes[None, : level - 1], level, pm, tm)
            codes[level - 1] = logits[0].argmax(-1)
        return codes

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "nar.safetensors"))
        (path / "nar.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "NARModel":
        path = Path(path)
        model = cls(NARConfig(**json.loads((path / "nar.json").read_text())))
        model.load_state_dict(load_file(str(path / "nar.safetensors")))
        return model.eval()


class MaskedNARModel(nn.Module):
    """SoundStorm-style masked NAR: predicts the masked tokens of level q (1-based q >= 2).

    Inputs per frame: the sum over all levels of code embeddings, where a level's table has one
    extra entry (index ``codebook_size``) for [MASK]; target levels < q are given, level q is
    partly masked, levels > q are all masked; the prompt gives every level. Plus a segment
    embedding, a learned position and the level-q embedding.
    """

    def __init__(self, cfg: NARConfig):
        super().__init__()
        self.cfg = cfg
        self.mask_id = cfg.codebook_size
        self.code_embed = nn.ModuleList(nn.Embedding(cfg.codebook_size + 1, cfg.dim) for _ in range(cfg.n_q))
        self.level_embed = nn.Embedding(cfg.n_q, cfg.dim)
        self.segment_embed = nn.Embedding(2, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_frames, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.ffn, cfg.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.codebook_size) for _ in range(cfg.n_q - 1))

    def forward(self, prompt: torch.Tensor, target: torch.Tensor, level: int,
                prompt_mask: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Logits for level ``level`` on the target frames.

        prompt: LongTensor [B, n_q, Tp]; target: LongTensor [B, n_q, T] with ``mask_id`` where
        masked; masks: BoolTensor [B, Tp] / [B, T]. Returns FloatTensor [B, T, codebook_size].
        """
        if not 2 <= level <= self.cfg.n_q:
            raise ValueError(f"level must be in [2, {self.cfg.n_q}], got {level}")
        Tp, T = prompt.shape[-1], target.shape[-1]
        if Tp + T > self.cfg.max_frames:
            raise ValueError(f"prompt + target = {Tp + T} frames exceeds nar max_frames={self.cfg.max_frames}")
        codes = torch.cat([prompt, target], dim=2)
        x = sum(self.code_embed[q](codes[:, q]) for q in range(self.cfg.n_q))
        segment = torch.cat([torch.zeros(Tp, dtype=torch.long), torch.ones(T, dtype=torch.long)]).to(x.device)
        x = x + self.segment_embed(segment) + self.pos_embed(torch.arange(Tp + T, device=x.device))
        x = x + self.level_embed.weight[level - 1]
        keep = torch.cat([prompt_mask, target_mask], dim=1)
        h = self.encoder(x, src_key_padding_mask=~keep)
        return self.heads[level - 2](self.norm(h[:, Tp:]))

    def mask_for_training(self, target: torch.Tensor, target_mask: torch.Tensor, level: int,
                          u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine-schedule masking of level ``level``; levels above it fully masked.

        target: LongTensor [B, n_q, T]; u: [B] in [0, 1) (drawn when None) sets the masked share
        cos(pi/2 u) of each utterance's real frames (at least one). Returns (masked input [B, n_q, T],
        BoolTensor [B, T] of the level-``level`` positions to predict).
        """
        B, _, T = target.shape
        u = torch.rand(B) if u is None else u
        n_mask = (torch.cos(0.5 * math.pi * u) * target_mask.sum(1).float()).ceil().clamp(min=1).long()
        scores = torch.rand(B, T).masked_fill(~target_mask.cpu(), 2.0)  # padding is never picked
        rank = scores.argsort(1).argsort(1).to(target.device)
        chosen = (rank < n_mask.to(target.device)[:, None]) & target_mask
        inp = target.clone()
        inp[:, level:] = self.mask_id
        inp[:, level - 1] = inp[:, level - 1].masked_fill(chosen, self.mask_id)
        return inp, chosen

    def loss(self, prompt, target, prompt_mask, target_mask, level: int) -> torch.Tensor:
        """Cross-entropy on the masked level-``level`` tokens. target: LongTensor [B, n_q, T]."""
        inp, chosen = self.mask_for_training(target, target_mask, level)
        logits = self(prompt, inp, level, prompt_mask, target_mask)
        labels = target[:, level - 1].masked_fill(~chosen, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Iterative confidence-based decoding of levels 2..n_q (greedy) for one utterance.

        Each round predicts every still-masked frame, keeps the most confident ones and re-masks the
        rest so that a cos(pi/2 * s/steps) share stays masked after round s.
        prompt: LongTensor [n_q, Tp]; first: LongTensor [T] (RVQ-1) -> LongTensor [n_q, T].
        """
        T = first.shape[0]
        codes = torch.full((self.cfg.n_q, T), self.mask_id, dtype=torch.long, device=first.device)
        codes[0] = first
        if T == 0:
            return codes
        pm = torch.ones(1, prompt.shape[-1], dtype=torch.bool, device=first.device)
        tm = torch.ones(1, T, dtype=torch.bool, device=first.device)
        for level in range(2, self.cfg.n_q + 1):
            steps = self.cfg.decode_steps if level == 2 else 1
            row = codes[level - 1]
            for s in range(steps):
                probs = self(prompt[None], codes[None], level, pm, tm)[0].softmax(-1)  # [T, K]
                conf, pred = probs.max(-1)
                masked = row == self.mask_id
                row = torch.where(masked, pred, row)
                remain = int(math.floor(T * math.cos(0.5 * math.pi * (s + 1) / steps)))
                if remain > 0:  # re-mask the least confident of this round's new tokens
                    conf = conf.masked_fill(~masked, float("inf"))
                    row[conf.argsort()[:remain]] = self.mask_id
                codes[level - 1] = row
        return codes

    save = NARModel.save

    @classmethod
    def load(cls, path: str | Path) -> "MaskedNARModel":
        return load_nar(path)


def build_nar(cfg: NARConfig) -> nn.Module:
    """The NAR model ``cfg.kind`` names (untrained)."""
    return MaskedNARModel(cfg) if cfg.kind == "soundstorm" else NARModel(cfg)


def load_nar(path: str | Path) -> nn.Module:
    """Rebuild a NAR model written by ``save`` (either kind; nar.json records which)."""
    path = Path(path)
    cfg = NARConfig(**json.loads((path / "nar.json").read_text()))
    model = build_nar(cfg)
    model.load_state_dict(load_file(str(path / "nar.safetensors")))
    return model.eval()


def nar_batch(items: list[tuple[torch.Tensor, torch.Tensor]]):
    """Pad (prompt [n_q, Tp], target [n_q, T]) pairs into a batch.

    Returns prompt [B, n_q, Tp], target [B, n_q, T], prompt_mask [B, Tp], target_mask [B, T].
    """
    n_q = items[0][0].shape[0]
    Tp = max(p.shape[1] for p, _ in items)
    T = max(t.shape[1] for _, t in items)
    B = len(items)
    prompt = torch.zeros(B, n_q, Tp, dtype=torch.long)
    target = torch.zeros(B, n_q, T, dtype=torch.long)
    pm = torch.zeros(B, Tp, dtype=torch.bool)
    tm = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, t) in enumerate(items):
        prompt[i, :, : p.shape[1]] = p
        target[i, :, : t.shape[1]] = t
        pm[i, : p.shape[1]] = True
        tm[i, : t.shape[1]] = True
    return prompt, target, pm, tm
