"""The one teacher-forcing loop every SFT-style stage uses, and the AR/NAR trainers built on it.

    examples = golden_examples(ctx, salt)                  # (text, golden codes, prompt codes) per train utt
    lm, tok, stats = train_ar(ctx, examples, rng)          # AR codec LM: text + prompt RVQ-1 -> RVQ-1
    nar, loss = train_nar(ctx, examples, rng)              # NAR: levels 2..n_q
    final, history = fit(name, model, loss_fn, ...)        # AdamW, warm-up + cosine, NaN guard
    final, history = sft_steps(policy, [(prompt, completion)], ...)   # continue-SFT of a policy

Base stages (align/base/) and the training methods (align/methods.py) import these; nothing here
imports a stage.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import TYPE_CHECKING, Callable

import torch

from models.codec import prompt_frames
from models.optim import cosine_lr

if TYPE_CHECKING:
    from align.config import BaseConfig
    from align.run import Context

log = logging.getLogger("speechalign.training")


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    """Stop a training loop loudly on a NaN/inf loss, before the optimiser spreads it into the weights."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} loss became {loss.item()} at step {step}; lower the learning rate "
                                 "(base.lr / base.nar_lr) or check the data. Nothing was saved.")


def fit(name: str, model: torch.nn.Module, loss_fn: Callable[[list[int]], torch.Tensor], *, n_items: int,
        batch_size: int, steps: int, lr: float, warmup: int, betas: tuple[float, float], bcfg: "BaseConfig",
        rng: random.Random, accelerator=None,
        weight_fn: Callable[[list[int]], int] | None = None) -> tuple[float, list[dict]]:
    """AdamW over shuffled mini-batches of item indices, warm-up then cosine; stops on a non-finite loss.

    ``loss_fn(batch indices) -> scalar loss``. ``bcfg`` gives weight decay, gradient clip and log interval.
    With an ``accelerate.Accelerator`` running several processes, each takes its share of every
    batch (all draw the same seeded order) and gradients are averaged across them before the step.
    ``weight_fn(batch indices) -> the number of terms loss_fn averages over`` (tokens, frames): each
    share's loss is scaled by its part of the whole batch's terms, so the averaged gradient is the
    single-process one on the whole batch (equal up to float sums), not a mean of unequal shares' means.
    Returns the smoothed final loss (of this process's shares) and a history row every ``bcfg.log_every`` steps.
    """
    from tqdm import tqdm

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
        scale = 1.0
        if accelerator is not None and accelerator.num_processes > 1:
            whole = batch
            batch = batch[accelerator.process_index::accelerator.num_processes]
            if weight_fn is not None:
                scale = accelerator.num_processes * weight_fn(batch) / max(1, weight_fn(whole))
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps, warmup)
        loss = loss_fn(batch)
        check_finite(loss, name, step)
        opt.zero_grad(set_to_none=True)
        if accelerator is None:
            loss.backward()
        else:
            accelerator.backward(loss * scale)
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


def right_pad(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) pairs -> right-padded (input_ids, labels, attention_mask), each [B, L].

    Labels are -100 outside the completion: the loss is on the speech part only.
    """
    L = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
        attn[i, : len(p) + len(c)] = 1
    return ids, labels, attn


def lm_loss(lm, seqs: list[tuple[list[int], list[int]]], pad_id: int, device: str, rule=None) -> torch.Tensor:
    """Teacher-forcing loss of a causal LM on (prompt, completion) id pairs, completion tokens only: the mean NLL
    under the full softmax, or with ``rule`` (models/walk.py ``EmitRule``) under what the policy may emit."""
    ids, labels, attn = right_pad(seqs, pad_id)
    if rule is None:
        return lm(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
    from models.walk import completion_log_probs

    scored = completion_log_probs(lm, rule, ids.to(device), attn.to(device), labels.to(device))
    return -scored["log_probs"].sum() / scored["label_mask"].sum().clamp_min(1)


def golden_examples(ctx: "Context", salt: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(text, golden codes [n_q, T], prompt codes [n_q, Tp]) for every training utterance."""
    from tqdm import tqdm

    train = ctx.splits.train
    out = []
    for u in tqdm(train, desc="golden tokens", leave=False):
        p = ctx.prompt_for(u, train, salt)
        out.append((u.text, ctx.codes(u), ctx.codes(p)))
    return out


def policy_format(ctx: "Context"):
    """The sequence format a policy trained under this run's ``policy:`` section speaks."""
    from models.layout import format_for

    pcfg = ctx.cfg.policy
    return format_for({"format": "interleaved" if pcfg.layout == "interleaved" else "codec_lm",
                       "text_frontend": pcfg.text_frontend})


