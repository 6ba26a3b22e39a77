"""Bootstrap confidence intervals and paired tests for per-utterance metrics.

Every metric here is a ratio of sums over utterances, ``sum(num) / sum(den)``:

    wer      num = edit errors, den = reference words   (corpus WER, as ``eval.asr.corpus_wer``)
    sim      num = speaker cosine, den = 1              (mean SIM)
    dnsmos   num = DNSMOS, den = 1                      (mean DNSMOS)

so one vectorised bootstrap serves them all: resample utterances with replacement (``n_boot``
index rows drawn at once from a seeded generator), recompute the ratio per resample, read the
percentile interval. Paired comparisons resample the *same* utterances for both sides, which
removes the between-utterance variance that dominates a few-hundred-utterance test set.

Bootstrap intervals are for CIs only. p-values come from a sign-flip permutation test on the paired
per-utterance differences (``sign_flip_test``): exact over all 2^n sign patterns for small n, a
seeded Monte Carlo beyond. A percentile-bootstrap "p" has no floor at small n (6 utterances that all
moved the same way read p = 0.001), whereas no test on 6 pairs can give less than 2/2^6 = 0.031.
What is paired: for wer the per-utterance *edit-error counts* (both sides score the same reference,
so the summed difference over the reference words is exactly the corpus-WER delta the tables show);
for sim and dnsmos the per-utterance values. ``adjust_p`` corrects a family of p-values (Holm or
Benjamini-Hochberg); ``correct_tests`` applies it over a whole tests table.

Seeds. A table with a ``seed`` column (a study: one row per training seed x utterance) holds runs trained
with different seeds, and the question "does method B beat A?" is about a new training run, so the seed is
the unit: pooling (seed, utterance) pairs as independent leaves the between-seed variance out of the null,
and such a p only says "these runs differ". With >= 2 seeds paired, ``round_tests``/``run_tests`` therefore
use ``seed_level_test``: a one-sample t-test of the per-seed deltas (df = S - 1), the exact sign-flip p over
those S deltas beside it, and a two-stage bootstrap CI (``cluster_bootstrap_delta``: seeds, then utterances
within each drawn seed). The pooled utterance-level sign-flip p stays, as ``p_within``, for information.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

log = logging.getLogger("speechalign.eval")

# metric -> (numerator column, denominator column or None for a plain mean, +1 higher is better / -1 lower)
METRICS = {"wer": ("errors", "ref_words", -1), "sim": ("sim", None, +1), "dnsmos": ("dnsmos", None, +1),
           # the share of an utterance's samples with the pause defect (eval/defects.py; eval.defect_samples extra)
           "defect": ("defect", None, -1),
           # the second ear (eval.ear): corpus PER over phone errors and reference phones, the mean CTC NLL per phone
           "per": ("phone_errors", "ref_phones", -1), "ear_nll": ("ear_nll", None, -1)}


def metric_arrays(df: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(num, den) float arrays [n] of a metric over a table's rows (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    num_col, den_col, _ = METRICS[metric]
    num = df[num_col].to_numpy(dtype=float)
    den = np.ones_like(num) if den_col is None else df[den_col].to_numpy(dtype=float)
    return num, den


def available(df: pd.DataFrame, metric: str) -> bool:
    """Whether every row carries the metric (DNSMOS is optional)."""
    num_col = METRICS[metric][0]
    return num_col in df.columns and len(df) > 0 and bool(df[num_col].notna().all())


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] resample indices; one seeded draw so every caller with the same seed agrees."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ratio(num_sum: np.ndarray, den_sum: np.ndarray) -> np.ndarray:
    """Resampled ``sum(num) / sum(den)``: float [n_boot]; a resample of only zero-word utterances reads 0, not NaN."""
    return num_sum / np.maximum(den_sum, 1e-12)


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates [n_boot]."""
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return float(lo), float(hi)


