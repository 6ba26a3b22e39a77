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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

log = logging.getLogger("speechalign.eval")

# metric -> (numerator column, denominator column or None for a plain mean, +1 higher is better / -1 lower)
METRICS = {"wer": ("errors", "ref_words", -1), "sim": ("sim", None, +1), "dnsmos": ("dnsmos", None, +1)}


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
    boot = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return Estimate(value, float(lo), float(hi), n)


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
    delta = float(num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum())
    idx = _indices(n, n_boot, seed)
    boot = (num_b[idx].sum(1) / np.maximum(den_b[idx].sum(1), 1e-12)
            - num_a[idx].sum(1) / np.maximum(den_a[idx].sum(1), 1e-12))
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
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
    return PairedTest(delta, float(lo), float(hi), p_boot, p_wil, n, sf.p, sf.test)


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


def align_on_id(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of a and b for the (id, sample) keys both hold, in the same order."""
    keys = ["id", "sample"]
    merged = a[keys].drop_duplicates().merge(b[keys].drop_duplicates(), on=keys)
    a2 = merged.merge(a, on=keys, how="left")
    b2 = merged.merge(b, on=keys, how="left")
    return a2, b2


def round_estimates(table: pd.DataFrame, metrics: list[str] | None = None, *, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (run, round): ``<m>``, ``<m>_lo``, ``<m>_hi`` for each metric the rows carry."""
    metrics = metrics or list(METRICS)
    out = []
    for (run, k), g in table.groupby(["run", "round"], sort=True):
        row = {"run": run, "round": int(k), "n": len(g)}
        for m in metrics:
            if available(g, m):
                e = bootstrap_ci(*metric_arrays(g, m), n_boot=n_boot, level=level, seed=seed)
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
    return correct_tests(pd.DataFrame(out, columns=TEST_COLUMNS), correction, level=level)


TEST_COLUMNS = ["run", "vs_run", "metric", "round", "vs_round", "kind", "n", "delta", "delta_lo", "delta_hi",
                "p", "test", "p_holm", "p_bh", "p_wilcoxon", "better"]


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
    out = []
    for m in metrics:
        if not (available(a, m) and available(b, m)):
            continue
        t = paired_test(*metric_arrays(a, m), *metric_arrays(b, m), **kw)
        out.append(dict(key, metric=m, n=t.n, delta=t.delta, delta_lo=t.lo, delta_hi=t.hi, p=t.p, test=t.test,
                        p_wilcoxon=t.p_wilcoxon))  # p_holm, p_bh, better: correct_tests, over the whole table
    return out


def run_tests(table: pd.DataFrame, runs: list[str], metrics: list[str] | None = None,
              rounds: list[int] | None = None, *, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0, correction: Literal["holm", "bh"] = "holm") -> pd.DataFrame:
    """Paired tests of every run against the first one at each round both evaluated (kind ``run``);
    columns and correction as ``round_tests``."""
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
    return correct_tests(pd.DataFrame(out, columns=TEST_COLUMNS), correction, level=level)
