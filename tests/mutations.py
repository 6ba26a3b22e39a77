"""Faults planted on purpose, to measure what the CI loop's tiers catch (benchmarks/gate_power.py) and to keep a
fast subset of them caught in the default suite (tests/test_gate_mutations.py).

A mutation is config overrides (a setting a change could break) and/or a patch of the code (a context manager that
swaps a function of the trainer's path for a broken one while it is active). Each is a fault a real change has made
somewhere: chosen and rejected swapped, pairs shuffled across prompts, the reference taken from round 0 instead of
round k-1, a beta or learning rate off by ten, the accumulation dropped, the RPO term ignored, TRL's full softmax
instead of the emit rule, hotter decoding.

    with MUTATIONS["swapped_pairs"].active():          # the trainer reads swapped pairs
        run_loop(load_config("configs/ci.yaml", MUTATIONS["swapped_pairs"].overrides(cfg)))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    saved = getattr(module, name)
    setattr(module, name, replacement(saved))
    try:
        yield
    finally:
        setattr(module, name, saved)


def _swap_pairs(original):
    def kept(ctx, k):
        return [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in original(ctx, k)]
    return kept


def _shuffle_pairs(original):
    def kept(ctx, k):  # each pair's chosen and rejected moved to the next pair's prompt
        pairs = original(ctx, k)
        return [dict(p, chosen=q["chosen"], rejected=q["rejected"]) for p, q in zip(pairs, pairs[1:] + pairs[:1])]
    return kept


def _reference_round0(original):
    def reference_dir(ctx, k):
        return ctx.run.policy_dir(0)
    return reference_dir


@dataclass
class Mutation:
    """A planted fault: ``settings(cfg)`` -> overrides of the run config; ``patch`` -> (module name, attribute,
    replacement factory) applied while ``active()``."""

    description: str
    settings: Callable = field(default=lambda cfg: [])
    patch: tuple | None = None

    def overrides(self, cfg) -> list[str]:
        return list(self.settings(cfg))

    @contextlib.contextmanager
    def active(self):
        if self.patch is None:
            yield
            return
        import importlib

        module, name, replacement = self.patch
        with _patched(importlib.import_module(module), name, replacement):
            yield


MUTATIONS: dict[str, Mutation] = {
    "swapped_pairs": Mutation("the trainer reads chosen and rejected swapped",
                              patch=("align.methods", "_kept_pairs", _swap_pairs)),
    "shuffled_pairs": Mutation("each pair's sequences are trained under the next pair's prompt",
                               patch=("align.methods", "_kept_pairs", _shuffle_pairs)),
    "reference_round0": Mutation("round k's reference is round 0's policy, not round k-1's",
                                 patch=("align.methods", "reference_dir", _reference_round0)),
    "beta_tenth": Mutation("DPO's beta / 10", lambda cfg: [f"dpo.beta={cfg.dpo.beta / 10:g}"]),
    "lr_x10": Mutation("DPO's learning rate x 10", lambda cfg: [f"dpo.learning_rate={cfg.dpo.learning_rate * 10:g}"]),
    "lr_tenth": Mutation("DPO's learning rate / 10", lambda cfg: [f"dpo.learning_rate={cfg.dpo.learning_rate / 10:g}"]),
    "temperature_1.2": Mutation("sampling and evaluation at temperature 1.2",
                                lambda cfg: ["sample.temperature=1.2", "eval.temperature=1.2"]),
    "grad_accum_dropped": Mutation("gradient accumulation dropped (each step sees one micro-batch)",
                                   lambda cfg: ["dpo.grad_accum=1"]),
    "sft_weight_ignored": Mutation("the chosen NLL term (dpo.sft_weight, RPO) ignored", lambda cfg: ["dpo.sft_weight=0"]),
    "emit_rule_bypassed": Mutation("scored under TRL's full softmax, not the emit rule the sampler draws from",
                                   lambda cfg: ["dpo.scoring=full_softmax"]),
}