def golden_streams(ctx: "Context", fmt) -> list[torch.LongTensor]:
    """The golden stream (``Context.golden_stream``) of every training utterance, in ``golden_examples`` order."""
    from tqdm import tqdm

    return [ctx.golden_stream(u, fmt) for u in tqdm(ctx.splits.train, desc="golden streams", leave=False)]


def train_ar(ctx: "Context", examples: list, rng: random.Random, device: str | None = None,
             accelerator=None, streams: list[torch.LongTensor] | None = None) -> tuple[torch.nn.Module, object, dict]:
    """The AR codec LM: text + prompt RVQ-1 -> RVQ-1 by teacher forcing (loss on the speech part only),
    in the layout ``policy.layout`` names (``policy_format``).

    examples: ``golden_examples(ctx, salt)`` rows; streams: their ``golden_streams`` when the caller has them
    (built here otherwise). Returns (lm on ``device``, tokenizer, stats with ar_loss,
    history, frames_per_char, examples, and for the interleaved layout max_frames_per_unit). Shared by every
    base stage that trains the AR half.
    """
    from models.codec_lm import build_lm
    from models.layout import build_tokenizer, split_stream, text_length

    cfg, bcfg = ctx.cfg, ctx.cfg.base
    device = device or ctx.device
    codec = ctx.codec
    tok = build_tokenizer(codec.codebook_size)
    n_prompt = prompt_frames(cfg.policy.prompt_seconds, codec.frame_rate)
    frontend = cfg.policy.text_frontend
    chars = sum(text_length(t, frontend) for t, _, _ in examples)
    frames = sum(c.shape[1] for _, c, _ in examples)
    frames_per_char = frames / max(1, chars)
    fmt = policy_format(ctx)
    if streams is None:
        streams = golden_streams(ctx, fmt) if fmt.units is not None else [c[0] for _, c, _ in examples]
    extra = {}
    if fmt.units is not None:
        # the cap on one unit's frames at generation: the longest in the training data, with room to spare
        longest = max(int(torch.bincount(split_stream(s)[2]).max()) for s in streams)
        extra["max_frames_per_unit"] = longest + 10

    seqs = []
    for (text, codes, prompt), stream in zip(examples, streams):
        p_ids = tok(fmt.prompt_str(prompt[0, :n_prompt], text), add_special_tokens=False)["input_ids"]
        c_ids = tok(fmt.completion_str(stream), add_special_tokens=False)["input_ids"]
        seqs.append((p_ids, c_ids))
    max_len = max(len(p) + len(c) for p, c in seqs)
    lm = build_lm(cfg.policy.size, len(tok), max(2048, max_len + 64), cfg.seed).to(device)
    log.info("base AR: %d examples, %.2fM params, longest sequence %d tokens", len(seqs),
             sum(p.numel() for p in lm.parameters()) / 1e6, max_len)

    ar_final, history = fit("base AR", lm, lambda batch: lm_loss(lm, [seqs[i] for i in batch], tok.pad_token_id,
                                                                 device),
                            n_items=len(seqs), batch_size=bcfg.batch_size, steps=bcfg.steps, lr=bcfg.lr,
                            warmup=bcfg.warmup_steps, betas=(0.9, 0.98), bcfg=bcfg, rng=rng, accelerator=accelerator,
                            weight_fn=lambda batch: sum(len(seqs[i][1]) for i in batch))
    return lm, tok, {"ar_loss": ar_final, "history": history, "frames_per_char": frames_per_char,
                     "examples": len(seqs), **extra}


