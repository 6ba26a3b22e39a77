"""Training methods of a round: what turns round k's pairs into round k's policy.

    dpo          DPO through trl.DPOTrainer (any TRL loss_type, optional RPO-style SFT term)
    sft_control  continue-SFT on the golden tokens of the round's prompts through the same trainer as DPO
                 (TRL's ``sft`` loss: the same optimiser, schedule, steps, batch, accumulation and LoRA):
                 the control that tells a preference gain from more teacher forcing
    reward_bon   a reward model (Bradley-Terry on the pairs) attached to round k-1's weights as a
                 Best-of-N reranker: no policy update, better samples at generation time
    grpo         trl.GRPOTrainer with a reward model or a direct WER / WER+SIM reward
    coh          Chain-of-Hindsight: SFT on ``<good>``-hinted chosen and ``<bad>``-hinted rejected
                 sequences; the policy then generates with the ``<good>`` hint

The loop's ``train`` stage runs ``train(ctx, k)``, which dispatches on ``train.method``; the ``dpo:``
section is the budget of every method (steps, learning rate, batch, LoRA), so they compare at equal
cost. Every method writes ``round_k/train/metrics.json`` with a ``summary`` holding at least ``method``,
``loss``, ``reward_accuracy``, ``reward_margin`` and ``pairs`` (None where a method has no such figure).
(Run directories from before the rename, with ``round_k/dpo/``, are renamed on resume: align/run.py.)
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import statistics
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from align.training import sft_steps
from models.io import read_jsonl, write_json
from models.layout import format_for
from models.optim import tail_mean

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.methods")

GOOD, BAD = "<good>", "<bad>"


def trl_loss_types() -> list[str]:
    """The DPO loss types the installed TRL documents in ``DPOConfig.loss_type``'s help."""
    from trl import DPOConfig

    for f in fields(DPOConfig):
        if f.name == "loss_type":
            return re.findall(r"`'([a-z_]+)'`", f.metadata.get("help", ""))
    return []


def check_loss_type(loss_type: str) -> None:
    """Fail before any stage runs when ``dpo.loss_type`` is not one the installed TRL offers."""
    known = trl_loss_types()
    if known and loss_type not in known:
        raise ValueError(f"dpo.loss_type={loss_type!r} is not one the installed TRL offers: {known}")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _kept_pairs(ctx: "Context", k: int) -> list[dict]:
    return [p for p in read_jsonl(ctx.run.pairs_dir(k) / "pairs.jsonl") if p["keep"]]


def _summary(method: str, **kw) -> dict:
    base = {"method": method, "loss": None, "reward_accuracy": None, "reward_margin": None, "pairs": None}
    base.update(kw)
    return base


def _write_metrics(work: Path, stats: dict, history: list[dict]) -> None:
    write_json(work / "metrics.json", {"summary": stats, "history": history})


