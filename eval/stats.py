"""Bootstrap confidence intervals and paired tests for per-utterance metrics.

Every metric here is a ratio of sums over utterances, ``sum(num) / sum(den)``:

    wer      num = edit errors, den = reference words   (corpus WER, as ``eval.asr.corpus_wer``)
    sim      num = speaker cosine, den = 1              (mean SIM)
    dnsmos   num = DNSMOS, den = 1                      (mean DNSMOS)

so one vectorised bootstrap serves them all: resample utterances with replacement (``n_boot``
index rows drawn at once from a seeded generator), recompute the ratio per resample, read the
percentile interval. Paired comparisons resample the *same* utterances for both sides, which
removes the between-utterance variance that dominates a few-hundred-utterance test set.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

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
class PairedTest:
    """Round/run B minus A on the utterances both scored."""

    delta: float        # metric(B) - metric(A)
    lo: float           # bootstrap CI of delta
    hi: float
    p_bootstrap: float  # two-sided paired-bootstrap p-value of delta == 0
    p_wilcoxon: float   # Wilcoxon signed-rank on per-utterance differences (NaN when n < 2)
    n: int


def paired_test(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, *,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedTest:
    """Paired bootstrap and Wilcoxon signed-rank of B vs A; arrays [n] aligned on utterance.

    Bootstrap: the same resampled utterances for both sides; p = 2 x the smaller tail mass of the
    resampled deltas beyond 0 (with the +1 correction so p is never 0). Wilcoxon: on per-utterance
    values num/den (per-utterance WER, SIM ...), zero differences dropped (``zero_method='wilcox'``).
    """
    from scipy.stats import wilcoxon

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
        p_wil = float(wilcoxon(diffs, zero_method="wilcox").pvalue)
    return PairedTest(delta, float(lo), float(hi), p_boot, p_wil, n)


def unpaired_test(num_a, den_a, num_b, den_b, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedTest:
    """Like ``paired_test`` for two unrelated sets (no shared ids): each side resampled on its own;
    Wilcoxon is replaced by Mann-Whitney U on per-utterance values."""
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
                      min(len(va), len(vb)))


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
                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired tests per run and metric: each round vs the previous one (of ``rounds``) and vs round 0.

    Columns (``TEST_COLUMNS``): run, vs_run (= run here), metric, round, vs_round, kind (prev, r0 or
    both), n (paired utterances), delta (round - vs_round), delta_lo, delta_hi, p_bootstrap,
    p_wilcoxon, better (True/False, or None when not significant at 1 - level).
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
    return pd.DataFrame(out, columns=TEST_COLUMNS)


TEST_COLUMNS = ["run", "vs_run", "metric", "round", "vs_round", "kind", "n", "delta", "delta_lo", "delta_hi",
                "p_bootstrap", "p_wilcoxon", "better"]


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
        significant = t.p_bootstrap < 1 - kw.get("level", 0.95)
        out.append(dict(key, metric=m, n=t.n, delta=t.delta, delta_lo=t.lo, delta_hi=t.hi, p_bootstrap=t.p_bootstrap,
                        p_wilcoxon=t.p_wilcoxon, better=(METRICS[m][2] * t.delta > 0) if significant else None))
    return out


def run_tests(table: pd.DataFrame, runs: list[str], metrics: list[str] | None = None,
              rounds: list[int] | None = None, *, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Paired tests of every run against the first one at each round both evaluated (kind ``run``)."""
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
    return pd.DataFrame(out, columns=TEST_COLUMNS)
