"""Round comparison: rounds (and runs) side by side, with bootstrap CIs, paired tests and plots.

    cmp = build_comparison(["runs/tiny", "runs/tiny_beta02"], rounds=[0, 3])
    paths = write_outputs(cmp, "runs/tiny/compare")   # .csv .md _tests.csv _wer.png _sim.png ...

The per-round table reads each run's ``metrics.jsonl`` (training-side columns: reward accuracy and
margin, DPO loss, wall seconds per stage) and adds, from the per-utterance rows (``eval.table``), for m
in wer, sim (and dnsmos where scored) and k in prev (the previous listed round), r0 (round 0):
``<m>_lo``/``<m>_hi`` (bootstrap CI), ``<m>_p_<k>`` (two-sided sign-flip test on the paired
per-utterance differences, exact for up to 16 differing pairs: ``eval.stats.sign_flip_test``),
``<m>_n_<k>`` (the pairs it had) and ``<m>_p_<k>_holm`` (Holm-corrected over every test of the
comparison; ``_bh`` with ``correction="bh"``), and ``p_test`` (which test gave the row's p-values).
The long ``tests`` table has every paired test with its n, delta, CI, p, test, Holm and BH p and
the Wilcoxon p; the correction's family is that whole table.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

log = logging.getLogger("speechalign.eval")

COLUMNS = ["run", "round", "method", "wer", "sim", "reward_accuracy", "reward_margin", "dpo_loss", "pairs",
           "mean_token_distance", "grpo_reward", "n_eval", "empty_outputs"]
OPTIONAL = ["dnsmos", "utmos", "gap_auc", "gap_logp_margin"]
STAT_METRICS = ["wer", "sim", "dnsmos", "defect", "per", "ear_nll"]  # each where the rows carry it


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``metrics.jsonl`` as a DataFrame, one row per round, wall seconds per stage as columns."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: is it a run directory with at least round 0 evaluated?")
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for stage, sec in (row.pop("seconds", None) or {}).items():
            row[f"sec_{stage}"] = sec
        for name, means in (row.pop("extra", None) or {}).items():  # eval.extra_sets: wer[VCTK-Corpus-0.92], ...
            row.update({f"{m}[{name}]": v for m, v in means.items() if v is not None})
        row["run"] = Path(run_dir).name
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Comparison:
    """Everything ``compare`` and ``report`` show."""

    table: pd.DataFrame       # one row per (run, round): metrics.jsonl columns + CIs + p-values
    tests: pd.DataFrame       # paired tests (eval.stats.round_tests columns + vs_run)
    utterances: pd.DataFrame  # per-utterance rows of every run and round (eval.table)
    estimates: pd.DataFrame   # per (run, round) bootstrap estimates (eval.stats.round_estimates)
    level: float
    n_boot: int
    correction: str = "holm"  # multiple-testing correction over every row of ``tests``: holm or bh


def build_comparison(run_dirs: list[str | Path], rounds: list[int] | None = None, *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0, correction: str = "holm",
                     between_runs: bool = True) -> Comparison:
    """Load runs, bootstrap every round's metrics and run the paired tests (see the module docstring).

    between_runs: also test every run against the first at each round (kind ``run``); those tests
    join the correction's family. correction: ``holm`` (family-wise error) or ``bh`` (false discovery).
    """
    from eval.stats import correct_tests, round_estimates, round_tests, run_tests
    from eval.table import load_table

    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    metrics = pd.concat([load_metrics(d) for d in run_dirs], ignore_index=True)
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) < len(names):
        raise ValueError(f"runs {names} share a folder name; compare runs whose directories are named differently")
    utts = pd.concat([load_table(d) for d in run_dirs], ignore_index=True)
    if rounds is not None:
        missing = sorted(set(rounds) - set(metrics["round"]))
        if missing:
            raise ValueError(f"--rounds asks for round(s) {missing} that no run has evaluated; "
                             f"available: {sorted(set(metrics['round']))}")
        metrics = metrics[metrics["round"].isin(rounds)]
    est = round_estimates(utts, STAT_METRICS, n_boot=n_boot, level=level, seed=seed)
    if rounds is not None:
        est = est[est["round"].isin(rounds)]
    tests = round_tests(utts, STAT_METRICS, rounds, n_boot=n_boot, level=level, seed=seed, correction=correction)
    if between_runs:
        tests = pd.concat([tests, run_tests(utts, names, STAT_METRICS, rounds, n_boot=n_boot, level=level, seed=seed)],
                          ignore_index=True)
    tests = correct_tests(tests, correction, level=level)  # one family: every test of this comparison

    table = metrics.copy()
    ci_cols, test_cols = [], []
    for m in STAT_METRICS:
        if f"{m}_lo" not in est:
            continue
        table = table.merge(est[["run", "round", f"{m}_lo", f"{m}_hi"]], on=["run", "round"], how="left")
        ci_cols += [f"{m}_lo", f"{m}_hi"]
        for kind in ("prev", "r0"):
            t = tests[(tests["metric"] == m) & tests["kind"].str.split(",").apply(lambda ks, kind=kind: kind in ks)]
            names_ = {"p": f"{m}_p_{kind}", "n": f"{m}_n_{kind}", f"p_{correction}": f"{m}_p_{kind}_{correction}",
                      "test": f"{m}_test_{kind}"}
            table = table.merge(t[["run", "round", *names_]].rename(columns=names_), on=["run", "round"], how="left")
            table[names_["n"]] = table[names_["n"]].astype("Int64")  # a count; <NA> where there is no test
            ci_cols += [names_[c] for c in ("p", "n", f"p_{correction}")]
            test_cols.append(names_["test"])
    # the kind of test only: how many pairs differed (2^k patterns) is in the tests table
    table["p_test"] = [("; ".join(dict.fromkeys(re.sub(r", 2\^\d+ patterns$", "", v) for v in row
                                                if isinstance(v, str) and v)) or None)
                       for row in table[test_cols].itertuples(index=False)] if test_cols else None
    table = table.drop(columns=test_cols)
    ci_cols.append("p_test")
    cols = ([c for c in COLUMNS if c in table.columns] + [c for c in OPTIONAL if c in table.columns] + ci_cols
            + sorted(c for c in table.columns if c.endswith("]") and "[" in c)
            + sorted(c for c in table.columns if c.startswith("sec_")))
    table = table[cols].sort_values(["run", "round"]).reset_index(drop=True)
    return Comparison(table, tests, utts, est, level, n_boot, correction)


def compare_runs(run_dirs: list[str | Path], rounds: list[int] | None = None, **kw) -> pd.DataFrame:
    """Rounds of every run, sorted by (run, round); ``rounds`` keeps only those rounds. See ``build_comparison``."""
    return build_comparison(run_dirs, rounds, **kw).table


def write_comparison(df: pd.DataFrame, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<prefix>.csv`` and ``<prefix>.md`` of one table; returns both paths."""
    from models.io import atomic_write_text

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    csv, md = out_prefix.with_suffix(".csv"), out_prefix.with_suffix(".md")
    atomic_write_text(csv, df.to_csv(index=False))
    atomic_write_text(md, to_markdown(df) + "\n")
    return csv, md