def _finish(ctx: "Context", k: int, policy, stats: dict, history: list[dict], trainer_dir: Path | None = None,
            validator=None) -> None:
    """Round k's policy and ``train/metrics.json``, written by rank 0 once every rank is done (the ranks
    hold the same weights); the trainer's checkpoints go, the policy dir is the round's checkpoint, and so do
    the dev validation's weights of superseded steps."""
    ctx.ranks.barrier()
    if not ctx.ranks.is_main:
        return
    bad = next((name for name, p in policy.lm.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:  # a NaN the loss guard could not see (e.g. a -inf log-prob of an impossible sequence)
        raise FloatingPointError(
            f"round {k}'s trained weights are not finite ({bad}, {stats.get('method', 'training')}); nothing was "
            "saved and the previous round's policy is untouched. Lower the learning rate, or check that each pair's "
            "sequences were spoken for its prompt (a token the policy's emit rule forbids there scores -inf).")
    policy.save(ctx.run.policy_dir(k))
    work = ctx.run.train_dir(k)
    work.mkdir(parents=True, exist_ok=True)
    _write_metrics(work, stats, history)
    if trainer_dir is not None:
        shutil.rmtree(trainer_dir, ignore_errors=True)
    if validator is not None:
        validator.end_round()


def kept_figures(history: list[dict], keys: dict[str, str], kept_step: int | None) -> dict:
    """The training figures of the weights a round keeps, and of its last steps.

    history: the trainer's log rows (``logging_steps=1``: one per optimiser step, each with its ``step``);
    keys: summary name -> logged key (``{"loss": "loss"}``); kept_step: the step whose weights the round keeps
    (``train.validate_every``'s dev-best step; None = the last step). Returns ``name``: ``tail_mean`` over the
    logged steps up to and including ``kept_step`` (the same smoothing as without validation, ending where the
    kept weights were), ``name_last``: ``tail_mean`` over every logged step, and ``figures_of`` saying which.
    Step 0 kept (round k-1's policy, no step taken) -> None for every ``name``: no training step describes it.
    """
    upto = history if kept_step is None else [h for h in history if h["step"] <= kept_step]
    out = {name: tail_mean(upto, key) for name, key in keys.items()}
    out.update({f"{name}_last": tail_mean(history, key) for name, key in keys.items()})
    if kept_step is None:
        out["figures_of"] = "the last logged steps"
    elif kept_step == 0:
        out["figures_of"] = "none: step 0 (round k-1's policy) was kept; the *_last figures are of the last steps"
    else:
        out["figures_of"] = f"the logged steps up to the kept step {kept_step}"
    return out


# ---------------------------------------------------------------------------------------------
# Methods: fn(ctx, k) -> summary; each writes round_k/dpo/metrics.json and round_k/policy/
# ---------------------------------------------------------------------------------------------
def per_process_batch(batch_size: int, world: int, what: str) -> int:
    """Each process's share of a global batch; the batch must split evenly (else 1 and N processes differ)."""
    if batch_size % world:
        raise ValueError(f"{what}={batch_size} does not split over {world} processes; use a multiple of {world}")
    return batch_size // world


def _data_parallel(ctx: "Context") -> dict:
    """``sft_steps`` keywords for this launch: none with one process (it trains as it always has), else the
    process's device and an Accelerator whose processes share every batch (``align.training.fit``)."""
    accelerator = ctx.ranks.accelerator(ctx.device)
    return {} if accelerator is None else {"device": str(accelerator.device), "accelerator": accelerator}


def nan_guard(method: str = "DPO", fix: str = "lower dpo.learning_rate or dpo.beta"):
    """A trainer callback that stops loudly when the training loss or its gradient norm is not finite (the
    trainer's ``logging_nan_inf_filter`` must be off, else a NaN step is logged as the mean of the others)."""
    from transformers import TrainerCallback

    class NaNGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise FloatingPointError(
                        f"{method} {key} became {value} at step {state.global_step}; {fix}. "
                        "The previous round's policy is untouched.")

    return NaNGuard()


def step_timer():
    """A trainer callback that times every optimiser step (``median()`` seconds; None before the first)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._t0 is not None:
                self.seconds.append(time.perf_counter() - self._t0)

        def median(self) -> float | None:
            return round(statistics.median(self.seconds), 5) if self.seconds else None

    return StepTimer()


def complete_checkpoints(folder: Path) -> list[Path]:
    """Trainer checkpoints written to the end, oldest first (transformers writes trainer_state.json last);
    a folder cut off by a kill mid-save cannot be resumed from, so it is removed."""
    import json

    done = []
    for c in folder.glob("checkpoint-*"):
        if not re.fullmatch(r"checkpoint-\d+", c.name) or not c.is_dir():
            log.warning("ignoring %s: not a trainer checkpoint (checkpoint-<step>)", c)
            continue
        try:
            json.loads((c / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("removing %s: a trainer checkpoint cut off while it was written", c)
            shutil.rmtree(c, ignore_errors=True)
            continue
        done.append(c)
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def reference_dir(ctx: "Context", k: int) -> Path:
    """The policy round k's preference loss is measured against: round k-1's (the paper's iterative recipe; its one
    definition, so that benchmarks/gate_power.py can plant the 'reference from round 0' fault here)."""
    return ctx.run.policy_dir(k - 1)


def drop_checkpoints_of_another_start(ctx: "Context", k: int) -> None:
    """Trainer checkpoints of round k resume only onto the round k-1 policy they started from: the train stage's
    ``start.json`` records its digest, and checkpoints left by a run from another round k-1 policy (that round
    redone, then ``--only-stage train``) are removed with a warning instead of resumed."""
    from models.digest import dir_digest
    from models.io import read_json

    work = ctx.run.train_dir(k)
    if ctx.ranks.is_main:
        start = {"policy_digest": dir_digest(ctx.run.policy_dir(k - 1))}
        path = work / "start.json"
        if path.is_file() and read_json(path) != start and (work / "trainer").is_dir():
            log.warning("round %d: removing the trainer checkpoints in %s: they started from another round %d policy",
                        k, work / "trainer", k - 1)
            shutil.rmtree(work / "trainer", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        write_json(path, start)
    ctx.ranks.barrier()


def _trl_preference(ctx: "Context", k: int, rows: list[dict], *, method: str, loss_type: list[str],
                    loss_weights: list[float] | None) -> dict:
    """Round k's policy from round k-1's through ``trl.DPOTrainer`` on ``rows`` ({prompt, chosen, rejected}).

    DPO and the continue-SFT control both train here, so they share the ``dpo:`` budget exactly (optimiser,
    schedule, steps, batch, accumulation, LoRA); only ``loss_type`` differs (``["sft"]``: the NLL of the chosen
    side alone). Every sequence is scored under the policy's emit rule (align/scoring.py), and with
    ``train.validate_every`` the round keeps its dev-best checkpoint (align/validation.py).
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from align.scoring import rule_scoring
    from models.codec_lm import Policy

    cfg, dcfg = ctx.cfg, ctx.cfg.dpo
    prev = ctx.run.policy_dir(k - 1)
    policy = Policy.load(prev, device="cpu")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                 for r in rows])
    ref = AutoModelForCausalLM.from_pretrained(reference_dir(ctx, k), dtype=torch.float32)
    # The global batch is dpo.batch_size whatever the process count, so 1 and N processes take the same steps.
    per_device = per_process_batch(dcfg.batch_size, ctx.ranks.world, "dpo.batch_size")
    work = ctx.run.train_dir(k)
    work.mkdir(parents=True, exist_ok=True)
    args = DPOConfig(
        output_dir=str(work / "trainer"), beta=dcfg.beta, loss_type=loss_type, loss_weights=loss_weights,
        label_smoothing=dcfg.label_smoothing, discopop_tau=dcfg.discopop_tau, ld_alpha=dcfg.ld_alpha,
        f_divergence_type=dcfg.f_divergence_type, f_alpha_divergence_coef=dcfg.f_alpha_divergence_coef,
        use_weighting=dcfg.use_weighting, precompute_ref_log_probs=dcfg.precompute_ref,
        precompute_ref_batch_size=per_device,
        learning_rate=dcfg.learning_rate, max_steps=dcfg.steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=dcfg.grad_accum, warmup_steps=int(dcfg.warmup_ratio * dcfg.steps),
        lr_scheduler_type="cosine", max_length=dcfg.max_length, logging_steps=1, logging_nan_inf_filter=False,
        save_steps=dcfg.save_steps,
        save_strategy="steps", save_total_limit=1, save_only_model=False, report_to="none", seed=cfg.seed + k,
        data_seed=cfg.seed + k, use_cpu=ctx.device == "cpu", dataloader_num_workers=0, disable_tqdm=False,
        bf16=False, fp16=False, gradient_checkpointing=False)
    peft_config = None
    if dcfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=dcfg.lora_r, lora_alpha=dcfg.lora_alpha, lora_dropout=dcfg.lora_dropout,
                                 target_modules=list(dcfg.lora_targets), task_type="CAUSAL_LM")
    timer = step_timer()
    callbacks = [nan_guard(), timer]
    scoring = rule_scoring(policy.emit_rule) if dcfg.scoring == "rule" else contextlib.nullcontext()
    with scoring:  # policy, reference and a precomputed reference: all under the rule (or all full softmax)
        trainer = DPOTrainer(model=policy.lm, ref_model=None if dcfg.lora else ref, args=args, train_dataset=dataset,
                             processing_class=policy.tokenizer, peft_config=peft_config, callbacks=callbacks)
    validator = _validator(ctx, k, policy, trainer)
    drop_checkpoints_of_another_start(ctx, k)
    checkpoints = complete_checkpoints(work / "trainer")
    resume = str(checkpoints[-1]) if checkpoints else None
    if resume:
        log.info("round %d %s: resuming from %s", k, method, resume)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t0
    history = [h for h in trainer.state.log_history if "loss" in h]
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        if validator is not None:
            raise ValueError("train.validate_every with FSDP/ZeRO-3 sharding is not supported; validate with ddp.yaml")
        policy.lm = _gathered_lm(trainer, prev, dcfg.lora)
    elif validator is not None and validator.best["step"] == 0:  # every step made dev worse: keep round k-1's
        policy.lm = AutoModelForCausalLM.from_pretrained(prev, dtype=torch.float32).eval()
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if validator is not None:
            model.load_state_dict(validator.best_state())
        if dcfg.lora:
            model = model.merge_and_unload()
        policy.lm = model.eval()
    policy.lm.__dict__.pop("forward", None)  # the trainer's scoring head (align/scoring.py) stays with the trainer
    figures = kept_figures(history, {"loss": "loss", "reward_accuracy": "rewards/accuracies",
                                     "reward_margin": "rewards/margins", "logps_chosen": "logps/chosen",
                                     "logps_rejected": "logps/rejected"},
                           None if validator is None else validator.best["step"])
    stats = {"method": method, "steps": result.global_step, **figures, "pairs": len(rows),
             # the median optimiser step (the reference's forward pass included unless precomputed) and the
             # whole train() call (with dpo.precompute_ref, the pass that scores every pair first)
             "step_seconds": timer.median(), "train_seconds": round(train_seconds, 3),
             "precompute_ref": dcfg.precompute_ref, **(validator.summary() if validator is not None else {})}
    _finish(ctx, k, policy, stats, history, work / "trainer", validator)
    log.info("round %d %s: loss %.4f reward acc %.3f margin %.3f (%s)%s", k, method, stats["loss"] or float("nan"),
             stats["reward_accuracy"] or float("nan"), stats["reward_margin"] or float("nan"), stats["figures_of"],
             f"; dev-best step {stats['chosen_step']} (dev WER {stats['dev_wer']:.3f})" if validator else "")
    return stats


