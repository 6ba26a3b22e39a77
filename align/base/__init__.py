"""Base stages: how the round-0 policy is made, one plug-in module each.

    sft            (sft.py)            AR codec LM + NAR by teacher forcing on golden tokens
    speechgpt      (speechgpt.py)      SpeechGPT's three training stages over a unit LM
    speechgpt_gen  (speechgpt_gen.py)  AR semantic LM + flow-matching perceptual model

The loop only needs a policy directory in ``round_000/policy``; a base stage is any function
``(ctx, out_dir) -> stats`` that writes one, registered in ``BASE_STAGES`` (its name must also be in
``align.config.BaseStageName``, which ``tests/test_config.py`` checks). Modules are imported when
their stage runs, so a run of one base stage loads none of the others' code.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.run import Context

# name -> "module:function"; function(ctx, out_dir) -> stats.
BASE_STAGES: dict[str, str] = {"sft": "align.base.sft:sft_base",
                               "speechgpt": "align.base.speechgpt:speechgpt_base",
                               "speechgpt_gen": "align.base.speechgpt_gen:speechgpt_gen_base"}


def pretrained_base(ctx: "Context", out_dir: Path) -> dict:
    """Start from ``policy.pretrained`` (a policy directory) as round 0."""
    from models.io import atomic_dir

    src = Path(ctx.cfg.policy.pretrained)
    if not (src / "speechalign.json").is_file():
        raise ValueError(f"policy.pretrained={src} is not a policy directory (speechalign.json missing)")
    if ctx.ranks.is_main:  # one copy; the other ranks wait at the stage's barrier
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    return {"copied_from": str(src)}


def base_stage(name: str):
    """The registered base-stage function ``name``."""
    module, fn = BASE_STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run_base_stage(ctx: "Context", out_dir: Path) -> dict:
    """Round 0: copy ``policy.pretrained`` or run ``base.stage``; returns its stats."""
    if ctx.cfg.policy.pretrained:
        return pretrained_base(ctx, out_dir)
    return base_stage(ctx.cfg.base.stage)(ctx, out_dir)
