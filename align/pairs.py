"""Pair strategies: how a round's samples become (chosen, rejected) preference pairs.

    golden_vs_synthetic  golden RVQ-1 tokens chosen, every synthetic sample rejected (SpeechAlign)
    ranked_samples       N samples per prompt scored by WER / SIM / (DNSMOS); best vs worst of each
                         prompt by a weighted score or by Pareto rank on (WER, SIM) (CosyVoice, Koel-TTS)
    human                what raters preferred in ``speechalign listen`` (eval/listen.py): the judged
                         clips' RVQ-1 tokens, winner chosen (majority per item; "same" and rater ties skipped)
    mixed                the pairs of every strategy in ``pair.mixed`` pooled

A strategy is ``fn(ctx, k, rows) -> list[pair dict]``; every pair carries ``scores`` and ``keep``
(dropped pairs stay on disk with their ``drop`` reason). Scoring is pluggable: ``SCORERS`` maps a
name to a factory ``(ctx) -> scorer | None``; a scorer maps a ``SampleBatch`` to one float per
sample, and a factory that returns None (its backend is not installed) is skipped with a warning.
The factories score with the run's judges (``ctx.scorers``: ``eval.scorers.build_scorers`` of the
``eval:`` section), the same models evaluation uses. Tests inject stub scorers here, which never
render audio because ``SampleBatch.wavs`` is lazy. A score that is not finite (DNSMOS of silence)
ranks worst.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from models.layout import token_distance

if TYPE_CHECKING:
    from align.config import PairConfig
    from align.run import Context

log = logging.getLogger("speechalign.pairs")


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------
class SampleBatch:
    """A round's samples as scorers see them: the rows, and their audio rendered on first use.

    rows: sample rows (id, prompt_id, text, speaker, sample, codes). ``wavs``: float32 [n] each at
    ``sample_rate``, rendered by round k-1's policy (NAR + codec) only if a scorer asks for audio.
    """

    def __init__(self, ctx: "Context", k: int, rows: list[dict], policy=None):
        self.ctx, self.k, self.rows = ctx, k, rows
        if policy is not None:  # already loaded (a judge scoring many batches loads it once)
            self.__dict__["policy"] = policy

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

    @cached_property
    def logmels(self) -> list:
        """Each sample's log-mel as the policy renders it (``Policy.render_logmel``: before the vocoder, where the
        phone renderer gives one), for judges of the spectrogram (the pause detector)."""
        import torch
        from tqdm import tqdm

        if not getattr(self.policy, "renders_logmel", False):  # no mel renderer: judges read the audio
            return None
        by_id = {u.id: u for u in self.ctx.splits.train}
        return [self.policy.render_logmel(torch.tensor(r["codes"], dtype=torch.long),
                                          self.ctx.codes(by_id[r["prompt_id"]]))
                for r in tqdm(self.rows, desc="rendering log-mels", leave=False)]

    def reference_audio(self) -> list[str]:
        """Each sample's real recording (the SIM reference, as in evaluation)."""
        by_id = {u.id: u for u in self.ctx.splits.train}
        return [by_id[r["id"]].audio for r in self.rows]


def _wer_scorer(ctx: "Context"):
    """Per-sample WER by the run's ASR (``eval.asr`` / ``eval.asr_model``)."""

    def score(batch: SampleBatch) -> list[float]:
        return ctx.scorers.wer(batch.wavs, batch.sample_rate, [r["text"] for r in batch.rows])[0]

    return score


def _sim_scorer(ctx: "Context"):
    """Per-sample speaker similarity to the real recording, by the run's speaker encoder."""
    from models.audio import load_audio

    def score(batch: SampleBatch) -> list[float]:
        sr = ctx.scorers.speaker.sample_rate
        refs = [load_audio(a, sr, ctx.cfg.data.max_seconds) for a in batch.reference_audio()]
        return [float(s) for s in ctx.scorers.sim(batch.wavs, batch.sample_rate, refs)]

    return score


def _dnsmos_scorer(ctx: "Context"):
    """DNSMOS P.808 MOS of each sample (``eval.quality``'s model when it is DNSMOS; NaN for silence)."""

    def score(batch: SampleBatch) -> list[float]:
        out = ctx.scorers.quality_scores(batch.wavs, batch.sample_rate, model=ctx.scorers.dnsmos)
        return [float(s["dnsmos"]) for s in out]

    return score