def _validator(ctx: "Context", k: int, policy, trainer):
    """With ``train.validate_every`` > 0, a DevValidator hooked into ``trainer`` (else None)."""
    if not ctx.cfg.train.validate_every:
        return None
    from align.validation import DevValidator, validation_callback

    validator = DevValidator(ctx, k, policy)
    trainer.add_callback(validation_callback(validator, lambda: trainer.accelerator.unwrap_model(trainer.model)))
    return validator


def dpo(ctx: "Context", k: int) -> dict:
    """DPO on round k's pairs; round k-1's policy is both the start and the frozen reference. ``dpo.sft_weight``
    adds the NLL of the chosen side (RPO; MPO's guard against the chosen log-probs falling with the rejected)."""
    pairs = _kept_pairs(ctx, k)
    return _trl_preference(ctx, k, pairs, method="dpo",
                           loss_type=[ctx.cfg.dpo.loss_type] + (["sft"] if ctx.cfg.dpo.sft_weight > 0 else []),
                           loss_weights=[1.0, ctx.cfg.dpo.sft_weight] if ctx.cfg.dpo.sft_weight > 0 else None)


def _gathered_lm(trainer, prev: Path, lora: bool):
    """The trained LM as one whole model (rank 0; None elsewhere) when FSDP or DeepSpeed ZeRO-3 sharded it over
    the processes (configs/accelerate/fsdp.yaml, zero3.yaml): the full state dict is gathered (every rank
    takes part) and loaded into a fresh copy of the round's starting weights."""
    from transformers import AutoModelForCausalLM

    if lora:
        raise ValueError("dpo.lora=true with FSDP/ZeRO-3 sharding is not supported: LoRA DPO of the 7B shape fits "
                         "each GPU whole, so launch it with configs/accelerate/ddp.yaml")
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.accelerator.is_main_process:
        return None
    lm = AutoModelForCausalLM.from_pretrained(prev, dtype=torch.float32)
    lm.load_state_dict({k: v.float() for k, v in state.items()})
    return lm.eval()


