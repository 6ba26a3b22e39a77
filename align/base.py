"""Base stages: how the round-0 policy is made.

The loop only needs a policy directory in ``round_000/policy``; a base stage is any function
``(ctx, out_dir) -> None`` that writes one. ``sft`` (here) trains the AR codec LM and the NAR model
by teacher forcing on golden tokens; later base stages (SpeechGPT, SpeechGPT-Gen) register beside it
in ``BASE_STAGES``.
"""
from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from align.speechgpt_gen import speechgpt_gen_base
from align.speechgpt import SpeechGPTConfig

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.base")


@dataclass
class BaseConfig:
    """Round 0: which base stage builds the starting policy, and its training budget."""

    stage: str = field(default="sft", metadata={
        "help": "base stage: sft (AR + NAR teacher forcing), speechgpt (three-stage unit LM, see speechgpt:) "
                "or speechgpt_gen (AR + flow-matching renderer)"})
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
    speechgpt: SpeechGPTConfig = field(default_factory=SpeechGPTConfig, metadata={
        "help": "stage=speechgpt: units, model size, the three stages' budgets, LoRA (align/speechgpt.py)"})

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


def _fit(name: str, model: torch.nn.Module, loss_fn: Callable[[list[int]], torch.Tensor], *, n_items: int,
         batch_size: int, steps: int, lr: float, warmup: int, betas: tuple[float, float], bcfg: BaseConfig,
         rng: random.Random, accelerator=None) -> tuple[float, list[dict]]:
    """AdamW over shuffled mini-batches of item indices, warm-up then cosine; stops on a non-finite loss.

    With an ``accelerate.Accelerator`` running several processes, each takes its share of every
    batch (all draw the same seeded order) and gradients are averaged across them before the step,
    so the update equals the single-process one on the whole batch.
    Returns the smoothed final loss and a history row every ``bcfg.log_every`` steps.
    """
    from tqdm import tqdm

    from models.nar import cosine_lr

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=bcfg.weight_decay, betas=betas)
    order: list[int] = []
    running, history = 0.0, []
    model.train()
    bar = tqdm(range(steps), desc=name, leave=False)
    for step in bar:
        if len(order) < batch_size:  # epochs of a seeded shuffle, no sample repeated within one
            idx = list(range(n_items))
            rng.shuffle(idx)
            order += idx
        batch = order[:batch_size]
        del order[:batch_size]
        if accelerator is not None and accelerator.num_processes > 1:
            batch = batch[accelerator.process_index::accelerator.num_processes]
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps, warmup)
        loss = loss_fn(batch)
        _check_finite(loss, name, step)
        opt.zero_grad(set_to_none=True)
        if accelerator is None:
            loss.backward()
        else:
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
        torch.nn.utils.clip_grad_norm_(model.parameters(), bcfg.grad_clip)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % bcfg.log_every == 0 or step + 1 == steps:
            log.info("%s step %d/%d loss %.4f", name, step + 1, steps, running)
            history.append({"step": step + 1, "loss": running})
    model.eval()
    return running, history