def figures(cmp: Comparison, out_dir: Path, stem: str = "", gap: bool = True) -> list[tuple[Path, str]]:
    """Draw the comparison's PNGs into ``out_dir`` (the gap-vs-round one when ``gap``); returns [(path, caption)]."""
    from eval import plots

    out = []
    for m in STAT_METRICS:
        if m in cmp.estimates and cmp.estimates[m].notna().any():
            p = out_dir / f"{stem}{m}.png"
            out.append((p, plots.metric_vs_round(cmp.estimates.dropna(subset=[m]), m, p, level=cmp.level,
                                                 n_boot=cmp.n_boot)))
    if gap and "gap_auc" in cmp.table and cmp.table["gap_auc"].notna().any():
        p = out_dir / f"{stem}gap.png"
        out.append((p, plots.gap_vs_round(cmp.table, p)))
    for run, g in cmp.utterances.groupby("run", sort=True):
        rounds = sorted(set(g["round"]) & set(cmp.table.loc[cmp.table["run"] == run, "round"]))
        last = max(rounds) if rounds else 0
        if 0 in set(g["round"]) and last > 0:
            p = out_dir / f"{stem}wer_scatter_{run}_r0_r{last}.png"
            out.append((p, plots.wer_scatter(cmp.utterances, run, last, p)))
    return out


