"""The stages of one alignment round, each a plain function over the run directory.

    sample(ctx, k)    round k-1's policy speaks training texts       -> round_k/samples/samples.jsonl
    pair(ctx, k)      golden (chosen) vs synthetic (rejected) pairs  -> round_k/pairs/pairs.jsonl
    dpo(ctx, k)       trl.DPOTrainer, round k-1's policy as reference -> round_k/dpo/, round_k/policy/
    evaluate(ctx, k)  WER / SIM of round k's policy on the test split -> round_k/eval/

Each reads only files of earlier stages and writes its folder through a temp name, so any stage
can be re-run alone (``--only-stage``) and a killed stage leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from align.io import atomic_dir

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.stages")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleConfig:
    """How the current policy speaks the training texts each round."""

    prompts_per_round: int = field(default=256, metadata={
        "help": "training utterances sampled per round (a fresh seeded subset each round); 0 = all"})
    n: int = field(default=1, metadata={"help": "samples per prompt (best-of-N and ranking strategies use > 1)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "top-k filter; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus filter; 1 = off"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate() call"})

    def __post_init__(self):
        if self.n < 1 or self.batch_size < 1 or self.prompts_per_round < 0:
            raise ValueError("sample.n and sample.batch_size must be >= 1, sample.prompts_per_round >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sample.temperature >= 0, 0 < sample.top_p <= 1 and sample.top_k >= 0 are required")


@dataclass
class PairConfig:
    """How samples become preference pairs."""

    strategy: str = field(default="golden_vs_synthetic", metadata={
        "help": "golden_vs_synthetic: golden tokens chosen, each synthetic sample rejected"})
    min_distance: float = field(default=0.05, metadata={
        "help": "drop pairs whose synthetic codes are this close to golden (normalised edit distance): "
                "a near-copy of the golden tokens carries no preference signal"})
    max_pairs: int = field(default=0, metadata={"help": "cap on pairs per round; 0 = no cap"})

    def __post_init__(self):
        if self.strategy not in PAIR_STRATEGIES:
            raise ValueError(f"pair.strategy={self.strategy!r} unknown; choose one of {sorted(PAIR_STRATEGIES)}")
        if not 0 <= self.min_distance < 1:
            raise ValueError(f"pair.min_distance={self.min_distance} must be in [0, 1)")


@dataclass
class DPOStageConfig:
    """DPO through trl.DPOTrainer, round k-1's policy as the reference."""

    beta: float = field(default=0.1, metadata={"help": "KL strength; beta -> 0 ignores the reference"})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "any loss_type trl.DPOConfig accepts: sigmoid, ipo, hinge, robust, sigmoid_norm, ..."})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate (paper scale: 5e-7)"})
    steps: int = field(default=60, metadata={"help": "optimiser steps per round"})
    batch_size: int = field(default=8, metadata={"help": "pairs per device per step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    sft_weight: float = field(default=0.0, metadata={
        "help": "weight of an SFT term on the chosen (golden) tokens added to the DPO loss (RPO-style); "
                "keeps the chosen log-probs from falling with the rejected ones"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warm-up"})
    max_length: int = field(default=1024, metadata={"help": "longest prompt + completion in tokens"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights; "
                                                         "merged into the saved policy"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={
        "help": "modules LoRA wraps"})
    save_steps: int = field(default=20, metadata={
        "help": "trainer checkpoint every N steps; a killed DPO resumes from the last one"})

    def __post_init__(self):
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight={self.sft_weight} must be >= 0")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be > 0")
        if self.learning_rate <= 0 or self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("dpo.learning_rate > 0 and dpo.steps, dpo.batch_size, dpo.grad_accum >= 1 are required")
        from trl import DPOConfig

        known = _trl_loss_types(DPOConfig)
        if known and self.loss_type not in known:
            raise ValueError(f"dpo.loss_type={self.loss_type!r} is not one the installed TRL offers: {known}")


def _trl_loss_types(cls) -> list[str]:
    import dataclasses
    import re

    for f in dataclasses.fields(cls):
        if f.name == "loss_type":
            return re.findall(r"`'([a-z_]+)'`", f.metadata.get("help", ""))
    return []


@dataclass
class EvalConfig:
    """How each round's policy is scored on the test split."""

    max_utterances: int = field(default=0, metadata={"help": "test utterances scored (a fixed subset); 0 = all"})
    asr: str = field(default="pocketsphinx", metadata={"help": "ASR backend for WER"})
    speaker: str = field(default="resemblyzer", metadata={"help": "speaker encoder for SIM"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature at evaluation; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "top-k at evaluation"})
    top_p: float = field(default=1.0, metadata={"help": "top-p at evaluation"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generate() call"})
    save_audio: int = field(default=8, metadata={
        "help": "write the synthesised wavs of the first N evaluation utterances (the same N every round, "
                "round_k/eval/audio/<id>.wav) for listening and the HTML report"})
    gap_utterances: int = field(default=32, metadata={
        "help": "held-out (dev + test) utterances of the golden-vs-synthetic gap analysis (eval/gap.py), a fixed "
                "seeded subset sampled from every round's policy; 0 = off"})

    def __post_init__(self):
        if self.max_utterances < 0 or self.batch_size < 1:
            raise ValueError("eval.max_utterances >= 0 and eval.batch_size >= 1 are required")
        if self.save_audio < 0 or self.gap_utterances < 0:
            raise ValueError("eval.save_audio >= 0 and eval.gap_utterances >= 0 are required (0 = off)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two code sequences (O(len(a) * len(b)), numpy rows)."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    b_arr = np.asarray(b)
    prev = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        sub = prev[:-1] + (b_arr != x)
        cur[1:] = np.minimum(sub, prev[1:] + 1)
        # insertions run left to right: a cumulative min over (cur[j-1] + 1)
        cur = np.minimum.accumulate(cur - np.arange(len(cur))) + np.arange(len(cur))
        prev = cur
    return int(prev[-1])


def _round_subset(items: list, n: int, seed: int) -> list:
    if n == 0 or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    return sorted(rng.sample(items, n), key=lambda u: u.id)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def sample(ctx: "Context", k: int) -> dict:
    """Round k-1's policy speaks a seeded subset of the training texts, N samples each."""
    from align.run import write_jsonl
    from models.codec_lm import Policy

    cfg, scfg = ctx.cfg, ctx.cfg.sample
    train = ctx.splits.train
    subset = _round_subset(train, scfg.prompts_per_round, cfg.seed * 1000 + k)
    prompts = [ctx.prompt_for(u, train, salt=k) for u in subset]
    policy = Policy.load(ctx.run.policy_dir(k - 1), device=ctx.device)
    t0 = time.time()
    outs = policy.generate([u.text for u in subset], [ctx.codes(p) for p in prompts], n=scfg.n,
                           temperature=scfg.temperature, top_k=scfg.top_k, top_p=scfg.top_p,
                           batch_size=scfg.batch_size, seed=cfg.seed * 1000 + k, progress=True)
    seconds = time.time() - t0
    rows = []
    for u, p, samples in zip(subset, prompts, outs):
        for j, codes in enumerate(samples):
            rows.append({"id": u.id, "prompt_id": p.id, "text": u.text, "speaker": u.speaker, "sample": j,
                         "codes": codes.tolist()})
    n_tokens = sum(len(r["codes"]) for r in rows)
    stats = {"prompts": len(subset), "samples": len(rows), "tokens": n_tokens,
             "tokens_per_second": n_tokens / max(seconds, 1e-9),
             "empty": sum(1 for r in rows if not r["codes"])}
    with atomic_dir(ctx.run.round_dir(k) / "samples") as tmp:
        write_jsonl(tmp / "samples.jsonl", rows)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("round %d sample: %d samples, %.0f tokens/s", k, len(rows), stats["tokens_per_second"])
    return stats


def golden_vs_synthetic(ctx: "Context", k: int, rows: list[dict]) -> list[dict]:
    """Golden RVQ-1 = chosen, each synthetic sample = rejected; scored by token distance and length."""
    pcfg = ctx.cfg.pair
    by_id = {u.id: u for u in ctx.splits.train}
    pairs = []
    for r in rows:
        utt = by_id[r["id"]]
        golden = ctx.codes(utt)[0].tolist()
        synth = r["codes"]
        dist = edit_distance(golden, synth) / max(len(golden), len(synth), 1)
        pairs.append({"id": r["id"], "prompt_id": r["prompt_id"], "text": r["text"], "sample": r["sample"],
                      "chosen_codes": golden, "rejected_codes": synth,
                      "scores": {"token_distance": dist, "length_ratio": len(synth) / max(1, len(golden)),
                                 "rejected_len": len(synth), "chosen_len": len(golden)},
                      "keep": dist >= pcfg.min_distance})
    return pairs


PAIR_STRATEGIES = {"golden_vs_synthetic": golden_vs_synthetic}


def pair(ctx: "Context", k: int) -> dict:
    """Samples -> preference pairs (recorded with scores; filtered pairs kept with keep=false)."""
    from align.run import read_jsonl, write_jsonl
    from models.codec_lm import completion_str, prompt_str

    cfg = ctx.cfg
    rows = read_jsonl(ctx.run.round_dir(k) / "samples" / "samples.jsonl")
    pairs = PAIR_STRATEGIES[cfg.pair.strategy](ctx, k, rows)
    n_prompt = max(1, int(round(cfg.policy.prompt_seconds * ctx.codec.frame_rate)))
    by_id = {u.id: u for u in ctx.splits.train}
    kept = [p for p in pairs if p["keep"]]
    if cfg.pair.max_pairs and len(kept) > cfg.pair.max_pairs:
        keep_ids = {id(p) for p in random.Random(cfg.seed + k).sample(kept, cfg.pair.max_pairs)}
        for p in kept:
            p["keep"] = id(p) in keep_ids
        kept = [p for p in pairs if p["keep"]]
    for p in pairs:
        prompt_codes = ctx.codes(by_id[p["prompt_id"]])[0, :n_prompt]
        p["prompt"] = prompt_str(prompt_codes, p["text"])
        p["chosen"] = completion_str(p["chosen_codes"])
        p["rejected"] = completion_str(p["rejected_codes"])
    if not kept:
        raise ValueError(f"round {k}: every pair was filtered out (pair.min_distance={cfg.pair.min_distance}); "
                         "lower it or sample with more diversity")
    stats = {"pairs": len(kept), "dropped": len(pairs) - len(kept),
             "mean_token_distance": float(np.mean([p["scores"]["token_distance"] for p in kept])),
             "mean_length_ratio": float(np.mean([p["scores"]["length_ratio"] for p in kept]))}
    with atomic_dir(ctx.run.round_dir(k) / "pairs") as tmp:
        write_jsonl(tmp / "pairs.jsonl", pairs)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("round %d pair: %d pairs kept, %d dropped", k, stats["pairs"], stats["dropped"])
    return stats


def nan_guard():
    """A trainer callback that stops loudly when the DPO loss is not finite."""
    from transformers import TrainerCallback

    class NaNGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(
                    f"DPO loss became {loss} at step {state.global_step}; lower dpo.learning_rate or dpo.beta. "
                    "The previous round's policy is untouched.")

    return NaNGuard()


def dpo(ctx: "Context", k: int) -> dict:
    """DPO on round k's pairs; round k-1's policy is both the start and the frozen reference."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from align.run import read_jsonl, write_json
    from models.codec_lm import Policy

    cfg, dcfg = ctx.cfg, ctx.cfg.dpo
    prev = ctx.run.policy_dir(k - 1)
    pairs = [p for p in read_jsonl(ctx.run.round_dir(k) / "pairs" / "pairs.jsonl") if p["keep"]]
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                 for p in pairs])
    policy = Policy.load(prev, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(prev, dtype=torch.float32)
    work = ctx.run.round_dir(k) / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    args = DPOConfig(
        output_dir=str(work / "trainer"), beta=dcfg.beta,
        loss_type=[dcfg.loss_type] + (["sft"] if dcfg.sft_weight > 0 else []),
        loss_weights=[1.0, dcfg.sft_weight] if dcfg.sft_weight > 0 else None,
        learning_rate=dcfg.learning_rate, max_steps=dcfg.steps, per_device_train_batch_size=dcfg.batch_size,
        gradient_accumulation_steps=dcfg.grad_accum, warmup_steps=int(dcfg.warmup_ratio * dcfg.steps),
        lr_scheduler_type="cosine", max_length=dcfg.max_length, logging_steps=1, save_steps=dcfg.save_steps,
        save_strategy="steps", save_total_limit=1, save_only_model=False, report_to="none", seed=cfg.seed + k,
        data_seed=cfg.seed + k, use_cpu=ctx.device == "cpu", dataloader_num_workers=0, disable_tqdm=False,
        bf16=False, fp16=False, gradient_checkpointing=False)
    peft_config = None
    if dcfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=dcfg.lora_r, lora_alpha=dcfg.lora_alpha, lora_dropout=dcfg.lora_dropout,
                                 target_modules=list(dcfg.lora_targets), task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=policy.lm, ref_model=None if dcfg.lora else ref, args=args, train_dataset=dataset,
                         processing_class=policy.tokenizer, peft_config=peft_config, callbacks=[nan_guard()])
    checkpoints = sorted((work / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resume = str(checkpoints[-1]) if checkpoints else None
    if resume:
        log.info("round %d dpo: resuming from %s", k, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h]
    model = trainer.model
    if dcfg.lora:
        model = model.merge_and_unload()
    policy.lm = model.eval()
    policy.save(ctx.run.policy_dir(k))
    tail = history[-max(1, len(history) // 5):]  # last 20% of steps: where the round ended up

    def mean(key):
        vals = [h[key] for h in tail if key in h]
        return float(np.mean(vals)) if vals else None

    stats = {"steps": result.global_step, "loss": mean("loss"), "reward_accuracy": mean("rewards/accuracies"),
             "reward_margin": mean("rewards/margins"), "logps_chosen": mean("logps/chosen"),
             "logps_rejected": mean("logps/rejected"), "pairs": len(pairs)}
    write_json(work / "metrics.json", {"summary": stats, "history": history})
    shutil.rmtree(work / "trainer", ignore_errors=True)  # the policy dir is the round's checkpoint
    log.info("round %d dpo: loss %.4f reward acc %.3f margin %.3f", k, stats["loss"] or float("nan"),
             stats["reward_accuracy"] or float("nan"), stats["reward_margin"] or float("nan"))
    return stats


def eval_items(ctx: "Context"):
    """The fixed evaluation set: test utterances with their voice prompts (same across rounds)."""
    from eval.evaluate import EvalItem

    test = ctx.splits.test
    items = _round_subset(test, ctx.cfg.eval.max_utterances, ctx.cfg.seed)
    out = []
    for u in items:
        p = ctx.prompt_for(u, test)
        out.append(EvalItem(u.id, u.text, u.speaker, u.audio, p.audio, prompt_codes=ctx.codes(p)))
    return out


def gap_items(ctx: "Context") -> list[tuple]:
    """The fixed gap-analysis set: a seeded subset of dev + test utterances with their prompts."""
    pools = [ctx.splits.dev, ctx.splits.test]
    pairs = [(u, pool) for pool in pools for u in pool]
    chosen = _round_subset([u for u, _ in pairs], ctx.cfg.eval.gap_utterances, ctx.cfg.seed + 11)
    pool_of = {u.id: pool for u, pool in pairs}
    return [(u, ctx.prompt_for(u, pool_of[u.id])) for u in chosen]


def evaluate(ctx: "Context", k: int) -> dict:
    """Score round k's policy on the test split; rows to eval/rows.jsonl, means to eval/summary.json.

    Also the golden-vs-synthetic gap (eval/gap.py) on held-out texts -> eval/gap.json and gap_* keys
    of the summary (so metrics.jsonl carries them per round).
    """
    from align.run import write_jsonl
    from eval.asr import build_asr
    from eval.evaluate import evaluate_policy
    from eval.speaker import build_speaker_encoder
    from models.codec_lm import Policy

    ecfg = ctx.cfg.eval
    policy = Policy.load(ctx.run.policy_dir(k), device=ctx.device)
    items = eval_items(ctx)
    with atomic_dir(ctx.run.round_dir(k) / "eval") as tmp:
        summary, rows = evaluate_policy(policy, items, asr=build_asr(ecfg.asr),
                                        speaker=build_speaker_encoder(ecfg.speaker), temperature=ecfg.temperature,
                                        top_k=ecfg.top_k, top_p=ecfg.top_p, seed=ctx.cfg.seed + 7,
                                        batch_size=ecfg.batch_size, save_audio_dir=tmp / "audio", save_n=ecfg.save_audio,
                                        max_seconds=ctx.cfg.data.max_seconds)
        # The item set is fixed, so the same first save_audio ids have audio every round (an empty
        # output has none); the paths let the report play the golden and prompt recordings beside it.
        for i, (r, it) in enumerate(zip(rows, items)):
            r.update({"round": k, "item": i, "sample": 0, "audio": it.audio, "prompt_audio": it.prompt_audio,
                      "saved_audio": f"audio/{it.id}.wav" if (tmp / "audio" / f"{it.id}.wav").exists() else None})
        if ecfg.gap_utterances:
            from eval.gap import gap_analysis

            chosen = gap_items(ctx)
            t0 = time.time()
            gap_summary, detail = gap_analysis(
                policy, [u.text for u, _ in chosen], [ctx.codes(p) for _, p in chosen],
                [ctx.codes(u)[0] for u, _ in chosen], [u.id for u, _ in chosen], temperature=ecfg.temperature,
                top_k=ecfg.top_k, top_p=ecfg.top_p, seed=ctx.cfg.seed + 13, batch_size=ecfg.batch_size)
            summary.update(gap_summary)
            summary["seconds"]["gap"] = round(time.time() - t0, 2)
            (tmp / "gap.json").write_text(json.dumps(detail))
        write_jsonl(tmp / "rows.jsonl", rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("round %d eval: WER %.3f SIM %.3f (n=%d)%s", k, summary["wer"], summary["sim"], summary["n"],
             f"; gap AUC {summary['gap_auc']:.3f} log-p margin {summary['gap_logp_margin']:+.3f}"
             if summary.get("gap_auc") is not None else "")
    return summary
