"""Pair strategies: how a round's samples become (chosen, rejected) preference pairs.

    golden_vs_synthetic  golden RVQ-1 tokens chosen, every synthetic sample rejected (SpeechAlign)
    ranked_samples       N samples per prompt scored by WER / SIM / (DNSMOS); best vs worst of each
                         prompt by a weighted score or by Pareto rank on (WER, SIM) (CosyVoice, Koel-TTS)
    mixed                both sets together

A strategy is ``fn(ctx, k, rows) -> list[pair dict]``; every pair carries ``scores`` and ``keep``
(dropped pairs stay on disk with their ``drop`` reason). Scoring is pluggable: ``SCORERS`` maps a
name to a factory ``(ctx) -> scorer | None``; a scorer maps a ``SampleBatch`` to one float per
sample, and a factory that returns None (its backend is not installed) is skipped with a warning.
Tests inject stub scorers there, which never render audio because ``SampleBatch.wavs`` is lazy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.pairs")


@dataclass
class PairConfig:
    """How samples become preference pairs, and how rounds use them."""

    strategy: str = field(default="golden_vs_synthetic", metadata={
        "help": "golden_vs_synthetic: golden tokens chosen, each synthetic sample rejected; ranked_samples: best vs "
                "worst of each prompt's sample.n samples by score (needs sample.n >= 2); mixed: both"})
    min_distance: float = field(default=0.05, metadata={
        "help": "drop pairs whose two code sequences are this close (normalised edit distance): "
                "a near-copy carries no preference signal"})
    max_pairs: int = field(default=0, metadata={"help": "cap on this round's new pairs; 0 = no cap"})
    scorers: list[str] = field(default_factory=lambda: ["wer", "sim", "dnsmos"], metadata={
        "help": "ranked_samples: scores computed per sample (rendered audio); unavailable ones are skipped"})
    rank_by: str = field(default="weighted", metadata={
        "help": "ranked_samples: 'weighted' (sum of weights x scores) or 'pareto' (non-dominated fronts on "
                "(WER, SIM), weighted score breaks ties within a front)"})
    weights: dict[str, float] = field(default_factory=lambda: {"wer": -1.0, "sim": 1.0, "dnsmos": 0.25}, metadata={
        "help": "ranked_samples: weight of each score in the weighted score (negative = lower is better)"})
    min_gap: float = field(default=0.05, metadata={
        "help": "ranked_samples: drop a prompt whose best and worst weighted scores differ by less; exact ties "
                "are always dropped"})
    max_chosen_wer: float = field(default=0.5, metadata={
        "help": "ranked_samples: drop a prompt whose best sample's WER is above this: a bad 'chosen' teaches "
                "nothing good"})
    data: str = field(default="fresh", metadata={
        "help": "fresh: train on this round's pairs only; accumulate: also on the kept pairs of earlier rounds"})
    accumulate_rounds: int = field(default=0, metadata={
        "help": "data=accumulate: how many earlier rounds to add; 0 = all"})

    def __post_init__(self):
        if self.strategy not in PAIR_STRATEGIES:
            raise ValueError(f"pair.strategy={self.strategy!r} unknown; choose one of {sorted(PAIR_STRATEGIES)}")
        if not 0 <= self.min_distance < 1:
            raise ValueError(f"pair.min_distance={self.min_distance} must be in [0, 1)")
        if self.rank_by not in ("weighted", "pareto"):
            raise ValueError(f"pair.rank_by={self.rank_by!r}: choose 'weighted' or 'pareto'")
        unknown = [s for s in self.scorers if s not in SCORERS]
        if unknown:
            raise ValueError(f"pair.scorers {unknown} unknown; registered scorers: {sorted(SCORERS)}")
        if self.min_gap < 0 or self.max_chosen_wer < 0:
            raise ValueError("pair.min_gap and pair.max_chosen_wer must be >= 0")
        if self.data not in ("fresh", "accumulate"):
            raise ValueError(f"pair.data={self.data!r}: choose 'fresh' or 'accumulate'")
        if self.accumulate_rounds < 0:
            raise ValueError(f"pair.accumulate_rounds={self.accumulate_rounds} must be >= 0")


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


def token_distance(a: list[int], b: list[int]) -> float:
    """Edit distance normalised by the longer sequence: 0 = identical, 1 = nothing shared."""
    return edit_distance(a, b) / max(len(a), len(b), 1)


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------
class SampleBatch:
    """A round's samples as scorers see them: the rows, and their audio rendered on first use.

    rows: sample rows (id, prompt_id, text, speaker, sample, codes). ``wavs``: float32 [n] each at
    ``sample_rate``, rendered by round k-1's policy (NAR + codec) only if a scorer asks for audio.
    """

    def __init__(self, ctx: "Context", k: int, rows: list[dict]):
        self.ctx, self.k, self.rows = ctx, k, rows

    @cached_property
    def policy(self):
        from models.codec_lm import Policy

        return Policy.load(self.ctx.run.policy_dir(self.k - 1), device=self.ctx.device)

    @property
    def sample_rate(self) -> int:
        return self.policy.codec.sample_rate

    @cached_property
    def wavs(self) -> list[np.ndarray]:
        import torch
        from tqdm import tqdm

        by_id = {u.id: u for u in self.ctx.splits.train}
        return [self.policy.render(torch.tensor(r["codes"], dtype=torch.long), self.ctx.codes(by_id[r["prompt_id"]]))
                for r in tqdm(self.rows, desc="rendering samples", leave=False)]

    def reference_audio(self) -> list[str]:
        """Each sample's real recording (the SIM reference, as in evaluation)."""
        by_id = {u.id: u for u in self.ctx.splits.train}
        return [by_id[r["id"]].audio for r in self.rows]