def ratio_delta(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray) -> float:
    """metric(B) - metric(A) = sum(num_b) / sum(den_b) - sum(num_a) / sum(den_a); arrays [n]."""
    return float(np.sum(num_b) / np.sum(den_b) - np.sum(num_a) / np.sum(den_a))


@dataclass
class Estimate:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    lo: float
    hi: float
    n: int


def bootstrap_ci(num: np.ndarray, den: np.ndarray | None = None, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> Estimate:
    """Percentile bootstrap CI of ``sum(num) / sum(den)``; num, den: float arrays [n]."""
    num = np.asarray(num, dtype=float)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=float)
    n = len(num)
    if n == 0:
        raise ValueError("bootstrap_ci got no values")
    value = float(num.sum() / den.sum())
    idx = _indices(n, n_boot, seed)
    lo, hi = _interval(_ratio(num[idx].sum(1), den[idx].sum(1)), level)
    return Estimate(value, lo, hi, n)


@dataclass
class SignFlipTest:
    """A two-sided sign-flip permutation test of paired differences (see ``sign_flip_test``)."""

    p: float
    n: int          # paired values
    n_nonzero: int  # pairs that differ: the exact test enumerates 2^n_nonzero sign patterns
    test: str       # e.g. "sign-flip exact, 2^6 patterns"


# 2^16 = 65,536 patterns enumerate in milliseconds; beyond, a seeded Monte Carlo. 99,999 resamples put
# the Monte Carlo p's own standard error under 0.001 at p = 0.05.
EXACT_MAX_N = 16
N_RESAMPLES = 99_999