def sft_control(ctx: "Context", k: int) -> dict:
    """Continue-SFT on the golden tokens of this round's sampled prompts (no preference signal), through the same
    trainer and budget as DPO (``_trl_preference`` with the chosen side's NLL alone; the rejected side, a sample
    of the prompt, is scored but carries no weight)."""
    from models.codec_lm import conditioning, read_meta

    meta = read_meta(ctx.run.policy_dir(k - 1))
    fmt = format_for(meta)
    by_id = {u.id: u for u in ctx.splits.train}
    seen, rows = set(), []
    for r in read_jsonl(ctx.run.samples_dir(k) / "samples.jsonl"):
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        rows.append({"prompt": conditioning(meta, ctx.codes(by_id[r["prompt_id"]]), r["text"], ctx.codec.frame_rate),
                     "chosen": fmt.completion_str(ctx.golden_stream(by_id[r["id"]], fmt)),
                     "rejected": fmt.completion_str(r["codes"])})
    stats = _trl_preference(ctx, k, rows, method="sft_control", loss_type=["sft"], loss_weights=None)
    return stats


def add_hint_tokens(policy) -> None:
    """Add ``<good>``/``<bad>`` to the vocabulary (once) and grow the LM's embeddings to match."""
    tok = policy.tokenizer
    new = [t for t in (GOOD, BAD) if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
        policy.lm.resize_token_embeddings(len(tok), mean_resizing=False)


def coh(ctx: "Context", k: int) -> dict:
    """Chain-of-Hindsight: SFT on hinted pairs; the saved policy generates with the ``<good>`` hint."""
    from models.codec_lm import Policy
    from models.layout import with_hint

    cfg, dcfg = ctx.cfg, ctx.cfg.dpo
    pairs = _kept_pairs(ctx, k)
    # a pair's prompt carries round k-1's hint when that policy was a CoH one: hint it afresh
    bare = [p["prompt"].replace(f"{GOOD} <speech>", "<speech>").replace(f"{BAD} <speech>", "<speech>") for p in pairs]
    examples = [(with_hint(b, GOOD), p["chosen"]) for b, p in zip(bare, pairs)]
    if cfg.train.coh_rejected:
        examples += [(with_hint(b, BAD), p["rejected"]) for b, p in zip(bare, pairs)]
    policy = Policy.load(ctx.run.policy_dir(k - 1), device="cpu")
    add_hint_tokens(policy)
    loss, history = sft_steps(policy, examples, steps=dcfg.steps, lr=dcfg.learning_rate, batch_size=dcfg.batch_size,
                              warmup=int(dcfg.warmup_ratio * dcfg.steps), seed=cfg.seed + k, bcfg=cfg.base,
                              name=f"round {k} coh", **_data_parallel(ctx))
    policy.meta["quality_hint"] = GOOD
    stats = _summary("coh", loss=loss, pairs=len(pairs), examples=len(examples), steps=dcfg.steps)
    _finish(ctx, k, policy, stats, history)
    log.info("round %d coh: loss %.4f on %d hinted sequences", k, loss, len(examples))
    return stats


def _train_rm(ctx: "Context", k: int, policy, pairs: list[dict]):
    from models.reward import train_reward_model

    work = ctx.run.train_dir(k)
    work.mkdir(parents=True, exist_ok=True)
    rm, stats = train_reward_model(policy, pairs, ctx.cfg.train.reward, work, seed=ctx.cfg.seed + k,
                                   use_cpu=ctx.device == "cpu")
    shutil.rmtree(work / "trainer", ignore_errors=True)
    return rm, stats


def reward_bon(ctx: "Context", k: int) -> dict:
    """Reward model on the pairs; round k = round k-1's weights + Best-of-N reranking by that model."""
    from models.codec_lm import Policy
    from models.reward import BestOfN

    pairs = _kept_pairs(ctx, k)
    policy = Policy.load(ctx.run.policy_dir(k - 1), device="cpu")
    policy.reranker = None  # a fresh reward model replaces last round's
    rm, stats = _train_rm(ctx, k, policy, pairs)
    policy.reranker = BestOfN(rm, ctx.cfg.train.best_of_n, tuple(ctx.cfg.train.best_of_n_length_band))
    summary = _summary("reward_bon", loss=stats["rm_loss"], reward_accuracy=stats["rm_accuracy"],
                       reward_margin=stats["rm_margin"], pairs=len(pairs), best_of_n=ctx.cfg.train.best_of_n, **stats)
    _finish(ctx, k, policy, summary, [])
    return summary


class StreamReward:
    """A GRPO reward function over ``completion_ids``: each completion's speech stream in the policy's layout
    (codes, and the unit markers of the interleaved layout), parsed from its token ids (TRL decodes completions
    with special tokens skipped, which drops ``<eos>``: the ids are the ground truth).

    score_fn(prompts: list[str], streams: list[list[int]], rows: list[dict]) -> list[float], where rows carry the
    dataset columns (utt_id, prompt_id, text) of each completion.
    """

    def __init__(self, name: str, tokenizer, fmt, score_fn: Callable):
        self.__name__ = name  # TRL logs rewards under the function's name
        self.tokenizer, self.fmt, self.score_fn = tokenizer, fmt, score_fn

    def stream(self, ids: list[int]) -> list[int]:
        return self.fmt.parse_codes(" ".join(self.tokenizer.convert_ids_to_tokens(list(ids)))).tolist()

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        streams = [self.stream(ids) for ids in completion_ids]
        rows = [{key: kwargs[key][i] for key in ("utt_id", "prompt_id", "text") if key in kwargs}
                for i in range(len(streams))]
        return [float(x) for x in self.score_fn(list(prompts), streams, rows)]


def speech_reward(wer: float | None, sim: float, frames: int, sim_weight: float, pause: float = 0.0,
                  pause_weight: float = 0.0, ear_nll: float | None = None) -> float:
    """GRPO's direct reward of one rendered completion: content + sim_weight x SIM - pause_weight x pause (pause: 1.0
    when the pause detector finds the defect), and 0 for a completion with no frames (it said nothing; as Koel-TTS's
    reward gives runaway or empty outputs 0). The content term is 1 - min(WER, 1) (pocketsphinx), or exp(-ear_nll)
    where the second ear judges (``train.grpo.reward: ear``): the geometric mean of the probabilities of the text's
    phones, in (0, 1] like 1 - WER but continuous. Neither (``reward: pause``): 1 - pause."""
    if frames == 0:
        return 0.0
    if ear_nll is not None:
        content = math.exp(-max(float(ear_nll), 0.0))
    elif wer is not None:
        content = 1.0 - min(float(wer), 1.0)
    else:
        return 1.0 - float(pause)
    return content + sim_weight * float(sim) - pause_weight * float(pause)


def _direct_reward(ctx: "Context", k: int, policy, kind: str) -> Callable:
    """``speech_reward`` of each completion rendered through round k-1's renderer and codec, judged by the run's
    scorers (the pair stage's ``SCORERS``): kind wer, wer_sim, pause or ear (``train.grpo.reward``), minus
    ``train.grpo.pause_weight`` x the pause detector's verdict."""
    from align.pairs import SCORERS, SampleBatch

    gcfg = ctx.cfg.train.grpo
    wer_fn = SCORERS["wer"](ctx) if kind in ("wer", "wer_sim") else None
    sim_fn = SCORERS["sim"](ctx) if kind == "wer_sim" else None
    ear_fn = SCORERS["ear_nll"](ctx) if kind == "ear" else None
    pause_fn = SCORERS["pause"](ctx) if kind == "pause" or gcfg.pause_weight > 0 else None
    w = gcfg.sim_weight if kind == "wer_sim" else 0.0

    def score(prompts, streams, rows):
        batch = SampleBatch(ctx, k, [{"id": r["utt_id"], "prompt_id": r["prompt_id"], "text": r["text"], "codes": c}
                                     for r, c in zip(rows, streams)])
        if policy is not None:
            batch.__dict__["policy"] = policy  # already loaded: no second copy
        n = len(streams)
        wers = wer_fn(batch) if wer_fn else [None] * n
        sims = sim_fn(batch) if sim_fn else [0.0] * n
        nlls = ear_fn(batch) if ear_fn else [None] * n
        pauses = pause_fn(batch) if pause_fn else [0.0] * n
        frames = [sum(1 for x in c if x >= 0) for c in streams]
        return [speech_reward(a, b, f, w, p, gcfg.pause_weight, ear_nll=e)
                for a, b, f, p, e in zip(wers, sims, frames, pauses, nlls)]

    return score


def _walk_rollout(policy, prompts_by_str: dict, gcfg, seed: int, max_frames: int | None = None):
    """TRL's ``rollout_func``: completions drawn by our sampler (``Policy.generate``: the emit rule's walk, the
    length bound, ``max_frames`` in place of the policy's own cap where given), one per prompt entry (TRL repeats
    each prompt ``num_generations`` times), from the weights in training. Returns TRL's dict: prompt_ids,
    completion_ids (with ``<eos>``), logprobs None."""
    import dataclasses

    calls = iter(range(1 << 30))

    def rollout(prompts: list[str], trainer) -> dict:
        lm = trainer.accelerator.unwrap_model(trainer.model)
        was_training = lm.training
        view = dataclasses.replace(policy, lm=lm)
        texts = [prompts_by_str[p][0] for p in prompts]
        codes = [prompts_by_str[p][1] for p in prompts]
        out = view.generate(texts, codes, n=1, temperature=gcfg.temperature, top_k=gcfg.top_k,
                            seed=seed + 7919 * next(calls) + 101 * trainer.accelerator.process_index,
                            batch_size=len(prompts), max_frames=max_frames)
        lm.train(was_training)
        tok, fmt = policy.tokenizer, policy.format
        return {"prompt_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
                "completion_ids": [tok(fmt.completion_str(s[0]), add_special_tokens=False)["input_ids"] for s in out],
                "logprobs": None}

    return rollout


def grpo(ctx: "Context", k: int) -> dict:
    """GRPO from round k-1's policy (also the KL reference) on this round's sampled prompts: completions drawn by
    our sampler through the emit rule (``_walk_rollout``), scored under the same rule (align/scoring.py), rewarded
    from the rendered audio (``speech_reward``) or by a reward model trained on the round's pairs."""
    import os

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.scoring import rule_scoring
    from models.codec_lm import Policy

    cfg, gcfg = ctx.cfg, ctx.cfg.train.grpo
    work = ctx.run.train_dir(k)
    work.mkdir(parents=True, exist_ok=True)
    policy = Policy.load(ctx.run.policy_dir(k - 1), device="cpu")
    extra: dict = {}
    if gcfg.reward == "reward_model":
        pairs = _kept_pairs(ctx, k)
        rm, extra = _train_rm(ctx, k, policy, pairs)
        score_fn = lambda prompts, streams, rows: rm.score(prompts, streams).tolist()  # noqa: E731
    else:
        score_fn = _direct_reward(ctx, k, policy, gcfg.reward)
    reward = StreamReward(f"reward_{gcfg.reward}", policy.tokenizer, policy.format, score_fn)

    rows = read_jsonl(ctx.run.samples_dir(k) / "samples.jsonl")
    by_id = {u.id: u for u in ctx.splits.train}
    seen, data, prompts_by_str = set(), [], {}
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            codes = ctx.codes(by_id[r["prompt_id"]])
            p = policy.conditioning(codes, r["text"])
            prompts_by_str[p] = (r["text"], codes)
            data.append({"prompt": p, "utt_id": r["id"], "prompt_id": r["prompt_id"], "text": r["text"]})
    # GRPO's rollouts alone: the policy saved as round k keeps round k-1's cap (its meta), which every later
    # round's sampling and evaluation read
    max_frames = gcfg.max_completion_frames or None
    args = GRPOConfig(
        output_dir=str(work / "trainer"), learning_rate=gcfg.learning_rate, max_steps=gcfg.steps,
        # prompts_per_step is the step's batch over all processes, as dpo.batch_size is: N processes take
        # the same steps as one (TRL groups the completions of a prompt across the processes)
        per_device_train_batch_size=per_process_batch(gcfg.num_generations * gcfg.prompts_per_step,
                                                      ctx.ranks.world, "train.grpo.num_generations x prompts_per_step"),
        num_generations=gcfg.num_generations, max_completion_length=policy_max_tokens(policy, data, max_frames),
        temperature=gcfg.temperature, top_k=gcfg.top_k, beta=gcfg.beta, loss_type=gcfg.loss_type,
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to="none", seed=cfg.seed + k,
        data_seed=cfg.seed + k, use_cpu=ctx.device == "cpu", dataloader_num_workers=0, bf16=False, fp16=False,
        gradient_checkpointing=False, log_completions=False)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's experimental hook: we rely on it
    with rule_scoring(policy.emit_rule):  # TRL passes its sampling temperature: the rule's log-probs at it
        trainer = GRPOTrainer(model=policy.lm, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(data),
                              processing_class=policy.tokenizer,
                              callbacks=[nan_guard("GRPO", "lower train.grpo.learning_rate")],
                              rollout_func=_walk_rollout(policy, prompts_by_str, gcfg, cfg.seed * 1000 + k,
                                                         max_frames))
    validator = _validator(ctx, k, policy, trainer)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    model = trainer.accelerator.unwrap_model(trainer.model)
    if validator is not None and validator.best["step"] == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ctx.run.policy_dir(k - 1), dtype=torch.float32)
    elif validator is not None:
        model.load_state_dict(validator.best_state())
    policy.lm = model.cpu().eval()
    policy.lm.__dict__.pop("forward", None)
    figures = kept_figures(history, {"loss": "loss", "grpo_reward": "reward", "grpo_reward_std": "reward_std"},
                           None if validator is None else validator.best["step"])
    summary = _summary("grpo", **figures, pairs=extra.get("rm_pairs"), prompts=len(data), steps=gcfg.steps, **extra,
                       **(validator.summary() if validator is not None else {}))
    _finish(ctx, k, policy, summary, history, work / "trainer", validator)
    log.info("round %d grpo: loss %s reward %s", k, summary["loss"], summary["grpo_reward"])
    return summary


