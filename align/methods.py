"""Training methods of a round: what turns round k's pairs into round k's policy.

    dpo          DPO through trl.DPOTrainer (any TRL loss_type, optional RPO-style SFT term) [stages.dpo]
    sft_control  continue-SFT on the golden tokens of the round's prompts, same steps / lr / batch as DPO:
                 the control that tells a preference gain from more teacher forcing
    reward_bon   a reward model (Bradley-Terry on the pairs) attached to round k-1's weights as a
                 Best-of-N reranker: no policy update, better samples at generation time
    grpo         trl.GRPOTrainer with a reward model or a direct WER / WER+SIM reward
    coh          Chain-of-Hindsight: SFT on ``<good>``-hinted chosen and ``<bad>``-hinted rejected
                 sequences; the policy then generates with the ``<good>`` hint

The round's training stage keeps its name ``dpo`` (state.json, the ``round_k/dpo/`` folder and
``--only-stage dpo`` mean "train", whatever the method), so runs made before methods existed resume.
Every method writes ``round_k/dpo/metrics.json`` with a ``summary`` holding at least ``method``,
``loss``, ``reward_accuracy``, ``reward_margin`` and ``pairs`` (None where a method has no such figure).
"""
from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from models.reward import RewardConfig

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.methods")

GOOD, BAD = "<good>", "<bad>"


