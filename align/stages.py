"""The stages of one alignment round, each a plain function over the run directory.

    sample(ctx, k)    round k-1's policy speaks training texts       -> round_k/samples/samples.jsonl
    pair(ctx, k)      preference pairs (strategies in align/pairs.py) -> round_k/pairs/pairs.jsonl
    dpo(ctx, k)       trl.DPOTrainer, round k-1's policy as reference -> round_k/dpo/, round_k/policy/
                      (the loop's 'dpo' stage runs align.methods.train, which dispatches on train.method)
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from align.io import atomic_dir
from align.pairs import PAIR_STRATEGIES, PairConfig, edit_distance  # noqa: F401  (re-exported)

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
    temperatures: list[float] = field(default_factory=list, metadata={
        "help": "per-sample temperatures, cycled over the sample index (sample j uses temperatures[j % len]); "
                "empty = sample.temperature for all. Samples of one checkpoint at one temperature sound alike, "
                "and ranking needs them to differ"})
    top_ps: list[float] = field(default_factory=list, metadata={
        "help": "per-sample top-p values, cycled like temperatures; empty = sample.top_p for all"})

    def __post_init__(self):
        if self.n < 1 or self.batch_size < 1 or self.prompts_per_round < 0:
            raise ValueError("sample.n and sample.batch_size must be >= 1, sample.prompts_per_round >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sample.temperature >= 0, 0 < sample.top_p <= 1 and sample.top_k >= 0 are required")
        if any(t < 0 for t in self.temperatures) or any(not 0 < p <= 1 for p in self.top_ps):
            raise ValueError("sample.temperatures must be >= 0 and sample.top_ps in (0, 1]")

    def settings(self, j: int) -> tuple[float, float]:
        """(temperature, top_p) of sample index j."""
        t = self.temperatures[j % len(self.temperatures)] if self.temperatures else self.temperature
        p = self.top_ps[j % len(self.top_ps)] if self.top_ps else self.top_p
        return t, p

    @property
    def varied(self) -> bool:
        return bool(self.temperatures or self.top_ps)


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
    # Extra parameters of some TRL loss types (passed to trl.DPOConfig as they are).
    label_smoothing: float = field(default=0.0, metadata={
        "help": "robust: probability that a preference label is flipped, in [0, 0.5) (paper: 0.1); exo_pair: "
                "its epsilon (paper: 1e-3)"})
    discopop_tau: float = field(default=0.05, metadata={"help": "discopop: temperature of the log-ratio modulation"})
    ld_alpha: float | None = field(default=None, metadata={
        "help": "LD-DPO: weight of the tokens beyond the shorter sequence's length, in [0, 1]; null = off. "
                "Codec sequences differ in length, and summed log-probs favour the shorter"})
    f_divergence_type: str = field(default="reverse_kl", metadata={
        "help": "f-DPO regulariser: reverse_kl, forward_kl, js_divergence, alpha_divergence"})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={
        "help": "alpha of f_divergence_type=alpha_divergence"})
    use_weighting: bool = field(default=False, metadata={
        "help": "WPO: weight pairs by the policy's length-normalised probability of them"})

    def __post_init__(self):
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight={self.sft_weight} must be >= 0")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing}: robust DPO needs it in [0, 0.5)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"dpo.ld_alpha={self.ld_alpha} must be in [0, 1] or null")
        if self.f_divergence_type not in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
            raise ValueError(f"dpo.f_divergence_type={self.f_divergence_type!r}: choose reverse_kl, forward_kl, "
                             "js_divergence or alpha_divergence")
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
    asr: str = field(default="pocketsphinx", metadata={"help": "ASR backend for WER: pocketsphinx (embedded) or whisper"})
    asr_model: str | None = field(default=None, metadata={
        "help": "whisper: hub id (already cached) or local folder, e.g. openai/whisper-large-v3; "
                "pocketsphinx: a model folder (null = the one the package ships)"})
    speaker: str = field(default="resemblyzer", metadata={
        "help": "speaker encoder for SIM: resemblyzer (embedded), ecapa (speechbrain) or wavlm (WavLMForXVector)"})
    speaker_model: str | None = field(default=None, metadata={
        "help": "ecapa: local copy of speechbrain/spkrec-ecapa-voxceleb; wavlm: hub id (cached) or folder, "
                "e.g. microsoft/wavlm-base-plus-sv; null = the backend's default id"})
    quality: str = field(default="dnsmos_p808", metadata={
        "help": "per-utterance MOS proxy: dnsmos_p808 (0.1 s CPU/utt), dnsmos (+ P.835 SIG/BAK/OVRL, 2 s CPU/utt), "
                "utmos (needs utmos_checkpoint) or none"})
    utmos_checkpoint: str | None = field(default=None, metadata={
        "help": "quality=utmos: a UTMOS predictor exported to TorchScript (see eval/quality.py)"})
    allow_download: bool = field(default=False, metadata={
        "help": "let whisper/ecapa/wavlm fetch an uncached hub id (needs network); off: nothing is downloaded"})
    extra_sets: list[str] = field(default_factory=list, metadata={
        "help": "more test sets scored every round beside data.test (manifests or LibriSpeech/LibriTTS/VCTK "
                "folders), e.g. VCTK for cross-corpus zero-shot; results in eval/<folder name>/"})
    prompt_min_seconds: float = field(default=3.0, metadata={
        "help": "voice prompt: another utterance of the target speaker at least this long (else the longest); "
                "the policy keeps policy.prompt_seconds of it. 0 = any length"})
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
        from eval.asr import ASR_BACKENDS
        from eval.speaker import SPEAKER_ENCODERS

        if self.asr not in ASR_BACKENDS:
            raise ValueError(f"eval.asr={self.asr!r}: choose one of {sorted(ASR_BACKENDS)}")
        if self.speaker not in SPEAKER_ENCODERS:
            raise ValueError(f"eval.speaker={self.speaker!r}: choose one of {sorted(SPEAKER_ENCODERS)}")
        if self.quality not in ("none", "dnsmos_p808", "dnsmos", "utmos"):
            raise ValueError(f"eval.quality={self.quality!r}: choose none, dnsmos_p808, dnsmos or utmos")
        if self.quality == "utmos" and not self.utmos_checkpoint:
            raise ValueError("eval.quality=utmos needs eval.utmos_checkpoint (a TorchScript UTMOS file)")
        if self.prompt_min_seconds < 0:
            raise ValueError(f"eval.prompt_min_seconds={self.prompt_min_seconds} must be >= 0")
        if self.save_audio < 0 or self.gap_utterances < 0:
            raise ValueError("eval.save_audio >= 0 and eval.gap_utterances >= 0 are required (0 = off)")

    def asr_kwargs(self, device: str) -> dict:
        """Constructor arguments of the configured ASR backend."""
        if self.asr == "whisper":
            return {"device": device, "allow_download": self.allow_download,
                    **({"model": self.asr_model} if self.asr_model else {})}
        return {"model_dir": self.asr_model} if self.asr_model else {}

    def speaker_kwargs(self, device: str) -> dict:
        """Constructor arguments of the configured speaker encoder."""
        if self.speaker == "resemblyzer":
            return {"device": device}
        return {"device": device, "allow_download": self.allow_download,
                **({"model": self.speaker_model} if self.speaker_model else {})}

    def quality_kwargs(self, device: str) -> dict:
        """Constructor arguments of the configured quality model."""
        return {"checkpoint": self.utmos_checkpoint, "device": device} if self.quality == "utmos" else {}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
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
    texts, prompt_codes = [u.text for u in subset], [ctx.codes(p) for p in prompts]
    t0 = time.time()
    if scfg.varied:  # one generate() per sample index, each with its own (temperature, top_p)
        outs = [[] for _ in subset]
        for j in range(scfg.n):
            temperature, top_p = scfg.settings(j)
            one = policy.generate(texts, prompt_codes, n=1, temperature=temperature, top_k=scfg.top_k, top_p=top_p,
                                  batch_size=scfg.batch_size, seed=cfg.seed * 1000 + k + 7919 * j, progress=True)
            for o, s in zip(outs, one):
                o.extend(s)
    else:
        outs = policy.generate(texts, prompt_codes, n=scfg.n, temperature=scfg.temperature, top_k=scfg.top_k,
                               top_p=scfg.top_p, batch_size=scfg.batch_size, seed=cfg.seed * 1000 + k, progress=True)
    seconds = time.time() - t0
    rows = []
    for u, p, samples in zip(subset, prompts, outs):
        for j, codes in enumerate(samples):
            temperature, top_p = scfg.settings(j)
            rows.append({"id": u.id, "prompt_id": p.id, "text": u.text, "speaker": u.speaker, "sample": j,
                         "temperature": temperature, "top_p": top_p, "codes": codes.tolist()})
    n_tokens = sum(len(r["codes"]) for r in rows)
    stats = {"prompts": len(subset), "samples": len(rows), "tokens": n_tokens,
             "tokens_per_second": n_tokens / max(seconds, 1e-9),
             "empty": sum(1 for r in rows if not r["codes"])}
    with atomic_dir(ctx.run.round_dir(k) / "samples") as tmp:
        write_jsonl(tmp / "samples.jsonl", rows)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("round %d sample: %d samples, %.0f tokens/s", k, len(rows), stats["tokens_per_second"])
    return stats


def pair(ctx: "Context", k: int) -> dict:
    """Samples -> preference pairs (recorded with scores; filtered pairs kept with keep=false)."""
    from align.run import read_jsonl, write_jsonl
    from models.codec_lm import format_of

    cfg = ctx.cfg
    fmt = format_of(ctx.run.policy_dir(k - 1))  # the layout of the policy that is being aligned
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
        p["round"] = k
        p["prompt"] = fmt.prompt_str(prompt_codes, p["text"])
        p["chosen"] = fmt.completion_str(p["chosen_codes"])
        p["rejected"] = fmt.completion_str(p["rejected_codes"])
    if not kept:
        raise ValueError(f"round {k}: every pair was filtered out (pair.min_distance={cfg.pair.min_distance}, "
                         f"pair.min_gap={cfg.pair.min_gap}, pair.max_chosen_wer={cfg.pair.max_chosen_wer}); "
                         "loosen them or sample with more diversity (sample.temperatures)")
    drops: dict[str, int] = {}
    for p in pairs:
        if not p["keep"]:
            drops[p.get("drop", "max_pairs")] = drops.get(p.get("drop", "max_pairs"), 0) + 1
    new_kept = len(kept)
    if cfg.pair.data == "accumulate":  # earlier rounds' own kept pairs (not what they accumulated)
        first = 1 if cfg.pair.accumulate_rounds == 0 else max(1, k - cfg.pair.accumulate_rounds)
        for j in range(first, k):
            for p in read_jsonl(ctx.run.round_dir(j) / "pairs" / "pairs.jsonl"):
                if p["keep"] and p.get("round", j) == j:
                    pairs.append(p)
                    kept.append(p)
    stats = {"pairs": len(kept), "new_pairs": new_kept, "accumulated": len(kept) - new_kept,
             "dropped": len(pairs) - len(kept), "drop_reasons": drops,
             "mean_token_distance": float(np.mean([p["scores"]["token_distance"] for p in kept])),
             "mean_length_ratio": float(np.mean([p["scores"]["length_ratio"] for p in kept]))}
    gaps = [p["scores"]["gap"] for p in kept if "gap" in p["scores"]]
    if gaps:
        stats["mean_score_gap"] = float(np.mean(gaps))
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
    from models.codec_lm import Policy, with_hint

    cfg, dcfg = ctx.cfg, ctx.cfg.dpo
    prev = ctx.run.policy_dir(k - 1)
    pairs = [p for p in read_jsonl(ctx.run.round_dir(k) / "pairs" / "pairs.jsonl") if p["keep"]]
    policy = Policy.load(prev, device="cpu")
    hint = policy.meta.get("quality_hint")  # a Chain-of-Hindsight policy is conditioned on its hint
    dataset = Dataset.from_list([{"prompt": with_hint(p["prompt"], hint), "chosen": p["chosen"],
                                  "rejected": p["rejected"]} for p in pairs])
    ref = AutoModelForCausalLM.from_pretrained(prev, dtype=torch.float32)
    work = ctx.run.round_dir(k) / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    args = DPOConfig(
        output_dir=str(work / "trainer"), beta=dcfg.beta,
        loss_type=[dcfg.loss_type] + (["sft"] if dcfg.sft_weight > 0 else []),
        loss_weights=[1.0, dcfg.sft_weight] if dcfg.sft_weight > 0 else None,
        label_smoothing=dcfg.label_smoothing, discopop_tau=dcfg.discopop_tau, ld_alpha=dcfg.ld_alpha,
        f_divergence_type=dcfg.f_divergence_type, f_alpha_divergence_coef=dcfg.f_alpha_divergence_coef,
        use_weighting=dcfg.use_weighting,
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

    stats = {"method": "dpo", "steps": result.global_step, "loss": mean("loss"), "reward_accuracy": mean("rewards/accuracies"),
             "reward_margin": mean("rewards/margins"), "logps_chosen": mean("logps/chosen"),
             "logps_rejected": mean("logps/rejected"), "pairs": len(pairs)}
    write_json(work / "metrics.json", {"summary": stats, "history": history})
    shutil.rmtree(work / "trainer", ignore_errors=True)  # the policy dir is the round's checkpoint
    log.info("round %d dpo: loss %.4f reward acc %.3f margin %.3f", k, stats["loss"] or float("nan"),
             stats["reward_accuracy"] or float("nan"), stats["reward_margin"] or float("nan"))
    return stats


def eval_items(ctx: "Context", test=None):
    """The fixed evaluation set: test utterances with their voice prompts (same across rounds)."""
    from eval.evaluate import EvalItem

    test = ctx.splits.test if test is None else test
    items = _round_subset(test, ctx.cfg.eval.max_utterances, ctx.cfg.seed)
    out = []
    for u in items:
        p = ctx.prompt_for(u, test, min_seconds=ctx.cfg.eval.prompt_min_seconds)
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
    from eval.quality import build_quality
    from eval.speaker import build_speaker_encoder
    from models.codec_lm import Policy

    from align.data import load_any

    ecfg = ctx.cfg.eval
    policy = Policy.load(ctx.run.policy_dir(k), device=ctx.device)
    scorers = dict(asr=build_asr(ecfg.asr, **ecfg.asr_kwargs(ctx.device)),
                   speaker=build_speaker_encoder(ecfg.speaker, **ecfg.speaker_kwargs(ctx.device)),
                   quality=build_quality(ecfg.quality, **ecfg.quality_kwargs(ctx.device)))
    # a folder keeps its whole name (VCTK-Corpus-0.92), a manifest loses its suffix
    sets = [("", None)] + [(Path(p).name if Path(p).is_dir() else Path(p).stem, p) for p in ecfg.extra_sets]
    with atomic_dir(ctx.run.round_dir(k) / "eval") as tmp:
        for name, src in sets:
            out = tmp / name if name else tmp
            out.mkdir(parents=True, exist_ok=True)
            items = eval_items(ctx, None if src is None else load_any(src)[0])
            set_summary, rows = evaluate_policy(
                policy, items, **scorers,
                temperature=ecfg.temperature, top_k=ecfg.top_k, top_p=ecfg.top_p, seed=ctx.cfg.seed + 7,
                batch_size=ecfg.batch_size, save_audio_dir=out / "audio", save_n=ecfg.save_audio,
                max_seconds=ctx.cfg.data.max_seconds)
            # The item set is fixed, so the same first save_audio ids have audio every round (an empty
            # output has none); the paths let the report play the golden and prompt recordings beside it.
            for i, (r, it) in enumerate(zip(rows, items)):
                r.update({"round": k, "item": i, "sample": 0, "audio": it.audio, "prompt_audio": it.prompt_audio,
                          "saved_audio": f"audio/{it.id}.wav" if (out / "audio" / f"{it.id}.wav").exists() else None})
            write_jsonl(out / "rows.jsonl", rows)
            (out / "summary.json").write_text(json.dumps(set_summary, indent=2))
            if not name:
                summary = set_summary
            else:
                summary.setdefault("extra", {})[name] = {key: set_summary.get(key) for key in
                                                         ("wer", "sim", "dnsmos", "utmos", "n")}
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
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("round %d eval: WER %.3f SIM %.3f %s(n=%d)%s", k, summary["wer"], summary["sim"],
             "".join(f"{q} {summary[q]:.3f} " for q in ("dnsmos", "utmos") if summary.get(q) is not None), summary["n"],
             f"; gap AUC {summary['gap_auc']:.3f} log-p margin {summary['gap_logp_margin']:+.3f}"
             if summary.get("gap_auc") is not None else "")
    return summary
