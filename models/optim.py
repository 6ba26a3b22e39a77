"""Small pieces every training loop shares: the learning-rate schedule and the log summary.

    lr = peak * cosine_lr(step, total, warmup)               # warm-up, then cosine to `floor`
    tail_mean(history, "loss")                                # mean over the last 20% of logged steps
"""
from __future__ import annotations

import math

import numpy as np


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``.

    floor=0.1 is the base stages' schedule (a tiny model still learns in its last steps); floor=0 is
    transformers' ``cosine`` schedule, which SpeechGPT's published scripts use.
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tail_mean(history: list[dict], key: str, fraction: float = 0.2) -> float | None:
    """Mean of ``key`` over the last ``fraction`` of logged steps (where a run ended up); None if never logged."""
    tail = history[-max(1, int(len(history) * fraction)):] if history else []
    vals = [h[key] for h in tail if h.get(key) is not None]
    return float(np.mean(vals)) if vals else None
