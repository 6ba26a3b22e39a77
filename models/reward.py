"""The reward model: a scalar head over the codec LM, trained on preference pairs (Bradley-Terry).

``LlamaForSequenceClassification`` (num_labels=1) whose body starts as a copy of the policy's, so it
reads the same ``<bos> <prompt> ... <speech> <a..> ... <eos>`` sequences; the reward is the head's
output at the last non-pad token. Trained with ``trl.RewardTrainer`` on pre-tokenized
``chosen_ids``/``rejected_ids`` (prompt + completion). Used for Best-of-N reranking at sampling time
(``BestOfN``, attached to a policy) and as a GRPO reward.

A reward model directory::

    reward_model/config.json model.safetensors tokenizer.json ...   # transformers: from_pretrained loads it
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.optim import tail_mean

log = logging.getLogger("speechalign.reward")


@dataclass
class RewardConfig:
    """Training budget of the reward model (TRL's RewardTrainer on the round's pairs)."""

    steps: int = field(default=60, metadata={"help": "optimiser steps"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step"})
    center_rewards: float | None = field(default=0.01, metadata={
        "help": "weight of a penalty on mean reward^2 (keeps rewards near 0, so GRPO/BoN see a stable scale); "
                "null = off"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps for linear warm-up"})

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("reward.steps >= 1, reward.batch_size >= 1 and reward.learning_rate > 0 are required")


def reward_model_from_lm(lm) -> "torch.nn.Module":
    """A ``LlamaForSequenceClassification`` (num_labels=1) with ``lm``'s body weights and a fresh head."""
    from transformers import LlamaForSequenceClassification

    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = 1
    rm = LlamaForSequenceClassification(config)
    missing, unexpected = rm.model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"policy body does not fit the reward model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    torch.nn.init.zeros_(rm.score.weight)  # every sequence starts at reward 0; the pairs move it
    return rm


class RewardModel:
    """A trained reward model and its tokenizer; ``score`` maps sequences to one float each."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    def save(self, path: str | Path) -> None:
        from models.io import atomic_dir

        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "RewardModel":
        from transformers import AutoTokenizer, LlamaForSequenceClassification

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a reward model directory (config.json missing); train one with "
                             "train.method=reward_bon or grpo")
        model = LlamaForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device)
        return cls(model, AutoTokenizer.from_pretrained(path))

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """Token id sequences (prompt + completion) -> rewards FloatTensor [B] (right-padded batches)."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = [list(s) or [pad] for s in seqs[start: start + batch_size]]
            L = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), L), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                attn[i, : len(s)] = 1
            out.append(self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: list[str], codes: list) -> torch.Tensor:
        """prompts: B prompt strings (ending ``<speech>``); codes: B speech streams [T_i] (RVQ-1 codes, with unit
        markers in the interleaved layout) -> FloatTensor [B]."""
        from models.layout import interleaved_completion_str  # writes plain code streams as completion_str does

        tok = self.tokenizer
        seqs = [tok(p + interleaved_completion_str(c), add_special_tokens=False)["input_ids"]
                for p, c in zip(prompts, codes)]
        return self.score_ids(seqs)


def train_reward_model(policy, pairs: list[dict], rcfg: RewardConfig, work_dir: Path, *, seed: int,
                       use_cpu: bool = True) -> tuple[RewardModel, dict]:
    """Bradley-Terry training of a reward model on pairs (``prompt``/``chosen``/``rejected`` strings).

    Returns the model and stats: final-20% loss, pair accuracy and margin as the trainer logged them.
    """
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    tok = policy.tokenizer

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    dataset = Dataset.from_list([{"chosen_ids": ids(p["prompt"] + p["chosen"]),
                                  "rejected_ids": ids(p["prompt"] + p["rejected"])} for p in pairs])
    torch.manual_seed(seed)
    model = reward_model_from_lm(policy.lm)
    args = TRLRewardConfig(
        output_dir=str(work_dir / "trainer"), learning_rate=rcfg.learning_rate, max_steps=rcfg.steps,
        per_device_train_batch_size=rcfg.batch_size, warmup_steps=int(rcfg.warmup_ratio * rcfg.steps),
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, use_cpu=use_cpu, dataloader_num_workers=0, bf16=False, fp16=False, max_length=None,
        center_rewards_coefficient=rcfg.center_rewards, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    stats = {"rm_steps": rcfg.steps, "rm_loss": tail_mean(history, "loss"), "rm_accuracy": tail_mean(history, "accuracy"),
             "rm_margin": tail_mean(history, "margin"), "rm_pairs": len(pairs)}
    log.info("reward model: loss %.4f accuracy %.3f", stats["rm_loss"] or float("nan"),
             stats["rm_accuracy"] or float("nan"))
    return RewardModel(trainer.model.cpu(), tok), stats


@dataclass
class BestOfN:
    """Best-of-N reranking: draw ``n`` samples per request, keep the one the reward model scores highest.

    Attached to a ``Policy`` as ``policy.reranker`` (saved in ``policy/reward_model/``), it makes every
    ``generate`` call, evaluation and next round's sampling included, return reranked samples.

    Only candidates whose length is within ``length_band`` x the text's expected length may win
    (the closest one to it when none is): a reward model trained on golden-vs-babble pairs learns
    that short is safe, and unguarded Best-of-N then returns near-empty speech (measured in
    benchmarks/results/ablations.md: round 2 outputs of 0.25 s for 2.5 s sentences).
    """

    reward_model: RewardModel
    n: int = 4
    length_band: tuple[float, float] = (0.5, 2.0)

    def save(self, path: Path) -> None:
        import json

        self.reward_model.save(path)
        (Path(path) / "best_of_n.json").write_text(json.dumps({"n": self.n, "length_band": list(self.length_band)}))

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> "BestOfN":
        import json

        meta = json.loads((Path(path) / "best_of_n.json").read_text())
        # a reranker saved before the band existed ranked unguarded: keep its behaviour
        band = tuple(meta.get("length_band", (0.0, float("inf"))))
        return cls(RewardModel.load(path, device), meta["n"], band)

    def pick(self, prompts: list[str], candidates: list[list[torch.Tensor]], keep: int,
             expected_frames: list[float] | None = None) -> list[list[torch.Tensor]]:
        """candidates: B lists of n*keep code tensors [T] -> B lists of ``keep`` best (disjoint groups of n).

        expected_frames: B expected lengths (frames) for the length band; None = no band.
        """
        flat_p = [p for p, c in zip(prompts, candidates) for _ in c]
        flat_c = [x for c in candidates for x in c]
        rewards = self.reward_model.score(flat_p, [x.tolist() for x in flat_c])
        lo, hi = self.length_band
        out, i = [], 0
        for b, c in enumerate(candidates):
            r = rewards[i: i + len(c)]
            i += len(c)
            picked = []
            for g in range(keep):
                group = list(range(g * self.n, (g + 1) * self.n))
                if expected_frames is not None:
                    e = expected_frames[b]
                    group = ([j for j in group if lo * e <= c[j].numel() <= hi * e] or
                             [min(group, key=lambda j: abs(c[j].numel() - e))])
                picked.append(c[max(group, key=lambda j: float(r[j]))])
            out.append(picked)
        return out