def _pause_scorer(ctx: "Context"):
    """1.0 for a sample with the pause defect (a long silence between its words, eval/defects.py), else 0.0: an
    exact judge with no ASR. Weight it negatively (``pair.weights: {pause: -1}``)."""
    from eval.defects import has_pause, pause_of_logmel, pause_of_wav

    dcfg = ctx.cfg.eval.defect

    def score(batch: SampleBatch) -> list[float]:
        mels = batch.logmels
        if mels is not None:
            rate = batch.policy.codec.frame_rate
            pauses = [pause_of_logmel(m, rate, dcfg) for m in mels]
        else:
            pauses = [pause_of_wav(w, batch.sample_rate, dcfg) for w in batch.wavs]
        return [float(has_pause(p, dcfg)) for p in pauses]

    return score


def _ear_scorer(key: str):
    """The second ear (``eval.ear``, eval/ear.py) as a judge: ``per`` (phone error rate) or ``ear_nll`` (CTC NLL of
    the text's phones per phone) of each sample, lower is better (weight it negatively). It reads the renderer's
    log-mel where the policy gives one (no Griffin-Lim: the judge's cost is the renderer), else the audio."""

    def factory(ctx: "Context"):
        if not ctx.cfg.eval.ear:
            raise ValueError(f"pair scorer {key!r} needs a second ear: set eval.ear to a saved ear "
                             "(scripts/train_ear.py)")

        def score(batch: SampleBatch) -> list[float]:
            from eval.ear import score_logmel

            ear = ctx.scorers.ear
            mels = batch.logmels
            texts = [r["text"] for r in batch.rows]
            if mels is None or any(m.shape[-1] != ear.cfg.n_mels for m in mels):
                return [v[key] for v in ctx.scorers.phones(batch.wavs, batch.sample_rate, texts)]
            return [getattr(sc, "nll" if key == "ear_nll" else "per") for sc in score_logmel(ear, mels, texts)]

        return score

    return factory


SCORERS: dict[str, Callable] = {"wer": _wer_scorer, "sim": _sim_scorer, "dnsmos": _dnsmos_scorer,
                                "pause": _pause_scorer, "per": _ear_scorer("per"), "ear_nll": _ear_scorer("ear_nll")}


JUDGE_BATCH = 64  # samples rendered and scored together: the unit of sharing across ranks and of resuming