def policy_max_tokens(policy, data: list[dict], max_frames: int | None = None) -> int:
    """The longest completion (tokens, ``<eos>`` included) the sampler can write for any of ``data``'s texts
    (``max_frames``: the cap ``Policy.generate`` is given in place of the policy's own)."""
    fmt = policy.format
    if policy.emit_rule.walk:
        return max(len(fmt.units(d["text"])) for d in data) * (policy.emit_rule.max_frames + 1) + 1
    if max_frames is not None:
        return max_frames + 1
    return int(policy.meta.get("max_seconds", 6.0) * policy.codec.frame_rate) + 1


# name -> fn(ctx, k) -> summary. The round's training stage dispatches here on train.method.
METHODS: dict[str, Callable] = {"dpo": dpo, "sft_control": sft_control, "reward_bon": reward_bon, "grpo": grpo,
                                "coh": coh}


# Methods that learn from the round's pairs (the others read its samples).
PAIR_METHODS = ("dpo", "coh", "reward_bon")


def train(ctx: "Context", k: int) -> dict:
    """The round's training stage (stage name ``dpo``): run ``train.method``; a pair method with no kept pair (the
    pair stage allowed it, ``pair.allow_empty``) keeps round k-1's policy."""
    if ctx.cfg.train.method in PAIR_METHODS and not _kept_pairs(ctx, k):
        from models.codec_lm import Policy

        log.warning("round %d %s: no pair to learn from; round %d's policy carries over", k, ctx.cfg.train.method, k - 1)
        summary = _summary(ctx.cfg.train.method, pairs=0, carried_over=True)
        _finish(ctx, k, Policy.load(ctx.run.policy_dir(k - 1), device="cpu"), summary, [])
        return summary
    return METHODS[ctx.cfg.train.method](ctx, k)