def sign_flip_test(diffs: np.ndarray, *, exact_max_n: int = EXACT_MAX_N, n_resamples: int = N_RESAMPLES,
                   seed: int = 0) -> SignFlipTest:
    """Two-sided sign-flip test of H0 "each paired difference is as likely + as -"; diffs: float [n].

    Statistic: the sum of the differences. Zero differences keep their value under any flip, so only
    the n_nonzero others are flipped: p = the share of all 2^n_nonzero sign patterns whose |sum| is at
    least the observed one when n_nonzero <= ``exact_max_n``, else ``scipy.stats.permutation_test``
    (``permutation_type='samples'``, which flips signs for one sample) with ``n_resamples`` seeded
    random patterns. The observed pattern and its mirror always count, so p >= 2 / 2^n_nonzero
    (n = 6 all one way: exactly 2/64 = 0.03125).
    """
    from scipy.stats import permutation_test

    diffs = np.asarray(diffs, dtype=float)
    n = len(diffs)
    if n == 0 or not np.isfinite(diffs).all():
        raise ValueError(f"sign_flip_test needs at least one finite paired difference, got {diffs!r}")
    d = diffs[diffs != 0]
    k = len(d)
    if k == 0:
        return SignFlipTest(1.0, n, 0, "sign-flip exact, 2^0 patterns")
    if k <= exact_max_n:
        signs = 1 - 2 * ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1)  # [2^k, k], row 0 = observed
        sums = np.abs(signs @ d)
        # the same sum reached in another order may differ in the last bits; count it as a tie
        p = float(np.mean(sums >= sums[0] - 1e-12 * np.abs(d).sum()))
        return SignFlipTest(p, n, k, f"sign-flip exact, 2^{k} patterns")
    res = permutation_test((d,), lambda x, axis: np.sum(x, axis=axis), permutation_type="samples",
                           vectorized=True, n_resamples=n_resamples, alternative="two-sided",
                           rng=np.random.default_rng(seed))
    # a Monte Carlo p can fall below what any of the 2^k patterns could give; the exact floor holds
    p = float(min(1.0, max(res.pvalue, 2.0 / 2.0 ** k)))
    return SignFlipTest(p, n, k, f"sign-flip Monte Carlo, {n_resamples} resamples (seed {seed})")


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences [n], zeros dropped (``zero_method='wilcox'``).

    Up to ``EXACT_MAX_N`` non-zero differences: exact, as the sign-flip test of the signed ranks (ties
    get average ranks, which the exact null handles; scipy's normal approximation, its fallback with
    ties, can read below the 2/2^n that no exact test goes under). Beyond: ``scipy.stats.wilcoxon``.
    """
    from scipy.stats import rankdata, wilcoxon

    d = np.asarray(diffs, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    if len(d) <= EXACT_MAX_N:
        return sign_flip_test(np.sign(d) * rankdata(np.abs(d))).p
    return float(wilcoxon(d).pvalue)


def paired_differences(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray) -> np.ndarray:
    """Per-utterance differences B - A that the sign-flip test pairs: float [n].

    Same denominators on both sides (wer: the same reference words) -> num_b - num_a (error counts),
    whose sum / sum(den) is the ratio-of-sums delta itself; otherwise per-utterance num/den values.
    """
    if np.array_equal(den_a, den_b):
        return num_b - num_a
    return num_b / den_b - num_a / den_a


def adjust_p(p, method: Literal["holm", "bh"] = "holm") -> np.ndarray:
    """Multiple-testing correction of a family of p-values: float [m] -> adjusted float [m].

    holm: Holm's step-down, controls the family-wise error rate; p_(i) -> max_{j<=i} (m - j + 1) p_(j).
    bh: Benjamini-Hochberg, controls the false discovery rate (``scipy.stats.false_discovery_control``).
    NaN entries (no test) stay NaN and do not count towards m.
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if ((q < 0) | (q > 1)).any():
        raise ValueError(f"adjust_p needs p-values in [0, 1], got {q[(q < 0) | (q > 1)]}")
    if method not in ("holm", "bh"):
        raise ValueError(f"unknown correction {method!r}; choose 'holm' or 'bh'")
    if len(q) == 0:
        return out
    if method == "holm":
        m = len(q)
        order = np.argsort(q, kind="stable")
        res = np.empty_like(q)
        res[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    else:
        res = false_discovery_control(q, method="bh")
    out[ok] = res
    return out


@dataclass
class PairedTest:
    """Round/run B minus A on the utterances both scored."""

    delta: float        # metric(B) - metric(A)
    lo: float           # bootstrap CI of delta
    hi: float
    p_bootstrap: float  # paired-bootstrap tail mass: no floor at small n, so tables report p instead
    p_wilcoxon: float   # Wilcoxon signed-rank on per-utterance differences (NaN when n < 2)
    n: int
    p: float = float("nan")  # two-sided sign-flip permutation p (``sign_flip_test``) on paired_differences
    test: str = ""           # the test that gave p


def paired_test(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, *,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedTest:
    """Paired tests of B vs A; arrays [n] aligned on utterance.

    p: sign-flip permutation test (``sign_flip_test``) on ``paired_differences`` (wer: error counts).
    Bootstrap: the same resampled utterances for both sides give the delta's CI; p_bootstrap = 2 x
    the smaller tail mass beyond 0 (kept for old callers; at small n it is no p-value). Wilcoxon: on
    per-utterance values num/den, zero differences dropped (``zero_method='wilcox'``).
    """
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    num_a, den_a, num_b, den_b = arrays
    n = len(num_a)
    if n == 0 or any(len(x) != n for x in arrays):
        raise ValueError("paired_test needs equally long, non-empty arrays aligned on utterance id")
    delta = ratio_delta(num_a, den_a, num_b, den_b)
    idx = _indices(n, n_boot, seed)
    boot = _ratio(num_b[idx].sum(1), den_b[idx].sum(1)) - _ratio(num_a[idx].sum(1), den_a[idx].sum(1))
    lo, hi = _interval(boot, level)
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    p_boot = float(min(1.0, 2 * (tail + 1) / (n_boot + 1)))
    diffs = num_b / den_b - num_a / den_a
    if n < 2:
        p_wil = float("nan")
    elif np.allclose(diffs, 0):
        p_wil = 1.0  # identical per-utterance scores: no evidence of a difference
    else:
        p_wil = wilcoxon_p(diffs)
    sf = sign_flip_test(paired_differences(num_a, den_a, num_b, den_b), seed=seed)
    return PairedTest(delta, lo, hi, p_boot, p_wil, n, sf.p, sf.test)


def unpaired_test(num_a, den_a, num_b, den_b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedTest:
    """Like ``paired_test`` for two unrelated sets (no shared ids): each side resampled on its own;
    Wilcoxon is replaced by Mann-Whitney U on per-utterance values (also ``p``)."""
    from scipy.stats import mannwhitneyu

    num_a, den_a, num_b, den_b = (np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b))
    ia = _indices(len(num_a), n_boot, seed)
    ib = _indices(len(num_b), n_boot, seed + 1)
    boot = num_b[ib].sum(1) / den_b[ib].sum(1) - num_a[ia].sum(1) / den_a[ia].sum(1)
    delta = float(num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum())
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    va, vb = num_a / den_a, num_b / den_b
    p_mw = float(mannwhitneyu(vb, va).pvalue) if len(va) > 1 and len(vb) > 1 and not np.allclose(
        np.r_[va, vb], va[0]) else float("nan")
    return PairedTest(delta, float(lo), float(hi), float(min(1.0, 2 * (tail + 1) / (n_boot + 1))), p_mw,
                      min(len(va), len(vb)), p_mw, "Mann-Whitney U")


def _cluster_sums(arrays: list[np.ndarray], groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Two-stage bootstrap sums of each of ``arrays`` (float [n], aligned rows): one float [n_boot] per array.

    groups: [n] cluster label of each row (the training seed). Stage 1 draws S of the S clusters with
    replacement; stage 2 draws, for every drawn cluster, as many of its rows as it has, with replacement.
    Every array is summed over the same drawn rows, so a paired delta stays paired.
    """
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(inverse.max() + 1)]
    n_clusters = len(members)
    drawn = rng.integers(0, n_clusters, size=(n_boot, n_clusters))  # [n_boot, S] stage 1
    sums = [np.zeros(n_boot) for _ in arrays]
    # per (slot, cluster) only the replicates that drew that cluster there: memory n_boot x (rows of one seed)
    for slot in range(n_clusters):
        for c, rows in enumerate(members):
            reps = np.flatnonzero(drawn[:, slot] == c)
            if len(reps) == 0:
                continue
            idx = rows[rng.integers(0, len(rows), size=(len(reps), len(rows)))]  # stage 2
            for out, x in zip(sums, arrays):
                out[reps] += x[idx].sum(1)
    return sums


def cluster_bootstrap_delta(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray,
                            groups: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Two-stage (cluster) bootstrap CI of the paired delta metric(B) - metric(A); arrays [n] aligned on
    (seed, utterance id), groups: [n] the seed of each row.

    Each replicate resamples seeds with replacement, then utterances within each drawn seed, and takes the
    ratio of sums (``METRICS``) over everything drawn, for A and B on the same rows. The interval so carries
    the between-seed variance that an utterance-level bootstrap of pooled (seed, utterance) rows leaves out;
    with few seeds it is coarse (S = 3: at most 10 distinct seed multisets), as the truth is.
    """
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    n = len(arrays[0])
    if n == 0 or any(len(x) != n for x in arrays) or len(groups) != n:
        raise ValueError("cluster_bootstrap_delta needs equally long, non-empty arrays and groups aligned on "
                         "(seed, id)")
    sa_num, sa_den, sb_num, sb_den = _cluster_sums(arrays, groups, n_boot, seed)
    lo, hi = _interval(_ratio(sb_num, sb_den) - _ratio(sa_num, sa_den), level)
    return Estimate(ratio_delta(*arrays), lo, hi, n)


def seed_deltas(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, groups: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(seeds [S], deltas float [S]): per seed, metric(B) - metric(A) on that seed's paired rows (``ratio_delta``);
    arrays and groups [n] aligned on (seed, utterance id)."""
    groups = np.asarray(groups)
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    labels = np.unique(groups)
    deltas = np.array([ratio_delta(*(x[groups == g] for x in arrays)) for g in labels])
    return labels, deltas


@dataclass
class SeedLevelTest:
    """B minus A with the training seed as the unit (``seed_level_test``)."""

    delta: float             # metric(B) - metric(A) over every paired row, all seeds pooled
    lo: float                # two-stage bootstrap CI of delta (``cluster_bootstrap_delta``)
    hi: float
    seed_deltas: list[float]  # [S] per-seed deltas, in seed order
    n: int                   # paired rows: seeds x utterances
    n_seeds: int             # S
    t: float                 # one-sample t of the seed deltas (NaN when they do not vary)
    df: int                  # S - 1
    p: float                 # the seed-level p: the t-test's (the sign-flip one when t is undefined)
    p_signflip: float        # exact sign-flip p over the S seed deltas (>= 2 / 2^S)
    p_within: float          # utterance-level sign-flip p of the pooled (seed, utterance) pairs: for information
    p_wilcoxon: float        # Wilcoxon on the pooled pairs (``paired_test``)
    test: str                # e.g. "seed-level t (S=3, df=2)"


def seed_level_test(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, groups: np.ndarray,
                    *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SeedLevelTest:
    """Does B beat A as a method, over training seeds? Arrays [n] aligned on (seed, utterance id); groups [n]: seed.

    The unit is the seed: d_s = metric(B) - metric(A) on seed s's paired utterances (``seed_deltas``), and
    p is a two-sided one-sample t-test of H0 "mean d_s = 0" with df = S - 1. This is what a mixed model of
    the paired differences with a random seed intercept (d_su = delta + b_s + e_su) reduces to for a balanced
    design (every seed scored on the same utterances): its test of delta is the t-test on the seed means. The
    exact sign-flip p over the 2^S sign patterns of the d_s is reported beside it (``p_signflip``; no
    normality assumed, but never below 2 / 2^S: 0.25 for S = 3). When the d_s do not vary at all the t
    statistic is undefined (x / 0); p is then the sign-flip one and ``test`` says so. ``p_within`` is the
    utterance-level sign-flip p that pools (seed, utterance) pairs (``paired_test``): it says these runs differ,
    not that the method does. CI: ``cluster_bootstrap_delta``. Needs S >= 2 (one seed: ``paired_test``).
    """
    from scipy.stats import ttest_1samp

    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    groups = np.asarray(groups)
    labels, d = seed_deltas(*arrays, groups)
    if len(labels) < 2:
        raise ValueError(f"seed_level_test needs at least 2 seeds, got {list(labels)}; with one seed use paired_test "
                         "(and say that its p is about these runs, not the method)")
    within = paired_test(*arrays, n_boot=n_boot, level=level, seed=seed)
    ci = cluster_bootstrap_delta(*arrays, groups, n_boot=n_boot, level=level, seed=seed)
    sf = sign_flip_test(d)
    s, df = len(d), len(d) - 1
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        t, p = float("nan"), sf.p
        test = f"seed-level sign-flip (S={s}, exact; t undefined: the seed deltas do not vary)"
    else:
        r = ttest_1samp(d, 0.0)
        t, p, test = float(r.statistic), float(r.pvalue), f"seed-level t (S={s}, df={df})"
    return SeedLevelTest(ci.value, ci.lo, ci.hi, [float(x) for x in d], ci.n, s, t, df, p, sf.p, within.p,
                         within.p_wilcoxon, test)


def align_on_id(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of a and b for the (id, sample) keys both hold, in the same order; (seed, id, sample) when both
    carry a ``seed`` column."""
    keys = (["seed"] if "seed" in a.columns and "seed" in b.columns else []) + ["id", "sample"]
    merged = a[keys].drop_duplicates().merge(b[keys].drop_duplicates(), on=keys)
    a2 = merged.merge(a, on=keys, how="left")
    b2 = merged.merge(b, on=keys, how="left")
    return a2, b2


def round_estimates(table: pd.DataFrame, metrics: list[str] | None = None, *, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (run, round): ``<m>``, ``<m>_lo``, ``<m>_hi`` for each metric the rows carry. Where the rows carry
    a ``seed`` column with >= 2 seeds, the CI is the two-stage bootstrap's (seeds, then utterances within them), as
    the seed-level tests'; else the percentile bootstrap over rows. ``seeds`` says which."""
    metrics = metrics or list(METRICS)
    out = []
    for (run, k), g in table.groupby(["run", "round"], sort=True):
        n_seeds = int(g["seed"].nunique()) if "seed" in g.columns else 1
        row = {"run": run, "round": int(k), "n": len(g), "seeds": n_seeds}
        for m in metrics:
            if available(g, m):
                num, den = metric_arrays(g, m)
                if n_seeds >= 2:
                    s_num, s_den = _cluster_sums([num, den], g["seed"].to_numpy(), n_boot, seed)
                    lo, hi = _interval(_ratio(s_num, s_den), level)
                    e = Estimate(float(num.sum() / den.sum()), lo, hi, len(num))
                else:
                    e = bootstrap_ci(num, den, n_boot=n_boot, level=level, seed=seed)
                row.update({m: e.value, f"{m}_lo": e.lo, f"{m}_hi": e.hi})
        out.append(row)
    return pd.DataFrame(out)


def round_tests(table: pd.DataFrame, metrics: list[str] | None = None, rounds: list[int] | None = None, *,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                correction: Literal["holm", "bh"] = "holm") -> pd.DataFrame:
    """Paired tests per run and metric: each round vs the previous one (of ``rounds``) and vs round 0.

    Columns (``TEST_COLUMNS``): run, vs_run (= run here), metric, round, vs_round, kind (prev, r0 or
    both), n (paired utterances), delta (round - vs_round), delta_lo, delta_hi (bootstrap CI), p
    (sign-flip test), test (which: exact or Monte Carlo), p_holm, p_bh (corrected over this table's
    tests, ``correct_tests``), p_wilcoxon, better (True/False where the ``correction``-corrected p is
    below 1 - level, else None).

    A table with a ``seed`` column pairs on (seed, id, sample), and a comparison whose paired rows span >= 2
    seeds is tested with the seed as the unit (``seed_level_test``): n = seeds x utterances, p the seed-level
    t-test's, delta_lo/hi the two-stage bootstrap CI, plus the ``SEED_TEST_COLUMNS`` seeds (S),
    p_seed_signflip (exact over 2^S) and p_within (the utterance-level p, for information). Tables without
    a seed column, or with one seed, get the utterance-level tests and ``TEST_COLUMNS`` only.
    """
    metrics = metrics or list(METRICS)
    out = []
    for run, g in table.groupby("run", sort=True):
        have = sorted(int(k) for k in g["round"].unique())
        chosen = [k for k in have if rounds is None or k in rounds]
        comparisons = []  # (round, vs_round, kind)
        for i, k in enumerate(chosen):
            if i > 0:
                comparisons.append((k, chosen[i - 1], "prev,r0" if chosen[i - 1] == 0 else "prev"))
            if k != 0 and 0 in have and (i == 0 or chosen[i - 1] != 0):
                comparisons.append((k, 0, "r0"))
        for k, ref, kind in comparisons:
            out += _tests(g[g["round"] == ref], g[g["round"] == k], metrics,
                          {"run": run, "vs_run": run, "round": k, "vs_round": ref, "kind": kind},
                          n_boot=n_boot, level=level, seed=seed)
    return correct_tests(_tests_frame(out), correction, level=level)


TEST_COLUMNS = ["run", "vs_run", "metric", "round", "vs_round", "kind", "n", "delta", "delta_lo", "delta_hi",
                "p", "test", "p_holm", "p_bh", "p_wilcoxon", "better"]
# added by seed-level tests only (``seed_level_test``); NaN on a row of the same table tested per utterance
SEED_TEST_COLUMNS = ["seeds", "p_seed_signflip", "p_within"]


def _tests_frame(rows: list[dict]) -> pd.DataFrame:
    extra = [c for c in SEED_TEST_COLUMNS if any(c in r for r in rows)]
    return pd.DataFrame(rows, columns=TEST_COLUMNS + extra)


def correct_tests(tests: pd.DataFrame, method: Literal["holm", "bh"] = "holm", *, level: float = 0.95) -> pd.DataFrame:
    """(Re)compute ``p_holm`` and ``p_bh`` over every row of a tests table (the family is the whole
    table), and ``better`` from the ``method`` one: True/False (good/bad direction) where it is below
    1 - level, None otherwise. Returns a copy."""
    if method not in ("holm", "bh"):
        raise ValueError(f"unknown correction {method!r}; choose 'holm' or 'bh'")
    out = tests.copy()
    p = out["p"].to_numpy(dtype=float)
    out["p_holm"], out["p_bh"] = adjust_p(p, "holm"), adjust_p(p, "bh")
    good = [bool(METRICS[m][2] * d > 0) for m, d in zip(out["metric"], out["delta"])]
    out["better"] = pd.Series([g if q < 1 - level else None for g, q in zip(good, out[f"p_{method}"])],
                              index=out.index, dtype=object)
    return out


def _tests(ref: pd.DataFrame, new: pd.DataFrame, metrics: list[str], key: dict, **kw) -> list[dict]:
    a, b = align_on_id(ref, new)
    if a.empty:
        log.warning("%s round %s vs %s round %s share no utterance ids; no paired test", key["run"], key["round"],
                    key["vs_run"], key["vs_round"])
        return []
    by_seed = "seed" in a.columns and a["seed"].nunique() >= 2
    out = []
    for m in metrics:
        if not (available(a, m) and available(b, m)):
            continue
        if by_seed:
            st = seed_level_test(*metric_arrays(a, m), *metric_arrays(b, m), a["seed"].to_numpy(), **kw)
            out.append(dict(key, metric=m, n=st.n, delta=st.delta, delta_lo=st.lo, delta_hi=st.hi, p=st.p,
                            test=st.test, p_wilcoxon=st.p_wilcoxon, seeds=st.n_seeds, p_seed_signflip=st.p_signflip,
                            p_within=st.p_within))
            continue
        t = paired_test(*metric_arrays(a, m), *metric_arrays(b, m), **kw)
        out.append(dict(key, metric=m, n=t.n, delta=t.delta, delta_lo=t.lo, delta_hi=t.hi, p=t.p, test=t.test,
                        p_wilcoxon=t.p_wilcoxon))  # p_holm, p_bh, better: correct_tests, over the whole table
    return out


def run_tests(table: pd.DataFrame, runs: list[str], metrics: list[str] | None = None,
              rounds: list[int] | None = None, *, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0, correction: Literal["holm", "bh"] = "holm") -> pd.DataFrame:
    """Paired tests of every run against the first one at each round both evaluated (kind ``run``);
    columns, correction and seed-level tests (a table with a ``seed`` column) as ``round_tests``."""
    metrics = metrics or list(METRICS)
    out = []
    first = table[table["run"] == runs[0]]
    for run in runs[1:]:
        g = table[table["run"] == run]
        common = sorted(set(first["round"]) & set(g["round"]))
        for k in common:
            if rounds is not None and k not in rounds:
                continue
            out += _tests(first[first["round"] == k], g[g["round"] == k], metrics,
                          {"run": run, "vs_run": runs[0], "round": int(k), "vs_round": int(k), "kind": "run"},
                          n_boot=n_boot, level=level, seed=seed)
    return correct_tests(_tests_frame(out), correction, level=level)


@dataclass
class StratifiedRateTest:
    """Rate B minus rate A over strata (texts) whose samples are the units; see ``stratified_rate_test``."""

    delta: float   # mean over strata of (rate_b - rate_a)
    lo: float      # CI of delta: each stratum's counts redrawn, the texts held fixed
    hi: float
    p: float       # two-sided stratified permutation p (samples exchanged between A and B within each stratum)
    n: int         # strata
    samples: int   # samples in all, both sides
    test: str


def stratified_rate_test(k_a: np.ndarray, n_a: np.ndarray, k_b: np.ndarray, n_b: np.ndarray, *,
                         n_boot: int = 2000, level: float = 0.95, n_resamples: int = 20_000,
                         seed: int = 0) -> StratifiedRateTest:
    """Did a rate change on a fixed set of texts? k_*: int [S] samples with the event per stratum, n_*: int [S]
    samples drawn per stratum (S strata = texts, the same texts both sides).

    Each text's samples are independent draws of one policy, so the unit is the sample and the texts are held
    fixed: the question "did this policy's rate on these texts move?" is conditional on them. A bootstrap over
    texts would add the spread *between* texts (at round 0 a text may pause in 0 of 10 samples, another in 8) to
    what is only each text's sampling noise, and at a dozen texts a real halving of the rate reads as noise.

    delta: the mean over strata of rate_b - rate_a. CI: per stratum, counts redrawn as Binomial(n, k/n) on each
    side (resampling a stratum's 0/1 outcomes with replacement), percentile interval. p: under H0 a stratum's
    samples are exchangeable between A and B, so given its total t = k_a + k_b the count on side B is
    hypergeometric (t events among n_a + n_b samples, n_b drawn); ``n_resamples`` seeded draws of every stratum
    give the null of the summed difference (the Cochran-Mantel-Haenszel conditional test, by Monte Carlo);
    p counts the observed statistic among the draws, so it is never below 1 / (n_resamples + 1).
    """
    k_a, n_a, k_b, n_b = (np.asarray(x, dtype=np.int64) for x in (k_a, n_a, k_b, n_b))
    s = len(k_a)
    if s == 0 or any(len(x) != s for x in (n_a, k_b, n_b)):
        raise ValueError("stratified_rate_test needs equally long, non-empty per-stratum arrays")
    if (n_a < 1).any() or (n_b < 1).any() or (k_a < 0).any() or (k_b < 0).any() or (k_a > n_a).any() \
            or (k_b > n_b).any():
        raise ValueError("stratified_rate_test: every stratum needs n >= 1 samples and 0 <= k <= n per side")
    rng = np.random.default_rng(seed)
    delta = float(np.mean(k_b / n_b - k_a / n_a))
    boot_a = rng.binomial(n_a, k_a / n_a, size=(n_boot, s)) / n_a
    boot_b = rng.binomial(n_b, k_b / n_b, size=(n_boot, s)) / n_b
    lo, hi = _interval((boot_b - boot_a).mean(1), level)
    # statistic: sum over strata of (k_b - expected k_b given the stratum's total), two-sided
    total = k_a + k_b
    expected = total * n_b / (n_a + n_b)
    observed = abs(float((k_b - expected).sum()))
    null = rng.hypergeometric(np.broadcast_to(total, (n_resamples, s)),
                              np.broadcast_to(n_a + n_b - total, (n_resamples, s)),
                              np.broadcast_to(n_b, (n_resamples, s)))
    stat = np.abs((null - expected).sum(1))
    p = float(((stat >= observed - 1e-9).sum() + 1) / (n_resamples + 1))
    return StratifiedRateTest(delta, lo, hi, p, s, int(n_a.sum() + n_b.sum()),
                              f"stratified permutation over {s} texts, {n_resamples} resamples (seed {seed})")