def _examples(ctx: "Context", salt: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(text, golden codes [n_q, T], prompt codes [n_q, Tp]) for every training utterance."""
    from tqdm import tqdm

    train = ctx.splits.train
    out = []
    for u in tqdm(train, desc="golden tokens", leave=False):
        p = ctx.prompt_for(u, train, salt)
        out.append((u.text, ctx.codes(u), ctx.codes(p)))
    return out


def train_ar(ctx: "Context", examples: list, rng: random.Random, device: str | None = None,
             accelerator=None) -> tuple[torch.nn.Module, object, dict]:
    """The AR codec LM: text + prompt RVQ-1 -> RVQ-1 by teacher forcing (loss on the speech part only).

    examples: ``_examples(ctx, salt)`` rows. Returns (lm on ``device``, tokenizer, stats with ar_loss,
    history, frames_per_char, examples). Shared by every base stage that trains the AR half.
    """
    from models.codec_lm import build_lm, build_tokenizer, completion_str, prompt_str, text_length

    cfg, bcfg = ctx.cfg, ctx.cfg.base
    device = device or ctx.device
    codec = ctx.codec
    tok = build_tokenizer(codec.codebook_size)
    n_prompt = max(1, int(round(cfg.policy.prompt_seconds * codec.frame_rate)))
    frontend = cfg.policy.text_frontend
    chars = sum(text_length(t, frontend) for t, _, _ in examples)
    frames = sum(c.shape[1] for _, c, _ in examples)
    frames_per_char = frames / max(1, chars)

    seqs = []
    for text, codes, prompt in examples:
        p_ids = tok(prompt_str(prompt[0, :n_prompt], text, frontend), add_special_tokens=False)["input_ids"]
        c_ids = tok(completion_str(codes[0]), add_special_tokens=False)["input_ids"]
        seqs.append((p_ids, c_ids))
    max_len = max(len(p) + len(c) for p, c in seqs)
    lm = build_lm(cfg.policy.size, len(tok), max(2048, max_len + 64), cfg.seed).to(device)
    log.info("base AR: %d examples, %.2fM params, longest sequence %d tokens", len(seqs),
             sum(p.numel() for p in lm.parameters()) / 1e6, max_len)

    def ar_loss(batch: list[int]) -> torch.Tensor:
        items = [seqs[i] for i in batch]
        L = max(len(p) + len(c) for p, c in items)
        ids = torch.full((len(items), L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), L), -100, dtype=torch.long)
        attn = torch.zeros((len(items), L), dtype=torch.long)
        for i, (p, c) in enumerate(items):  # right padding for training
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
            attn[i, : len(p) + len(c)] = 1
        return lm(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss

    ar_final, history = _fit("base AR", lm, ar_loss, n_items=len(seqs), batch_size=bcfg.batch_size,
                             steps=bcfg.steps, lr=bcfg.lr, warmup=bcfg.warmup_steps, betas=(0.9, 0.98),
                             bcfg=bcfg, rng=rng, accelerator=accelerator)
    return lm, tok, {"ar_loss": ar_final, "history": history, "frames_per_char": frames_per_char,
                     "examples": len(seqs)}


def sft_base(ctx: "Context", out_dir: Path) -> dict:
    """Train the AR policy and the NAR model on golden tokens; write ``out_dir`` (a policy dir)."""
    from models.codec_lm import Policy, policy_meta
    from models.nar import NARConfig, build_nar, nar_batch

    cfg, bcfg = ctx.cfg, ctx.cfg.base
    codec = ctx.codec
    examples = _examples(ctx, 0)
    n_prompt = max(1, int(round(cfg.policy.prompt_seconds * codec.frame_rate)))
    rng = random.Random(cfg.seed)
    lm, tok, ar_stats = train_ar(ctx, examples, rng)
    frames_per_char = ar_stats["frames_per_char"]

    # -- NAR: levels 2..n_q from level 1 and the prompt --
    nar = None
    nar_loss = None
    if codec.n_q > 1:
        if bcfg.nar_steps == 0:
            raise ValueError(f"codec.n_q={codec.n_q} needs a NAR model: set base.nar_steps > 0")
        torch.manual_seed(cfg.seed + 1)
        ncfg = NARConfig.named(cfg.policy.nar_size, codec.n_q, codec.codebook_size, kind=cfg.policy.nar_type)
        ncfg.max_frames = max(ncfg.max_frames, n_prompt + max(c.shape[1] for _, c, _ in examples) + 8)
        nar = build_nar(ncfg).to(ctx.device)

        def nar_step_loss(batch: list[int]) -> torch.Tensor:
            prompt, target, pm, tm = nar_batch([(examples[i][2][:, :n_prompt], examples[i][1]) for i in batch])
            level = rng.randint(2, codec.n_q)  # one random level per step: each level is its own task
            return nar.loss(prompt.to(ctx.device), target.to(ctx.device), pm.to(ctx.device), tm.to(ctx.device), level)

        nar_loss, _ = _fit("base NAR", nar, nar_step_loss, n_items=len(examples), batch_size=bcfg.nar_batch_size,
                           steps=bcfg.nar_steps, lr=bcfg.nar_lr, warmup=min(bcfg.warmup_steps, bcfg.nar_steps // 10),
                           betas=(0.9, 0.999), bcfg=bcfg, rng=rng)

    policy = Policy(lm=lm.cpu(), tokenizer=tok, nar=nar.cpu() if nar is not None else None, codec=codec,
                    meta=policy_meta(cfg.policy, frames_per_char))
    policy.save(out_dir)
    return {"ar_loss": ar_stats["ar_loss"], "nar_loss": nar_loss, "frames_per_char": frames_per_char,
            "examples": ar_stats["examples"], "history": ar_stats["history"]}


def pretrained_base(ctx: "Context", out_dir: Path) -> dict:
    """Start from ``policy.pretrained`` (a policy directory) as round 0."""
    src = Path(ctx.cfg.policy.pretrained)
    if not (src / "speechalign.json").is_file():
        raise ValueError(f"policy.pretrained={src} is not a policy directory (speechalign.json missing)")
    from align.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return {"copied_from": str(src)}


def speechgpt_base(ctx: "Context", out_dir: Path) -> dict:
    """SpeechGPT's three training stages (align/speechgpt.py); round 0 = its stage-2 or stage-3 model."""
    from align.speechgpt import speechgpt_base as run

    return run(ctx, out_dir)


# name -> function(ctx, out_dir) -> stats. Other base stages register here.
BASE_STAGES: dict[str, Callable] = {"sft": sft_base, "speechgpt": speechgpt_base,
                                    "speechgpt_gen": speechgpt_gen_base}


def run_base_stage(ctx: "Context", out_dir: Path) -> dict:
    if ctx.cfg.policy.pretrained:
        return pretrained_base(ctx, out_dir)
    return BASE_STAGES[ctx.cfg.base.stage](ctx, out_dir)
