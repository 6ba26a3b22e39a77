"""Checkpoint choice within a round: validate on dev every few steps, keep the dev-best weights.

A round's trainer overfits a few hundred pairs in tens of steps (the peers keep the checkpoint with the
lowest validation CER, Koel-TTS; a second round of the same recipe got worse, Tian et al.), so with
``train.validate_every: N`` the round speaks a fixed seeded subset of the dev split (``train.
validate_utterances``, with voice prompts from dev, as evaluation does with test) at step 0 (round
k-1's policy) and every N optimiser steps, scores it with the run's judges, and the round's policy is
the checkpoint with the lowest dev WER (ties: the higher SIM, then the earlier step). Step 0 can win:
a round that only makes dev worse leaves the policy as it was. The curve goes to
``round_k/train/validation.jsonl`` and the summary.

Resumable: rows are appended as they are measured and the best weights written (atomically) whenever
they improve; a trainer resumed from a checkpoint at step s drops the rows after s, which its re-run
steps measure again identically (a resumed run takes the same steps).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.io import read_jsonl, write_jsonl

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.validation")


def dev_items(ctx: "Context", n: int) -> list:
    """The fixed validation set: a seeded subset of ``n`` dev utterances with dev voice prompts."""
    from align.stages import eval_items

    if not ctx.splits.dev:
        raise ValueError("train.validate_every > 0 needs a dev split (data.dev, or corpus.n_dev_sentences)")
    return eval_items(ctx, ctx.splits.dev, n=n, seed=ctx.cfg.seed + 17)


def better(a: dict, b: dict | None) -> bool:
    """Is validation row ``a`` better than ``b``: lower WER, then higher SIM (an earlier step wins ties)."""
    return b is None or (a["wer"], -a["sim"], a["step"]) < (b["wer"], -b["sim"], b["step"])


class DevValidator:
    """Speaks and scores the dev subset with a model in training; remembers the curve and the best weights.

    ``measure(step, lm)`` appends a row; ``best`` is the best row so far; ``best_state()`` the best
    weights (None when step 0, round k-1's policy itself, is best).
    """

    def __init__(self, ctx: "Context", k: int, policy):
        tcfg = ctx.cfg.train
        self.ctx, self.k, self.policy = ctx, k, policy
        self.every = tcfg.validate_every
        self.items = dev_items(ctx, tcfg.validate_utterances)
        self.curve_path = ctx.run.train_dir(k) / "validation.jsonl"
        self.best_path = ctx.run.train_dir(k) / "best.safetensors"
        self.rows: list[dict] = read_jsonl(self.curve_path) if self.curve_path.exists() else []

    @property
    def best(self) -> dict | None:
        out = None
        for r in self.rows:
            if better(r, out):
                out = r
        return out

    def resume_at(self, step: int) -> None:
        """A trainer resumed from its checkpoint at ``step``: the rows measured after it are measured again."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._write_rows()

    def done(self, step: int) -> bool:
        return any(r["step"] == step for r in self.rows)

    @torch.no_grad()
    def measure(self, step: int, lm) -> dict:
        """Speak the dev subset with ``lm`` (round k-1's renderer and codec), score it, keep it if best."""
        import dataclasses

        from eval.evaluate import evaluate_policy

        ecfg, ranks = self.ctx.cfg.eval, self.ctx.ranks
        was_training = lm.training
        lm.eval()
        view = dataclasses.replace(self.policy, lm=lm)
        summary, _ = evaluate_policy(view, self.items, scorers=self.ctx.scorers, temperature=ecfg.temperature,
                                     top_k=ecfg.top_k, top_p=ecfg.top_p, seed=self.ctx.cfg.seed + 23,
                                     batch_size=ecfg.batch_size, max_seconds=self.ctx.cfg.data.max_seconds,
                                     batches=ranks.batches(len(self.items), ecfg.batch_size), gather=ranks.gather,
                                     quality=False)
        lm.train(was_training)
        row = {"step": step, "wer": round(summary["wer"], 6), "sim": round(summary["sim"], 6), "n": summary["n"]}
        improved = better(row, self.best)
        self.rows.append(row)
        if ranks.is_main:
            if improved and step > 0:
                _save_state(lm, self.best_path)
            self._write_rows()
        ranks.barrier()
        log.info("round %d validation at step %d: dev WER %.3f SIM %.3f (n=%d)%s", self.k, step, row["wer"],
                 row["sim"], row["n"], " best" if improved else "")
        return row

    def _write_rows(self) -> None:
        if self.ctx.ranks.is_main:
            self.curve_path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.curve_path, self.rows)

    def best_state(self) -> dict | None:
        """The best checkpoint's weights (a state dict), or None when step 0 is best."""
        best = self.best
        if best is None or best["step"] == 0:
            return None
        from safetensors.torch import load_file

        return load_file(str(self.best_path))

    def summary(self) -> dict:
        best = self.best
        return {"validation": self.rows, "chosen_step": None if best is None else best["step"],
                "dev_wer": None if best is None else best["wer"]}


def _save_state(lm, path: Path) -> None:
    """The model's weights (a PEFT model's with its adapters), atomically, as safetensors."""
    import os

    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in lm.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def validation_callback(validator: DevValidator, model_getter):
    """A trainer callback: ``validator.measure`` at step 0 and every ``validator.every`` steps (and the last).

    model_getter() -> the model to generate with (the trainer's, unwrapped from DDP)."""
    from transformers import TrainerCallback

    class Validate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            validator.resume_at(state.global_step)
            if not validator.done(0) and state.global_step == 0:
                validator.measure(0, model_getter())

        def on_step_end(self, args, state, control, **kwargs):
            s = state.global_step
            if (s % validator.every == 0 or s == state.max_steps) and not validator.done(s):
                validator.measure(s, model_getter())

    return Validate()