def score_samples(ctx: "Context", k: int, rows: list[dict]) -> list[dict[str, float]]:
    """Every configured scorer over every sample -> one ``{scorer: value}`` dict per row.

    The rows are cut into batches of ``JUDGE_BATCH`` dealt to the processes (as ``sample`` and ``evaluate``
    deal theirs) and gathered; each finished batch is kept (``Context.store``), so a crash loses at most one
    batch of judging."""
    from tqdm import tqdm

    from align.config import config_to_dict
    from models.digest import file_key

    by_id = {u.id: u for u in ctx.splits.train}
    # the run's judges and what they judge name the folder: the same samples judged again (a study's variants
    # share round 1's) are read
    store = ctx.store("judge", ctx.run.policy_dir(k - 1), {
        "eval": config_to_dict(ctx.cfg)["eval"], "scorers": list(ctx.cfg.pair.scorers),
        "max_seconds": ctx.cfg.data.max_seconds,
        "rows": [(r["id"], r["prompt_id"], r["text"], list(r["codes"])) for r in rows],
        # the prompts' codes and the references' bytes (the renderer hears the prompt, SIM scores the reference)
        "prompt_codes": ctx.prompt_digest([by_id[r["prompt_id"]] for r in rows]),
        "references": [file_key(by_id[r["id"]].audio) for r in rows]})
    factories = [(name, SCORERS[name](ctx)) for name in ctx.cfg.pair.scorers]
    for name, scorer in factories:
        if scorer is None:
            log.warning("round %d pair: scorer %r is not available here; ranking without it", k, name)
    factories = [(n, f) for n, f in factories if f is not None]
    policy = None
    mine = []
    t0, judged = time.time(), 0
    for start, stop in tqdm(ctx.ranks.batches(len(rows), JUDGE_BATCH), desc="judging", leave=False):
        done = store.get(f"{start}-{stop}")
        if done is None:
            judged += stop - start
            if policy is None:
                policy = SampleBatch(ctx, k, []).policy
            batch = SampleBatch(ctx, k, rows[start:stop], policy=policy)
            done = [{} for _ in range(start, stop)]
            for name, scorer in factories:
                values = scorer(batch)
                if len(values) != stop - start:
                    raise ValueError(f"scorer {name!r} returned {len(values)} scores for {stop - start} samples")
                for d, v in zip(done, values):
                    d[name] = float(v)
            store.put(f"{start}-{stop}", done)
        mine.append((start, done))
    seconds = time.time() - t0
    out: list[dict[str, float]] = [{} for _ in rows]
    for start, done in ctx.ranks.gather(mine):
        out[start:start + len(done)] = done
    if not any(out):
        raise ValueError(f"no scorer of pair.scorers={ctx.cfg.pair.scorers} is available; add 'wer' or 'sim'")
    log.info("round %d pair: %d samples judged on this process in %.0f s (%.2f samples/s), %d read from the cache",
             k, judged, seconds, judged / max(seconds, 1e-9), sum(len(d) for _, d in mine) - judged)
    return out


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------
def weighted_score(scores: dict[str, float], weights: dict[str, float]) -> float:
    """Sum of weight x score over the scores present (a missing scorer simply contributes nothing).

    -inf when a weighted score is not finite: a sample a scorer could not judge (NaN DNSMOS of
    silence) ranks below every judged one instead of poisoning the comparison (NaN compares false).
    """
    total = float(sum(weights.get(name, 0.0) * v for name, v in scores.items() if weights.get(name, 0.0) != 0))
    return total if math.isfinite(total) else -math.inf


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
        # an unjudged (non-finite) WER or SIM puts the sample behind every judged front
        finite = [math.isfinite(s["wer"]) and math.isfinite(s["sim"]) for s in scores]
        judged = pareto_fronts([(s["wer"], s["sim"]) for s, ok in zip(scores, finite) if ok])
        it = iter(judged)
        fronts = [next(it) if ok else len(scores) for ok in finite]
        order = sorted(range(len(scores)), key=lambda i: (fronts[i], -w[i], i))
        best, worst = order[0], order[-1]
        if fronts[best] == fronts[worst] and w[best] == w[worst]:
            return best, worst, "tie"
    else:
        order = sorted(range(len(scores)), key=lambda i: (-w[i], i))
        best, worst = order[0], order[-1]
        if w[best] == w[worst]:
            return best, worst, "tie"
    if not math.isfinite(w[best]):
        return best, worst, "unscored"  # no sample of the prompt could be judged
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
    from models.layout import format_of

    pcfg = ctx.cfg.pair
    fmt = format_of(ctx.run.policy_dir(k - 1))  # golden speech in the layout of the policy being aligned
    by_id = {u.id: u for u in ctx.splits.train}
    pairs = []
    for r in rows:
        golden = ctx.golden_stream(by_id[r["id"]], fmt).tolist()
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
    """Best vs worst of each prompt's samples as the run's judges score them on the rendered audio; one pair per
    prompt, or a recorded drop (tie, gap under ``pair.min_gap``, best above ``pair.max_chosen_wer``, best outside
    ``pair.length_band`` x the golden length, the two too close). With ``pair.golden_candidate`` the golden tokens
    are judged as one more candidate (``sample`` "golden")."""
    from models.layout import format_of

    pcfg = ctx.cfg.pair
    by_id = {u.id: u for u in ctx.splits.train}
    fmt = format_of(ctx.run.policy_dir(k - 1))
    if pcfg.golden_candidate:
        firsts = {}
        for r in rows:
            firsts.setdefault(r["id"], r)
        rows = rows + [dict(r, sample="golden", codes=ctx.golden_stream(by_id[i], fmt).tolist())
                       for i, r in firsts.items()]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["id"], []).append(i)
    if max(len(g) for g in groups.values()) < 2:
        raise ValueError("pair.strategy=ranked_samples needs several samples per prompt: set sample.n >= 2")
    scores = score_samples(ctx, k, rows)
    lo, hi = pcfg.length_band
    pairs = []
    for uid, idx in groups.items():
        if len(idx) < 2:
            continue
        group_scores = [scores[i] for i in idx]
        b, w, drop = rank_group(group_scores, pcfg)
        best, worst = rows[idx[b]], rows[idx[w]]
        golden_frames = int(ctx.codes(by_id[uid]).shape[1]) if uid in by_id else None
        best_frames = len(fmt.frames(torch.tensor(best["codes"], dtype=torch.long)))
        if drop is None and golden_frames and not lo * golden_frames <= best_frames <= hi * golden_frames:
            drop = "length"
        dist = token_distance(best["codes"], worst["codes"])
        if drop is None and dist < pcfg.min_distance:
            drop = "too_close"
        wsum = [weighted_score(s, pcfg.weights) for s in group_scores]
        pairs.append({"id": uid, "prompt_id": best["prompt_id"], "text": best["text"],
                      "sample": [best["sample"], worst["sample"]], "source": "ranked_samples",
                      "chosen_codes": best["codes"], "rejected_codes": worst["codes"],
                      "scores": {"token_distance": dist, "length_ratio": len(worst["codes"]) / max(1, len(best["codes"])),
                                 "chosen": group_scores[b], "rejected": group_scores[w],
                                 "chosen_frames_vs_golden": best_frames / golden_frames if golden_frames else None,
                                 "gap": wsum[b] - wsum[w], "all": group_scores},
                      "keep": drop is None, **({"drop": drop} if drop else {})})
    return pairs