def write_outputs(cmp: Comparison, out_prefix: str | Path) -> dict[str, Path]:
    """``<prefix>.csv``/``.md`` (per-round table, then the tests and figures in the .md),
    ``<prefix>_tests.csv`` and ``<prefix>_<figure>.png``; returns {name: path}."""
    from models.io import atomic_write_text

    out_prefix = Path(out_prefix)
    csv, md = write_comparison(cmp.table, out_prefix)
    tests_csv = out_prefix.with_name(out_prefix.name + "_tests.csv")
    atomic_write_text(tests_csv, cmp.tests.to_csv(index=False))
    figs = figures(cmp, out_prefix.parent, stem=out_prefix.name + "_")
    lines = [to_markdown(cmp.table), "", table_note(cmp), "",
             "## Paired tests", "", to_markdown(cmp.tests), "", tests_note(cmp), ""]
    if figs:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})\n\n{cap}\n" for p, cap in figs]
    atomic_write_text(md, "\n".join(lines) + "\n")
    out = {"csv": csv, "md": md, "tests": tests_csv}
    out.update({p.stem: p for p, _ in figs})
    return out


def table_note(cmp: Comparison) -> str:
    """What the per-round table's CI and p columns are (the caption under it)."""
    c = cmp.correction
    return (f"CIs: {cmp.level:.0%} percentile bootstrap over utterances ({cmp.n_boot} resamples, seeded); wer is "
            "corpus WER (total errors / total reference words). *_p_prev / *_p_r0: two-sided sign-flip permutation "
            "test of the change vs the previous listed round / round 0, paired on utterance id (wer: per-utterance "
            "edit-error counts; sim, dnsmos: per-utterance values), exact over all 2^k sign patterns of the k pairs "
            "that differ when k <= 16 (so p >= 2/2^k), else seeded Monte Carlo; p_test names the test. *_n_*: the "
            f"pairs. *_{c}: {CORRECTIONS[c]} over all {len(cmp.tests)} paired tests of this comparison (the tests "
            "table below). In round 1, p_prev and p_r0 are the same test.")


def tests_note(cmp: Comparison) -> str:
    """The caption under the long tests table."""
    return ("delta = metric(round of run) - metric(vs_round of vs_run) on the n utterances both scored; "
            "delta_lo/hi: its paired bootstrap CI; p: sign-flip permutation test (test: exact or Monte Carlo); "
            f"p_holm / p_bh: Holm (family-wise) / Benjamini-Hochberg (false discovery rate) over all {len(cmp.tests)} "
            "rows; p_wilcoxon: Wilcoxon signed-rank on per-utterance values; better: True (good direction) or False "
            f"(bad) where p_{cmp.correction} < {1 - cmp.level:.2f}, empty where the change does not survive the "
            "correction.")


CORRECTIONS = {"holm": "Holm-corrected p (family-wise error)", "bh": "Benjamini-Hochberg-corrected p (false discovery rate)"}


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table without the optional ``tabulate`` dependency."""
    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4g}"
        if v is None or v is pd.NA:
            return ""
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
