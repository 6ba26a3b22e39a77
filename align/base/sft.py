"""The ``sft`` base stage: the AR codec LM and the NAR model by teacher forcing on golden tokens."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from align.training import golden_examples, golden_streams, policy_format, train_ar, train_nar, train_renderer

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.base")


def sft_base(ctx: "Context", out_dir: Path) -> dict:
    """Train the AR policy and the NAR model on golden tokens; write ``out_dir`` (a policy dir)."""
    from models.codec_lm import Policy, policy_meta

    cfg, bcfg = ctx.cfg, ctx.cfg.base
    codec = ctx.codec
    examples = golden_examples(ctx, 0)
    rng = random.Random(cfg.seed)
    accelerator = ctx.ranks.accelerator(ctx.device)  # None with one process
    fmt = policy_format(ctx)
    # the interleaved streams (alignment files read, units laid out) once, for the AR and the renderer
    streams = golden_streams(ctx, fmt) if fmt.units is not None else None
    lm, tok, ar_stats = train_ar(ctx, examples, rng, accelerator=accelerator, streams=streams)
    frames_per_char = ar_stats["frames_per_char"]

    # -- NAR: levels 2..n_q from level 1 and the prompt (or the phone renderer: a latent from RVQ-1 + units) --
    nar, nar_loss, renderer = None, None, None
    if cfg.policy.renderer == "phones":
        renderer, nar_loss = train_renderer(ctx, examples, rng, size=cfg.policy.renderer_size, steps=bcfg.nar_steps,
                                            batch_size=bcfg.nar_batch_size, lr=bcfg.nar_lr, seed=cfg.seed + 1,
                                            streams=streams, accelerator=accelerator)
    elif codec.n_q > 1:
        if bcfg.nar_steps == 0:
            raise ValueError(f"codec.n_q={codec.n_q} needs a NAR model: set base.nar_steps > 0")
        nar, nar_loss = train_nar(ctx, examples, rng, size=cfg.policy.nar_size, steps=bcfg.nar_steps,
                                  batch_size=bcfg.nar_batch_size, lr=bcfg.nar_lr, seed=cfg.seed + 1,
                                  accelerator=accelerator)

    policy = Policy(lm=lm.cpu(), tokenizer=tok, nar=nar.cpu() if nar is not None else None, codec=codec,
                    renderer=renderer.cpu() if renderer is not None else None,
                    meta=policy_meta(cfg.policy, frames_per_char, ar_stats.get("max_frames_per_unit")))
    if ctx.ranks.is_main:  # every rank holds the same weights (gradients averaged each step)
        policy.save(out_dir)
    return {"ar_loss": ar_stats["ar_loss"], "nar_loss": nar_loss, "frames_per_char": frames_per_char,
            "examples": ar_stats["examples"], "history": ar_stats["history"]}