def human(ctx: "Context", k: int, rows: list[dict]) -> list[dict]:
    """Raters' judgments (``pair.human_db``) as pairs; the round's own samples are not used."""
    from eval.listen import default_db_path, human_pairs

    db = ctx.cfg.pair.human_db or default_db_path(ctx.run.root)
    if not Path(db).is_file():
        raise ValueError(f"pair.strategy=human: no judgments database at {db}; collect judgments with "
                         f"`speechalign listen {ctx.run.root}` first, or set pair.human_db")
    pairs = human_pairs(db)  # rows from the judged runs as the database names them (this run, or another)
    _check_judged_codecs(ctx, pairs)
    test_ids = {u.id for u in ctx.splits.test}
    held_out = sum(p["id"] in test_ids for p in pairs)
    if held_out:
        log.warning("round %d pair: %d human pairs are of test utterances; from this round on, evaluation is not "
                    "held out on them", k, held_out)
    for p in pairs:
        p["sample"] = None
        p["scores"]["test_split"] = p["id"] in test_ids
    return pairs


def _check_judged_codecs(ctx: "Context", pairs: list[dict]) -> None:
    """Refuse judged clips spoken with another codec than this run's: their RVQ-1 tokens index another codebook."""
    from models.rundir import RunLayout

    seen = set()
    for p in pairs:
        judged = p.get("judged") or {}
        for run, k in zip(judged.get("runs", []), judged.get("rounds", [])):
            if (run, k) in seen:
                continue
            seen.add((run, k))
            meta = RunLayout(run).policy_dir(int(k)) / "speechalign.json"
            theirs = json.loads(meta.read_text()).get("codec_identity") if meta.is_file() else None
            if theirs is not None and theirs != ctx.codec.identity:
                raise ValueError(f"human pairs of {run} round {k} were spoken with codec {theirs}, but this run's codec "
                                 f"is {ctx.codec.identity}: their tokens index another codebook. Judge clips of runs that "
                                 "share this run's codec (its own rounds, or runs started from its round-0 policy)")


def mixed(ctx: "Context", k: int, rows: list[dict]) -> list[dict]:
    """The pairs of every strategy in ``pair.mixed``, pooled (default: golden_vs_synthetic + ranked_samples)."""
    return [p for name in ctx.cfg.pair.mixed for p in PAIR_STRATEGIES[name](ctx, k, rows)]


PAIR_STRATEGIES: dict[str, Callable] = {"golden_vs_synthetic": golden_vs_synthetic,
                                        "ranked_samples": ranked_samples, "human": human, "mixed": mixed}
