"""Base stages: how the round-0 policy is made.

The loop only needs a policy directory in ``round_000/policy``; a base stage is any function
``(ctx, out_dir) -> None`` that writes one. ``sft`` (here) trains the AR codec LM and the NAR model
by teacher forcing on golden tokens; later base stages (SpeechGPT, SpeechGPT-Gen) register beside it
in ``BASE_STAGES``.
"""
from __future__ import annotations

import logging
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.base")


@dataclass
class BaseConfig:
    """Round 0: which base stage builds the starting policy, and its training budget."""

    stage: str = field(default="sft", metadata={"help": "base stage: sft (AR + NAR teacher forcing)"})
    steps: int = field(default=1500, metadata={"help": "AR optimiser steps"})
    batch_size: int = field(default=16, metadata={"help": "AR sequences per step"})
    lr: float = field(default=2e-3, metadata={"help": "AR peak learning rate (AdamW, cosine, warm-up)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    nar_steps: int = field(default=800, metadata={"help": "NAR optimiser steps (0 = no NAR; needs codec.n_q == 1)"})
    nar_batch_size: int = field(default=16, metadata={"help": "NAR utterances per step"})
    nar_lr: float = field(default=1e-3, metadata={"help": "NAR peak learning rate"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    log_every: int = field(default=100, metadata={"help": "log the running loss every N steps"})

    def __post_init__(self):
        if self.stage not in BASE_STAGES:
            raise ValueError(f"base.stage={self.stage!r} unknown; registered base stages: {sorted(BASE_STAGES)}")
        for key in ("steps", "batch_size", "nar_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"base.{key}={getattr(self, key)} must be >= 1")
        if self.nar_steps < 0:
            raise ValueError(f"base.nar_steps={self.nar_steps} must be >= 0")
        if not (self.lr > 0 and self.nar_lr > 0):
            raise ValueError("base.lr and base.nar_lr must be > 0")


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} loss became {loss.item()} at step {step}; lower the learning rate "
                                 "(base.lr / base.nar_lr) or check the data. Nothing was saved.")


def _examples(ctx: "Context", salt: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(text, golden codes [n_q, T], prompt codes [n_q, Tp]) for every training utterance."""
    train = ctx.splits.train
    out = []
    for u in train:
        p = ctx.prompt_for(u, train, salt)
        out.append((u.text, ctx.codes(u), ctx.codes(p)))
    return out


def sft_base(ctx: "Context", out_dir: Path) -> dict:
    """Train the AR policy and the NAR model on golden tokens; write ``out_dir`` (a policy dir)."""
    from tqdm import tqdm

    from models.codec_lm import (Policy, build_lm, build_tokenizer, completion_str, policy_meta, prompt_str,
                                 text_to_tokens)
    from models.nar import NARConfig, NARModel, cosine_lr, nar_batch

    cfg, bcfg = ctx.cfg, ctx.cfg.base
    codec = ctx.codec
    tok = build_tokenizer(codec.codebook_size)
    from tqdm import tqdm as _tqdm

    examples = [(t, c, p) for t, c, p in _tqdm(_examples(ctx, 0), desc="golden tokens", leave=False)]
    n_prompt = max(1, int(round(cfg.policy.prompt_seconds * codec.frame_rate)))
    chars = sum(len(text_to_tokens(t).replace(" ", "")) for t, _, _ in examples)
    frames = sum(c.shape[1] for _, c, _ in examples)
    frames_per_char = frames / max(1, chars)

    # -- AR: loss on the speech part only (the text and prompt are given at inference) --
    seqs = []
    for text, codes, prompt in examples:
        p_ids = tok(prompt_str(prompt[0, :n_prompt], text), add_special_tokens=False)["input_ids"]
        c_ids = tok(completion_str(codes[0]), add_special_tokens=False)["input_ids"]
        seqs.append((p_ids, c_ids))
    max_len = max(len(p) + len(c) for p, c in seqs)
    lm = build_lm(cfg.policy.size, len(tok), max(2048, max_len + 64), cfg.seed).to(ctx.device)
    log.info("base sft: %d examples, AR %.2fM params, longest sequence %d tokens", len(seqs),
             sum(p.numel() for p in lm.parameters()) / 1e6, max_len)
    opt = torch.optim.AdamW(lm.parameters(), lr=bcfg.lr, weight_decay=bcfg.weight_decay, betas=(0.9, 0.98))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    lm.train()
    running, history = 0.0, []
    bar = tqdm(range(bcfg.steps), desc="base AR sft", leave=False)
    for step in bar:
        if len(order) < bcfg.batch_size:
            idx = list(range(len(seqs)))
            rng.shuffle(idx)
            order += idx
        batch = [seqs[i] for i in order[: bcfg.batch_size]]
        del order[: bcfg.batch_size]
        L = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), L), dtype=torch.long)
        for i, (p, c) in enumerate(batch):  # right padding for training
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
            attn[i, : len(p) + len(c)] = 1
        for g in opt.param_groups:
            g["lr"] = bcfg.lr * cosine_lr(step, bcfg.steps, bcfg.warmup_steps)
        out = lm(input_ids=ids.to(ctx.device), attention_mask=attn.to(ctx.device), labels=labels.to(ctx.device))
        _check_finite(out.loss, "base AR", step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), bcfg.grad_clip)
        opt.step()
        running = out.loss.item() if step == 0 else 0.98 * running + 0.02 * out.loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % bcfg.log_every == 0 or step + 1 == bcfg.steps:
            log.info("base AR step %d/%d loss %.4f", step + 1, bcfg.steps, running)
            history.append({"step": step + 1, "ar_loss": running})
    lm.eval()

    # -- NAR: levels 2..n_q from level 1 and the prompt --
    nar = None
    nar_loss = None
    if codec.n_q > 1:
        if bcfg.nar_steps == 0:
            raise ValueError(f"codec.n_q={codec.n_q} needs a NAR model: set base.nar_steps > 0")
        torch.manual_seed(cfg.seed + 1)
        ncfg = NARConfig.named(cfg.policy.nar_size, codec.n_q, codec.codebook_size)
        ncfg.max_frames = max(ncfg.max_frames, n_prompt + max(c.shape[1] for _, c, _ in examples) + 8)
        nar = NARModel(ncfg).to(ctx.device)
        nopt = torch.optim.AdamW(nar.parameters(), lr=bcfg.nar_lr, weight_decay=bcfg.weight_decay)
        order = []
        running = 0.0
        bar = tqdm(range(bcfg.nar_steps), desc="base NAR", leave=False)
        for step in bar:
            if len(order) < bcfg.nar_batch_size:
                idx = list(range(len(examples)))
                rng.shuffle(idx)
                order += idx
            batch = [examples[i] for i in order[: bcfg.nar_batch_size]]
            del order[: bcfg.nar_batch_size]
            prompt, target, pm, tm = nar_batch([(p[:, :n_prompt], c) for _, c, p in batch])
            level = rng.randint(2, codec.n_q)
            for g in nopt.param_groups:
                g["lr"] = bcfg.nar_lr * cosine_lr(step, bcfg.nar_steps, min(bcfg.warmup_steps, bcfg.nar_steps // 10))
            loss = nar.loss(prompt.to(ctx.device), target.to(ctx.device), pm.to(ctx.device), tm.to(ctx.device), level)
            _check_finite(loss, "base NAR", step)
            nopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nar.parameters(), bcfg.grad_clip)
            nopt.step()
            running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
            if (step + 1) % bcfg.log_every == 0 or step + 1 == bcfg.nar_steps:
                log.info("base NAR step %d/%d loss %.4f", step + 1, bcfg.nar_steps, running)
        nar_loss = running
        nar.eval()

    policy = Policy(lm=lm.cpu(), tokenizer=tok, nar=nar.cpu() if nar is not None else None, codec=codec,
                    meta=policy_meta(cfg.policy, frames_per_char))
    policy.save(out_dir)
    return {"ar_loss": history[-1]["ar_loss"] if history else None, "nar_loss": nar_loss,
            "frames_per_char": frames_per_char, "examples": len(seqs), "history": history}


def pretrained_base(ctx: "Context", out_dir: Path) -> dict:
    """Start from ``policy.pretrained`` (a policy directory) as round 0."""
    src = Path(ctx.cfg.policy.pretrained)
    if not (src / "speechalign.json").is_file():
        raise ValueError(f"policy.pretrained={src} is not a policy directory (speechalign.json missing)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    tmp.rename(out_dir)
    return {"copied_from": str(src)}


# name -> function(ctx, out_dir) -> stats. SpeechGPT / SpeechGPT-Gen base stages register here.
BASE_STAGES: dict[str, Callable] = {"sft": sft_base}


def run_base_stage(ctx: "Context", out_dir: Path) -> dict:
    if ctx.cfg.policy.pretrained:
        return pretrained_base(ctx, out_dir)
    return BASE_STAGES[ctx.cfg.base.stage](ctx, out_dir)