def train_nar(ctx: "Context", examples: list, rng: random.Random, *, size: str, steps: int, batch_size: int,
              lr: float, seed: int, kind: str | None = None, name: str = "base NAR",
              accelerator=None) -> tuple[torch.nn.Module, float]:
    """The NAR model (levels 2..n_q from RVQ-1 and the prompt) on ``golden_examples`` rows.

    Returns (NAR on the run's device, smoothed final loss). ``size``: a ``NARConfig.named`` size;
    ``kind``: a NAR kind (default ``policy.nar_type``).
    """
    from models.nar import NARConfig, build_nar, nar_batch

    cfg, bcfg, codec = ctx.cfg, ctx.cfg.base, ctx.codec
    n_prompt = prompt_frames(cfg.policy.prompt_seconds, codec.frame_rate)
    torch.manual_seed(seed)
    ncfg = NARConfig.named(size, codec.n_q, codec.codebook_size, kind=kind or cfg.policy.nar_type)
    ncfg.max_frames = max(ncfg.max_frames, n_prompt + max(c.shape[1] for _, c, _ in examples) + 8)
    nar = build_nar(ncfg).to(ctx.device)

    def nar_step_loss(batch: list[int]) -> torch.Tensor:
        prompt, target, pm, tm = nar_batch([(examples[i][2][:, :n_prompt], examples[i][1]) for i in batch])
        level = rng.randint(2, codec.n_q)  # one random level per step: each level is its own task
        return nar.loss(prompt.to(ctx.device), target.to(ctx.device), pm.to(ctx.device), tm.to(ctx.device), level)

    loss, _ = fit(name, nar, nar_step_loss, n_items=len(examples), batch_size=batch_size, steps=steps, lr=lr,
                  warmup=min(bcfg.warmup_steps, steps // 10), betas=(0.9, 0.999), bcfg=bcfg, rng=rng,
                  accelerator=accelerator, weight_fn=lambda batch: sum(examples[i][1].shape[1] for i in batch))
    return nar, loss


def train_renderer(ctx: "Context", examples: list, rng: random.Random, *, size: str, steps: int, batch_size: int,
                   lr: float, seed: int, streams: list[torch.LongTensor] | None = None,
                   name: str = "base renderer", accelerator=None) -> tuple[torch.nn.Module, float]:
    """The phone renderer (models/renderer.py): golden RVQ-1 + frame units + prompt latent -> golden latent.

    examples: ``golden_examples`` rows; streams: their ``golden_streams`` (built here when None). With
    ``base.renderer_code_noise`` > 0 each step's codes are corrupted (``corrupt_codes``), drawn from
    (seed, step, item) so that every process of a multi-process run corrupts an item as one process would.
    Returns (renderer on the run's device, smoothed final L1 loss).
    """
    from models.layout import split_stream
    from models.renderer import PhoneRenderer, RendererConfig, corrupt_codes, renderer_batch

    cfg, bcfg, codec = ctx.cfg, ctx.cfg.base, ctx.codec
    n_prompt = prompt_frames(cfg.policy.prompt_seconds, codec.frame_rate)
    streams = streams if streams is not None else golden_streams(ctx, policy_format(ctx))
    rows = []
    for (_, codes, prompt), stream in zip(examples, streams):
        first, unit_ids, unit_pos = split_stream(stream)
        rows.append((codec.latent(prompt[:, :n_prompt]), first, unit_ids, unit_pos, codec.latent(codes)))
    torch.manual_seed(seed)
    rcfg = RendererConfig.named(size, codec.latent_dim, codec.codebook_size)
    rcfg.max_frames = max(rcfg.max_frames, n_prompt + max(len(r[1]) for r in rows) + 8)
    model = PhoneRenderer(rcfg).to(ctx.device)

    noise, steps_done = bcfg.renderer_code_noise, itertools.count()

    def with_noise(i: int, step: int) -> tuple:
        prompt, codes, unit_ids, unit_pos, latent = rows[i]
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + i)
        return prompt, corrupt_codes(codes, noise, codec.codebook_size, g), unit_ids, unit_pos, latent

    def step_loss(batch: list[int]) -> torch.Tensor:
        step = next(steps_done)  # fit calls this once per step
        b = renderer_batch([with_noise(i, step) if noise > 0 else rows[i] for i in batch])
        return model.loss({k: v.to(ctx.device) for k, v in b.items()})

    log.info("%s: %d examples, %.2fM params, code noise %g", name, len(rows),
             sum(p.numel() for p in model.parameters()) / 1e6, noise)
    loss, _ = fit(name, model, step_loss, n_items=len(rows), batch_size=batch_size, steps=steps, lr=lr,
                  warmup=min(bcfg.warmup_steps, steps // 10), betas=(0.9, 0.98), bcfg=bcfg, rng=rng,
                  accelerator=accelerator, weight_fn=lambda batch: sum(len(rows[i][1]) for i in batch))
    return model, loss


def sft_steps(policy, examples: list[tuple[str, str]], *, steps: int, lr: float, batch_size: int, warmup: int,
              seed: int, bcfg: "BaseConfig", device: str = "cpu", name: str = "sft",
              accelerator=None) -> tuple[float, list[dict]]:
    """Teacher forcing of ``policy.lm`` on (prompt string, completion string) examples; loss on the completion,
    under the policy's emit rule (the distribution it samples from). With an ``accelerator`` of several processes
    each takes its share of every batch (``fit``).

    Returns (final loss, history); ``policy.lm`` is left trained, on the CPU, in eval mode.
    """
    tok = policy.tokenizer
    seqs = [(tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
            for p, c in examples]
    lm = policy.lm.to(device)
    rule = policy.emit_rule
    final, history = fit(name, lm, lambda batch: lm_loss(lm, [seqs[i] for i in batch], tok.pad_token_id, device, rule),
                         n_items=len(seqs), batch_size=batch_size, steps=steps, lr=lr, warmup=warmup,
                         betas=(0.9, 0.999), bcfg=bcfg, rng=random.Random(seed), accelerator=accelerator,
                         weight_fn=lambda batch: sum(len(seqs[i][1]) for i in batch))
    policy.lm = lm.cpu().eval()
    return final, history
