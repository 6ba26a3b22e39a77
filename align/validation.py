"""Checkpoint choice within a round: validate every few steps, keep the best weights.

A round's trainer overfits a few hundred pairs in tens of steps (the peers keep the checkpoint with the
lowest validation CER, Koel-TTS; a second round of the same recipe got worse, Tian et al.), so with
``train.validate_every: N`` the round speaks a fixed seeded subset of the validation split (``train.
validate_utterances``, with voice prompts from that split, as evaluation does with test) at step 0 (round
k-1's policy) and every N optimiser steps, scores it with the run's judges, and the round's policy is
the checkpoint with the lowest validation WER (ties: the higher SIM, then the earlier step). The validation
split (``corpus.n_val_sentences`` / ``data.val``) is held out of dev, so the study's dev table grades
checkpoints chosen on other utterances (it once graded its own choice: dev gains that vanished on test). Step 0 can win:
a round that only makes dev worse leaves the policy as it was. The curve goes to
``round_k/train/validation.jsonl`` and the summary.

Resumable: rows are appended as they are measured and an improving step's weights written (atomically)
to ``best-step{step}.safetensors``, the step and the starting policy's digest in its metadata; a trainer
resumed from a checkpoint at step s drops the rows after s, which its re-run steps measure again
identically (a resumed run takes the same steps). The files of earlier improving steps stay until the
round ends (``end_round``): a resume may go back to one of them, and a single ``best`` file could hold a
later step of the killed attempt than the best remaining row names. Every row records the digest of
round k-1's policy (``models.digest.dir_digest``): rows of another starting policy (``--only-stage
train`` after round k-1 was redone) are dropped when the validator is built, so step 0 is measured again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.digest import dir_digest
from models.io import read_jsonl, write_jsonl

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.validation")


def dev_items(ctx: "Context", n: int) -> list:
    """The fixed validation set: a seeded subset of ``n`` utterances of the validation split (``corpus.n_val_sentences``
    or ``data.val``) with voice prompts from it. Not dev: the dev table grades every round, and a checkpoint chosen on
    its own utterances would read better there than it is (the choice's noise counted as its gain)."""
    from align.stages import eval_items

    if not ctx.splits.val:
        raise ValueError("train.validate_every > 0 chooses checkpoints on a validation split held out of the dev table, "
                         "and this run has none: set corpus.n_val_sentences (the embedded corpus; e.g. 10) or data.val "
                         "(manifests)")
    return eval_items(ctx, ctx.splits.val, n=n, seed=ctx.cfg.seed + 17)


def better(a: dict, b: dict | None) -> bool:
    """Is validation row ``a`` better than ``b``: lower WER, then higher SIM (an earlier step wins ties)."""
    return b is None or (a["wer"], -a["sim"], a["step"]) < (b["wer"], -b["sim"], b["step"])


class DevValidator:
    """Speaks and scores the dev subset with a model in training; remembers the curve and the best weights.

    ``measure(step, lm)`` appends a row; ``best`` is the best row so far; ``best_state()`` the best
    weights (None when step 0, round k-1's policy itself, is best); ``end_round()`` once the round's policy is
    saved removes the weights no longer needed.
    """

    def __init__(self, ctx: "Context", k: int, policy):
        tcfg = ctx.cfg.train
        self.ctx, self.k, self.policy = ctx, k, policy
        self.every = tcfg.validate_every
        self.items = dev_items(ctx, tcfg.validate_utterances)
        self.work = ctx.run.train_dir(k)
        self.curve_path = self.work / "validation.jsonl"
        # what the curve is of: a row measured from another round k-1 policy says nothing about this one
        self.policy_digest = dir_digest(ctx.run.policy_dir(k - 1))
        rows: list[dict] = read_jsonl(self.curve_path) if self.curve_path.exists() else []
        self.rows = [r for r in rows if r.get("policy_digest") == self.policy_digest]
        if len(self.rows) < len(rows):
            log.warning("round %d validation: dropping %d of %d rows of %s measured from another round %d policy "
                        "(or before rows recorded it); they are measured again", k, len(rows) - len(self.rows),
                        len(rows), self.curve_path, k - 1)
            self._write_rows()

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
                                     quality=False, defect=ecfg.defect)
        lm.train(was_training)
        row = {"step": step, "wer": round(summary["wer"], 6), "sim": round(summary["sim"], 6), "n": summary["n"],
               "policy_digest": self.policy_digest}
        improved = better(row, self.best)
        self.rows.append(row)
        if ranks.is_main:
            if improved and step > 0:  # the weights before the row: a row never names a step without its file
                _save_state(lm, self.state_path(step), {"step": str(step), "policy_digest": self.policy_digest})
            self._write_rows()
        ranks.barrier()
        log.info("round %d validation at step %d: dev WER %.3f SIM %.3f (n=%d)%s", self.k, step, row["wer"],
                 row["sim"], row["n"], " best" if improved else "")
        return row

    def _write_rows(self) -> None:
        if self.ctx.ranks.is_main:
            self.curve_path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.curve_path, self.rows)

    def state_path(self, step: int) -> Path:
        """Where step ``step``'s weights are kept while the round runs (steps that improved on every earlier one)."""
        return self.work / f"best-step{step}.safetensors"

    def best_state(self) -> dict | None:
        """The best row's weights (a state dict name -> tensor), or None when step 0 is best.

        Raises when the file is missing or was not written for that step of this round's starting policy (its
        metadata): loading it would make the round's policy some other step than ``chosen_step`` says."""
        best = self.best
        if best is None or best["step"] == 0:
            return None
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.state_path(best["step"])
        fix = (f"delete {self.curve_path} and {self.work / 'trainer'} and re-run the round's train stage "
               "(`speechalign run --only-stage train`)")
        if not path.is_file():
            raise FileNotFoundError(f"round {self.k}: the dev-best step {best['step']} has no weights ({path} is "
                                    f"missing); {fix}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("step") != str(best["step"]) or meta.get("policy_digest") != self.policy_digest:
            raise ValueError(f"round {self.k}: {path} holds the weights of step {meta.get('step')} from round "
                             f"{self.k - 1} policy {meta.get('policy_digest')}, but the dev-best row is step "
                             f"{best['step']} from policy {self.policy_digest}; {fix}")
        return load_file(str(path))

    def end_round(self) -> None:
        """The round's policy is saved: remove the weights of superseded steps (and a ``best.safetensors`` of
        older code), keeping the chosen step's. Not earlier: a resumed trainer may go back to any of them."""
        if not self.ctx.ranks.is_main:
            return
        best = self.best
        keep = self.state_path(best["step"]) if best is not None and best["step"] > 0 else None
        for path in [*self.work.glob("best-step*.safetensors"), self.work / "best.safetensors"]:
            if path != keep and path.is_file():
                path.unlink()

    def summary(self) -> dict:
        best = self.best
        return {"validation": self.rows, "chosen_step": None if best is None else best["step"],
                "dev_wer": None if best is None else best["wer"]}


def _save_state(lm, path: Path, metadata: dict[str, str]) -> None:
    """The model's weights (a PEFT model's with its adapters), atomically, as safetensors with ``metadata``."""
    import os

    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in lm.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata=metadata)
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