def _wer_scorer(ctx: "Context"):
    from align.audio import resample
    from eval.asr import build_asr, utterance_wer

    asr = build_asr(ctx.cfg.eval.asr)

    def score(batch: SampleBatch) -> list[float]:
        wavs = [resample(w, batch.sample_rate, asr.sample_rate) if len(w) else w for w in batch.wavs]
        hyps = asr.transcribe(wavs)
        return [utterance_wer(r["text"], h) for r, h in zip(batch.rows, hyps)]

    return score


def _sim_scorer(ctx: "Context"):
    from align.audio import load_audio, resample
    from eval.speaker import build_speaker_encoder

    enc = build_speaker_encoder(ctx.cfg.eval.speaker)

    def score(batch: SampleBatch) -> list[float]:
        refs = [load_audio(a, enc.sample_rate, ctx.cfg.data.max_seconds) for a in batch.reference_audio()]
        wavs = [resample(w, batch.sample_rate, enc.sample_rate) if len(w) else w for w in batch.wavs]
        return [float(s) for s in enc.similarity(wavs, refs)]

    return score


def _dnsmos_scorer(ctx: "Context"):
    """DNSMOS P.808 MOS of each sample (``eval.quality``; higher is better; NaN for silence)."""
    from align.audio import resample
    from eval.quality import build_quality

    scorer = build_quality("dnsmos")

    def score(batch: SampleBatch) -> list[float]:
        wavs = [resample(w, batch.sample_rate, scorer.sample_rate) for w in batch.wavs]
        return [float(s["dnsmos"]) for s in scorer.score(wavs)]

    return score


SCORERS: dict[str, Callable] = {"wer": _wer_scorer, "sim": _sim_scorer, "dnsmos": _dnsmos_scorer}


def score_samples(ctx: "Context", k: int, rows: list[dict]) -> list[dict[str, float]]:
    """Every configured scorer over every sample -> one ``{scorer: value}`` dict per row."""
    batch = SampleBatch(ctx, k, rows)
    out: list[dict[str, float]] = [{} for _ in rows]
    for name in ctx.cfg.pair.scorers:
        scorer = SCORERS[name](ctx)
        if scorer is None:
            log.warning("round %d pair: scorer %r is not available here; ranking without it", k, name)
            continue
        values = scorer(batch)
        if len(values) != len(rows):
            raise ValueError(f"scorer {name!r} returned {len(values)} scores for {len(rows)} samples")
        for d, v in zip(out, values):
            d[name] = float(v)
    if not any(out):
        raise ValueError(f"no scorer of pair.scorers={ctx.cfg.pair.scorers} is available; add 'wer' or 'sim'")
    return out


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------
def weighted_score(scores: dict[str, float], weights: dict[str, float]) -> float:
    """Sum of weight x score over the scores present (a missing scorer simply contributes nothing)."""
    return float(sum(weights.get(name, 0.0) * v for name, v in scores.items()))


def pareto_fronts(points: list[tuple[float, float]]) -> list[int]:
    """Non-dominated sorting of (WER, SIM) points: front index per point, 0 = best.

    a dominates b when a's WER <= b's and a's SIM >= b's, strictly better in one (lower WER, higher SIM).
    """
    n = len(points)
    front = [-1] * n
    remaining = set(range(n))
    level = 0
    while remaining:
        current = [i for i in remaining if not any(
            points[j][0] <= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i]
            for j in remaining if j != i)]
        for i in current:
            front[i] = level
            remaining.discard(i)
        level += 1
    return front