@dataclass
class GRPOStageConfig:
    """RL through trl.GRPOTrainer: group-relative advantages over num_generations samples per prompt."""

    reward: str = field(default="reward_model", metadata={
        "help": "reward_model: a reward model trained on the round's pairs (train.reward); wer: -WER of the "
                "rendered completion; wer_sim: -WER + sim_weight x SIM (ASR + speaker encoder per completion: slow)"})
    steps: int = field(default=8, metadata={"help": "optimiser steps"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    num_generations: int = field(default=4, metadata={"help": "completions per prompt (the group)"})
    prompts_per_step: int = field(default=2, metadata={"help": "prompts per optimiser step"})
    beta: float = field(default=0.04, metadata={
        "help": "KL to round k-1's policy; 0 = no reference model (faster, free to drift)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the completions"})
    top_k: int = field(default=50, metadata={"help": "top-k of the completions; 0 = off"})
    max_completion_frames: int = field(default=0, metadata={
        "help": "longest completion in codec frames; 0 = policy.max_seconds x codec frame rate"})
    loss_type: str = field(default="dapo", metadata={"help": "trl.GRPOConfig loss_type: grpo, dr_grpo, dapo, bnpo, ..."})
    sim_weight: float = field(default=1.0, metadata={"help": "wer_sim: weight of SIM against -WER"})

    def __post_init__(self):
        if self.reward not in ("reward_model", "wer", "wer_sim"):
            raise ValueError(f"train.grpo.reward={self.reward!r}: choose reward_model, wer or wer_sim")
        if self.num_generations < 2:
            raise ValueError("train.grpo.num_generations must be >= 2 (advantages are relative within a group)")
        if self.steps < 1 or self.prompts_per_step < 1 or self.learning_rate <= 0 or self.beta < 0:
            raise ValueError("train.grpo.steps, prompts_per_step >= 1, learning_rate > 0 and beta >= 0 are required")


@dataclass
class TrainConfig:
    """Which method trains each round's policy (the round's 'dpo' stage), and the non-DPO methods' settings.

    DPO's own settings stay in the ``dpo:`` section; sft_control and coh reuse its steps, learning_rate
    and batch_size so that every method gets the same budget.
    """

    method: str = field(default="dpo", metadata={
        "help": "dpo | sft_control (continue-SFT on golden tokens) | reward_bon (reward model + Best-of-N) | "
                "grpo (RL via trl.GRPOTrainer) | coh (Chain-of-Hindsight)"})
    best_of_n: int = field(default=4, metadata={"help": "reward_bon: samples drawn per returned sample"})
    best_of_n_length_band: list[float] = field(default_factory=lambda: [0.5, 2.0], metadata={
        "help": "reward_bon: only samples whose length is within [lo, hi] x the text's expected length may win "
                "(the closest when none is); [0, 1e9] turns the guard off"})
    coh_rejected: bool = field(default=True, metadata={
        "help": "coh: also train on <bad>-hinted rejected sequences (false: only <good>-hinted chosen)"})
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"train.method={self.method!r} unknown; choose one of {sorted(METHODS)}")
        if self.best_of_n < 1:
            raise ValueError(f"train.best_of_n={self.best_of_n} must be >= 1")
        band = self.best_of_n_length_band
        if len(band) != 2 or not 0 <= band[0] <= 1 <= band[1]:
            raise ValueError(f"train.best_of_n_length_band={band}: give [lo, hi] with 0 <= lo <= 1 <= hi, "
                             "e.g. [0.5, 2.0]")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _kept_pairs(ctx: "Context", k: int) -> list[dict]:
    from align.run import read_jsonl

    return [p for p in read_jsonl(ctx.run.round_dir(k) / "pairs" / "pairs.jsonl") if p["keep"]]


def _summary(method: str, **kw) -> dict:
    base = {"method": method, "loss": None, "reward_accuracy": None, "reward_margin": None, "pairs": None}
    base.update(kw)
    return base


def _write_metrics(work: Path, stats: dict, history: list[dict]) -> None:
    from align.run import write_json

    write_json(work / "metrics.json", {"summary": stats, "history": history})


def sft_steps(policy, examples: list[tuple[str, str]], *, steps: int, lr: float, batch_size: int, warmup: int,
              seed: int, bcfg, device: str = "cpu", name: str = "sft") -> tuple[float, list[dict]]:
    """Teacher forcing on (prompt string, completion string) examples; loss on the completion only.

    The shared AdamW loop of the base stage (``align.base._fit``); returns (final loss, history).
    """
    from align.base import _fit

    tok = policy.tokenizer
    seqs = [(tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
            for p, c in examples]
    lm = policy.lm.to(device)

    def loss_fn(batch: list[int]) -> torch.Tensor:
        items = [seqs[i] for i in batch]
        L = max(len(p) + len(c) for p, c in items)
        ids = torch.full((len(items), L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), L), -100, dtype=torch.long)
        attn = torch.zeros((len(items), L), dtype=torch.long)
        for i, (p, c) in enumerate(items):  # right padding for training
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
            attn[i, : len(p) + len(c)] = 1
        return lm(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss

    final, history = _fit(name, lm, loss_fn, n_items=len(seqs), batch_size=batch_size, steps=steps, lr=lr,
                          warmup=warmup, betas=(0.9, 0.999), bcfg=bcfg, rng=random.Random(seed))
    policy.lm = lm.cpu().eval()
    return final, history


# ---------------------------------------------------------------------------------------------
# Methods: fn(ctx, k) -> summary; each writes round_k/dpo/metrics.json and round_k/policy/
# ---------------------------------------------------------------------------------------------
def dpo(ctx: "Context", k: int) -> dict:
    """DPO through trl.DPOTrainer (``align.stages.dpo``)."""
    from align import stages

    return stages.dpo(ctx, k)


def sft_control(ctx: "Context", k: int) -> dict:
    """Continue-SFT on the golden tokens of this round's sampled prompts (no preference signal)."""
    from align.run import read_jsonl
    from models.codec_lm import Policy, completion_str

    cfg, dcfg = ctx.cfg, ctx.cfg.dpo
    rows = read_jsonl(ctx.run.round_dir(k) / "samples" / "samples.jsonl")
    by_id = {u.id: u for u in ctx.splits.train}
    n_prompt = max(1, int(round(cfg.policy.prompt_seconds * ctx.codec.frame_rate)))
    policy = Policy.load(ctx.run.policy_dir(k - 1), device="cpu")
    seen, examples = set(), []
    for r in rows:
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        golden = ctx.codes(by_id[r["id"]])[0]
        examples.append((policy.format.prompt_str(ctx.codes(by_id[r["prompt_id"]])[0, :n_prompt], r["text"]),
                         completion_str(golden)))
    loss, history = sft_steps(policy, examples, steps=dcfg.steps, lr=dcfg.learning_rate, batch_size=dcfg.batch_size,
                              warmup=int(dcfg.warmup_ratio * dcfg.steps), seed=cfg.seed + k, bcfg=cfg.base,
                              name=f"round {k} sft_control")
    policy.save(ctx.run.policy_dir(k))
    stats = _summary("sft_control", loss=loss, sft_loss=loss, examples=len(examples), steps=dcfg.steps)
    work = ctx.run.round_dir(k) / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    _write_metrics(work, stats, history)
    log.info("round %d sft_control: loss %.4f on %d golden sequences", k, loss, len(examples))
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
    from models.codec_lm import Policy, with_hint

    cfg, dcfg = ctx.cfg, ctx.cfg.dpo
    pairs = _kept_pairs(ctx, k)
    examples = [(with_hint(p["prompt"], GOOD), p["chosen"]) for p in pairs]
    if cfg.train.coh_rejected:
        examples += [(with_hint(p["prompt"], BAD), p["rejected"]) for p in pairs]
    policy = Policy.load(ctx.run.policy_dir(k - 1), device="cpu")
    add_hint_tokens(policy)
    loss, history = sft_steps(policy, examples, steps=dcfg.steps, lr=dcfg.learning_rate, batch_size=dcfg.batch_size,
                              warmup=int(dcfg.warmup_ratio * dcfg.steps), seed=cfg.seed + k, bcfg=cfg.base,
                              name=f"round {k} coh")
    policy.meta["quality_hint"] = GOOD
    policy.save(ctx.run.policy_dir(k))
    stats = _summary("coh", loss=loss, pairs=len(pairs), examples=len(examples), steps=dcfg.steps)
    work = ctx.run.round_dir(k) / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    _write_metrics(work, stats, history)
    log.info("round %d coh: loss %.4f on %d hinted sequences", k, loss, len(examples))
    return stats


def _train_rm(ctx: "Context", k: int, policy, pairs: list[dict]):
    from models.reward import train_reward_model

    work = ctx.run.round_dir(k) / "dpo"
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
    policy.save(ctx.run.policy_dir(k))
    summary = _summary("reward_bon", loss=stats["rm_loss"], reward_accuracy=stats["rm_accuracy"],
                       reward_margin=stats["rm_margin"], pairs=len(pairs), best_of_n=ctx.cfg.train.best_of_n, **stats)
    _write_metrics(ctx.run.round_dir(k) / "dpo", summary, [])
    return summary


class CodesReward:
    """GRPO reward function over ``completion_ids`` (TRL decodes completions with special tokens skipped,
    which drops ``<eos>`` and cannot be parsed reliably, so the ids are the ground truth).

    score_fn(prompts: list[str], codes: list[list[int]], rows: list[dict]) -> list[float], where rows
    carry the dataset columns (utt_id, prompt_id, text) of each completion.
    """

    def __init__(self, name: str, tokenizer, codebook_size: int, score_fn: Callable):
        self.__name__ = name  # TRL logs rewards under the function's name
        self.offset = tokenizer.convert_tokens_to_ids("<a0>")
        self.eos = tokenizer.eos_token_id
        self.K = codebook_size
        self.score_fn = score_fn

    def codes(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            if t == self.eos:
                break
            if self.offset <= t < self.offset + self.K:
                out.append(t - self.offset)
        return out

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        codes = [self.codes(list(ids)) for ids in completion_ids]
        rows = [{key: kwargs[key][i] for key in ("utt_id", "prompt_id", "text") if key in kwargs}
                for i in range(len(codes))]
        return [float(x) for x in self.score_fn(list(prompts), codes, rows)]


def _direct_reward(ctx: "Context", k: int, policy, with_sim: bool) -> Callable:
    """-WER (+ sim_weight x SIM) of each completion rendered through round k-1's NAR and codec."""
    from align.pairs import SCORERS, SampleBatch

    wer_fn = SCORERS["wer"](ctx)
    sim_fn = SCORERS["sim"](ctx) if with_sim else None
    w = ctx.cfg.train.grpo.sim_weight

    def score(prompts, codes, rows):
        batch = SampleBatch(ctx, k, [{"id": r["utt_id"], "prompt_id": r["prompt_id"], "text": r["text"], "codes": c}
                                     for r, c in zip(rows, codes)])
        batch.__dict__["policy"] = policy  # already loaded: no second copy
        wers = wer_fn(batch)
        sims = sim_fn(batch) if sim_fn else [0.0] * len(wers)
        return [-a + w * b for a, b in zip(wers, sims)]

    return score


def grpo(ctx: "Context", k: int) -> dict:
    """GRPO from round k-1's policy (also the KL reference) on this round's sampled prompts."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from align.run import read_jsonl
    from models.codec_lm import Policy, with_hint

    cfg, gcfg = ctx.cfg, ctx.cfg.train.grpo
    work = ctx.run.round_dir(k) / "dpo"
    work.mkdir(parents=True, exist_ok=True)
    policy = Policy.load(ctx.run.policy_dir(k - 1), device="cpu")
    extra: dict = {}
    if gcfg.reward == "reward_model":
        pairs = _kept_pairs(ctx, k)
        rm, extra = _train_rm(ctx, k, policy, pairs)
        score_fn = lambda prompts, codes, rows: rm.score(prompts, codes).tolist()  # noqa: E731
    else:
        score_fn = _direct_reward(ctx, k, policy, with_sim=gcfg.reward == "wer_sim")
    reward = CodesReward(f"reward_{gcfg.reward}", policy.tokenizer, policy.codec.codebook_size, score_fn)

    rows = read_jsonl(ctx.run.round_dir(k) / "samples" / "samples.jsonl")
    by_id = {u.id: u for u in ctx.splits.train}
    n_prompt = max(1, int(round(cfg.policy.prompt_seconds * ctx.codec.frame_rate)))
    seen, data = set(), []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            p = policy.format.prompt_str(ctx.codes(by_id[r["prompt_id"]])[0, :n_prompt], r["text"])
            data.append({"prompt": with_hint(p, policy.meta.get("quality_hint")), "utt_id": r["id"],
                         "prompt_id": r["prompt_id"], "text": r["text"]})
    tok = policy.tokenizer
    offset, K = policy.code_offset, policy.codec.codebook_size
    allowed = set(range(offset, offset + K)) | {tok.eos_token_id}
    max_frames = gcfg.max_completion_frames or int(cfg.policy.max_seconds * ctx.codec.frame_rate)
    args = GRPOConfig(
        output_dir=str(work / "trainer"), learning_rate=gcfg.learning_rate, max_steps=gcfg.steps,
        per_device_train_batch_size=gcfg.num_generations * gcfg.prompts_per_step,
        num_generations=gcfg.num_generations, max_completion_length=max_frames + 1, temperature=gcfg.temperature,
        top_k=gcfg.top_k, beta=gcfg.beta, loss_type=gcfg.loss_type,
        # only codec tokens and <eos> may be sampled, as in Policy.generate
        generation_kwargs={"suppress_tokens": [i for i in range(len(tok)) if i not in allowed]},
        logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed + k, data_seed=cfg.seed + k,
        use_cpu=ctx.device == "cpu", dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
        log_completions=False)
    trainer = GRPOTrainer(model=policy.lm, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(data),
                          processing_class=tok)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    policy.lm = trainer.model.cpu().eval()
    policy.save(ctx.run.policy_dir(k))
    shutil.rmtree(work / "trainer", ignore_errors=True)
    tail = history[-max(1, len(history) // 5):]

    def mean(key):
        vals = [h[key] for h in tail if h.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    summary = _summary("grpo", loss=mean("loss"), pairs=extra.get("rm_pairs"), grpo_reward=mean("reward"),
                       grpo_reward_std=mean("reward_std"), prompts=len(data), steps=gcfg.steps, **extra)
    _write_metrics(work, summary, history)
    log.info("round %d grpo: loss %s reward %s", k, summary["loss"], summary["grpo_reward"])
    return summary


# name -> fn(ctx, k) -> summary. The round's training stage dispatches here on train.method.
METHODS: dict[str, Callable] = {"dpo": dpo, "sft_control": sft_control, "reward_bon": reward_bon, "grpo": grpo,
                                "coh": coh}


def train(ctx: "Context", k: int) -> dict:
    """The round's training stage (stage name ``dpo``): run ``train.method``."""
    return METHODS[ctx.cfg.train.method](ctx, k)