def rank_group(scores: list[dict[str, float]], pcfg: PairConfig) -> tuple[int, int, str | None]:
    """Pick (best, worst) of one prompt's samples; returns (best, worst, drop reason or None).

    weighted: best/worst by weighted score. pareto: best from the first (WER, SIM) front, worst from the
    last, weighted score breaking ties within a front. Dropped: exact ties, a gap below ``min_gap``,
    a best sample above the WER ceiling.
    """
    w = [weighted_score(s, pcfg.weights) for s in scores]
    if pcfg.rank_by == "pareto":
        if not all("wer" in s and "sim" in s for s in scores):
            raise ValueError("pair.rank_by=pareto needs both 'wer' and 'sim' in pair.scorers")
        fronts = pareto_fronts([(s["wer"], s["sim"]) for s in scores])
        order = sorted(range(len(scores)), key=lambda i: (fronts[i], -w[i], i))
        best, worst = order[0], order[-1]
        if fronts[best] == fronts[worst] and w[best] == w[worst]:
            return best, worst, "tie"
    else:
        order = sorted(range(len(scores)), key=lambda i: (-w[i], i))
        best, worst = order[0], order[-1]
        if w[best] == w[worst]:
            return best, worst, "tie"
    if w[best] - w[worst] < pcfg.min_gap:
        return best, worst, "gap"
    if "wer" in scores[best] and scores[best]["wer"] > pcfg.max_chosen_wer:
        return best, worst, "wer_ceiling"
    return best, worst, None


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------
def golden_vs_synthetic(ctx: "Context", k: int, rows: list[dict]) -> list[dict]:
    """Golden RVQ-1 = chosen, each synthetic sample = rejected; scored by token distance and length."""
    pcfg = ctx.cfg.pair
    by_id = {u.id: u for u in ctx.splits.train}
    pairs = []
    for r in rows:
        golden = ctx.codes(by_id[r["id"]])[0].tolist()
        synth = r["codes"]
        dist = token_distance(golden, synth)
        keep = dist >= pcfg.min_distance
        pairs.append({"id": r["id"], "prompt_id": r["prompt_id"], "text": r["text"], "sample": r["sample"],
                      "source": "golden_vs_synthetic", "chosen_codes": golden, "rejected_codes": synth,
                      "scores": {"token_distance": dist, "length_ratio": len(synth) / max(1, len(golden)),
                                 "rejected_len": len(synth), "chosen_len": len(golden)},
                      "keep": keep, **({} if keep else {"drop": "too_close"})})
    return pairs


def ranked_samples(ctx: "Context", k: int, rows: list[dict]) -> list[dict]:
    """Best vs worst of each prompt's samples by score; one pair per prompt (or a recorded drop)."""
    pcfg = ctx.cfg.pair
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["id"], []).append(i)
    if max(len(g) for g in groups.values()) < 2:
        raise ValueError("pair.strategy=ranked_samples needs several samples per prompt: set sample.n >= 2")
    scores = score_samples(ctx, k, rows)
    pairs = []
    for uid, idx in groups.items():
        if len(idx) < 2:
            continue
        group_scores = [scores[i] for i in idx]
        b, w, drop = rank_group(group_scores, pcfg)
        best, worst = rows[idx[b]], rows[idx[w]]
        dist = token_distance(best["codes"], worst["codes"])
        if drop is None and dist < pcfg.min_distance:
            drop = "too_close"
        wsum = [weighted_score(s, pcfg.weights) for s in group_scores]
        pairs.append({"id": uid, "prompt_id": best["prompt_id"], "text": best["text"],
                      "sample": [best["sample"], worst["sample"]], "source": "ranked_samples",
                      "chosen_codes": best["codes"], "rejected_codes": worst["codes"],
                      "scores": {"token_distance": dist, "length_ratio": len(worst["codes"]) / max(1, len(best["codes"])),
                                 "chosen": group_scores[b], "rejected": group_scores[w],
                                 "gap": wsum[b] - wsum[w], "all": group_scores},
                      "keep": drop is None, **({"drop": drop} if drop else {})})
    return pairs


def mixed(ctx: "Context", k: int, rows: list[dict]) -> list[dict]:
    """golden_vs_synthetic pairs (every sample) plus ranked_samples pairs (one per prompt)."""
    return golden_vs_synthetic(ctx, k, rows) + ranked_samples(ctx, k, rows)


PAIR_STRATEGIES: dict[str, Callable] = {"golden_vs_synthetic": golden_vs_synthetic,
                                        "ranked_samples": ranked_samples, "mixed": mixed}
