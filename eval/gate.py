"""``speechalign gate``: fail a run whose final round is worse than a baseline by more than noise.

    write_baseline("runs/ci", "ci_baseline.json")            # rows of the final round, once
    result = run_gate("runs/ci_new", "ci_baseline.json", cfg.gate)
    result.passed, result.message                             # one line either way

For each gated metric (``GateConfig.metrics``), the run's final-round rows are paired with the
baseline's on utterance id and the difference is bootstrapped (``eval.stats.paired_test``; an
unpaired bootstrap when the two share no ids). Oriented so that positive = worse, the metric fails
when the lower end of its CI is above the metric's tolerance: the regression is both real (outside
the CI) and larger than what the config accepts. A rerun of the same config passes (delta 0).

Rows either side lacks are left out of a paired comparison, and said so: the message and every check
carry how many run and baseline rows were paired and dropped. When some rows pair but fewer than half
of either side's do, the gate fails: the baseline is not of this evaluation set, and a verdict on the
remnant would not be one on the run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger("speechalign.eval")

# Which way is better, per gated metric: +1 = higher is better, -1 = lower is better.
GATE_DIRECTIONS = {"wer": -1, "sim": +1, "dnsmos": +1, "defect": -1, "per": -1, "ear_nll": -1}


@dataclass
class GateConfig:
    """``speechalign gate``: when a run's final round counts as a regression against a baseline.

    A metric fails when the whole bootstrap CI of (run - baseline), oriented so that positive means
    worse, lies above its tolerance: noise (a CI that reaches below the tolerance) passes.
    """

    metrics: list[str] = field(default_factory=lambda: ["wer", "sim"], metadata={
        "help": f"metrics the gate checks (any of {sorted(GATE_DIRECTIONS)}; dnsmos only where rows carry it)"})
    wer_tolerance: float = field(default=0.05, metadata={
        "help": "corpus-WER increase (absolute, 0.05 = 5 points) allowed beyond the CI"})
    sim_tolerance: float = field(default=0.02, metadata={"help": "mean speaker-SIM decrease allowed beyond the CI"})
    dnsmos_tolerance: float = field(default=0.1, metadata={"help": "mean DNSMOS decrease allowed beyond the CI"})
    per_tolerance: float = field(default=0.02, metadata={
        "help": "corpus phone-error-rate increase of the second ear (eval.ear) allowed beyond the CI"})
    ear_nll_tolerance: float = field(default=0.1, metadata={
        "help": "increase of the second ear's mean NLL per phone (nats) allowed beyond the CI"})
    defect_tolerance: float = field(default=0.0, metadata={
        "help": "increase of the pause-defect rate (share of samples, eval/defects.py) allowed beyond the CI"})
    defect_drop: float | None = field(default=None, metadata={
        "help": "a check of the run itself, not the baseline: its final round's pause-defect rate must lie below round "
                "0's by at least this much, the whole CI of (final - round 0) under -defect_drop (the positive "
                "control: a working round removes the planted defect); null = not checked"})
    min_probe_accuracy: float | None = field(default=None, metadata={
        "help": "a check of the run itself: its final round must prefer at least this share of the pause probes "
                "more than round 0 did (summary probe_accuracy_pause, align/probes.py); null = not checked"})
    min_probe_movement: float | None = field(default=None, metadata={
        "help": "a check of the run itself: the median over the probe set of |margin(final) - margin(round 0)| "
                "(nats, align/probes.py) must reach this: a trainer that barely moves the policy (a learning rate "
                "a tenth of the configured one, an optimiser that skips steps) moves it about a tenth as far; "
                "null = not checked"})
    first_step: bool = field(default=True, metadata={
        "help": "a check of the run's own training logs: at step 1 of every DPO round the policy is its reference, "
                "so its implicit rewards are 0 (``first_step_violations``); a round trained against another "
                "reference (round 0's instead of round k-1's) starts away from 0. Nothing recorded, so nothing to "
                "re-record: a fault it sees cannot be hidden by refreshing a reference file"})
    confidence: float = field(default=0.95, metadata={"help": "two-sided bootstrap CI level"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed (the gate is deterministic for a seed)"})

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(GATE_DIRECTIONS))
        if unknown or not self.metrics:
            raise ValueError(f"gate.metrics={self.metrics}: choose a non-empty subset of {sorted(GATE_DIRECTIONS)}")
        if min(self.wer_tolerance, self.sim_tolerance, self.dnsmos_tolerance, self.defect_tolerance,
               self.per_tolerance, self.ear_nll_tolerance) < 0:
            raise ValueError("gate tolerances must be >= 0 (0 = any significant regression fails)")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"gate.confidence={self.confidence} must be in [0.5, 1), e.g. 0.95")
        if self.n_boot < 100:
            raise ValueError(f"gate.n_boot={self.n_boot} is too few for a CI; use >= 100 (default 2000)")

    def tolerance(self, metric: str) -> float:
        return getattr(self, f"{metric}_tolerance")


def final_round(run_dir: str | Path, round_: int | None = None) -> tuple[int, pd.DataFrame]:
    """(round, its per-utterance table): the last evaluated round, or ``round_``."""
    from eval.table import load_table

    table = load_table(run_dir)
    rounds = sorted(int(k) for k in table["round"].unique())
    k = rounds[-1] if round_ is None else round_
    if k not in rounds:
        raise ValueError(f"{run_dir}: round {k} is not evaluated; evaluated rounds: {rounds}")
    return k, table[table["round"] == k].reset_index(drop=True)


def write_baseline(run_dir: str | Path | list, out: str | Path, round_: int | None = None) -> Path:
    """Save a run's final-round rows (and means) as a gate baseline JSON; returns its path.

    Given several runs (the same config at several seeds), each utterance's row is their mean (edit errors, SIM,
    DNSMOS, pause, defect): a baseline of one seed carries that seed's luck (the CI loop's seed 0 read SIM 0.013 to
    0.020 above five others), a mean of several carries less of it."""
    from models.io import atomic_write_text
    from eval.stats import METRICS, available, metric_arrays

    dirs = list(run_dir) if isinstance(run_dir, (list, tuple)) else [run_dir]
    finals = [final_round(d, round_) for d in dirs]
    k = finals[0][0]
    keep = ["id", "sample", "text", "hypothesis", "wer", "sim", "dnsmos", "pause", "defect", "duration", "ref_words",
            "errors", "per", "phone_errors", "ref_phones", "ear_nll"]
    keep = [c for c in keep if all(c in f[1].columns for f in finals)]  # the second ear's columns where it listened
    if len(finals) == 1:
        rows = finals[0][1][keep]
    else:
        ids = [set(map(tuple, f[1][["id", "sample"]].values.tolist())) for f in finals]
        if any(x != ids[0] for x in ids[1:]):
            raise ValueError("the baseline's runs were not evaluated on the same utterances; use runs of one config")
        both = pd.concat([f[1][keep] for f in finals], ignore_index=True)
        mean_cols = [c for c in ("wer", "sim", "dnsmos", "pause", "defect", "duration", "errors", "per", "phone_errors",
                                 "ear_nll") if c in keep]
        rows = (both.groupby(["id", "sample"], sort=False)
                .agg({**{c: "mean" for c in mean_cols}, "text": "first", "hypothesis": "first", "ref_words": "first",
                      **({"ref_phones": "first"} if "ref_phones" in keep else {})})
                .reset_index()[keep])
        rows["hypothesis"] = ""  # a mean of several runs has no one transcript
    means = {}
    for m in METRICS:
        if available(rows, m):
            num, den = metric_arrays(rows, m)
            means[m] = float(num.sum() / den.sum())
    data = {"run": "+".join(Path(d).name for d in dirs), "runs": [str(Path(d).name) for d in dirs], "round": k,
            "metrics": means,
            "rows": json.loads(rows.to_json(orient="records", double_precision=15))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(data, indent=1) + "\n")
    return out


def load_baseline(path: str | Path) -> pd.DataFrame:
    """Baseline rows from a ``write_baseline`` JSON, an eval rows.jsonl or a results table (its last round)."""
    from eval.table import read_rows_file

    df = read_rows_file(path)
    if "round" in df.columns and df["round"].nunique() > 1:
        df = df[df["round"] == df["round"].max()]
    return df.reset_index(drop=True)


@dataclass
class GateResult:
    passed: bool
    message: str                                   # one line, for the terminal and CI logs
    checks: list[dict] = field(default_factory=list)  # per metric: delta, CI, tolerance, failed


def _has_partner(rows: pd.DataFrame, other: pd.DataFrame) -> "pd.Series":
    """Per row of ``rows``: does ``other`` hold a row with its (id, sample) (the pairing ``run_gate`` merges on)."""
    keys = other[["id", "sample"]].drop_duplicates()
    hit = rows[["id", "sample"]].merge(keys, on=["id", "sample"], how="left", indicator=True)["_merge"]
    return (hit == "both").reset_index(drop=True)


def run_gate(run_dir: str | Path, baseline: str | Path, cfg: GateConfig, round_: int | None = None) -> GateResult:
    """Compare a run's final round (or ``round_``) against ``baseline``; see the module docstring."""
    from eval.stats import available, metric_arrays, paired_test, unpaired_test

    k, rows = final_round(run_dir, round_)
    base = load_baseline(baseline)
    where = f"{Path(run_dir).name} round {k} vs {Path(baseline).name}"
    merged = rows[["id", "sample"]].merge(base[["id", "sample"]], on=["id", "sample"])
    paired = len(merged) > 0
    run_in, base_in = _has_partner(rows, base), _has_partner(base, rows)
    counts = {"run_rows": len(rows), "run_paired": int(run_in.sum()), "run_dropped": int((~run_in).sum()),
              "baseline_rows": len(base), "baseline_paired": int(base_in.sum()),
              "baseline_dropped": int((~base_in).sum())}
    pairing_counts = (f"{counts['run_paired']} of {counts['run_rows']} run rows and {counts['baseline_paired']} of "
                      f"{counts['baseline_rows']} baseline rows paired; dropped {counts['run_dropped']} run, "
                      f"{counts['baseline_dropped']} baseline")
    if paired and (counts["run_dropped"] or counts["baseline_dropped"]):
        log.warning("gate: %s: %s (rows the other side lacks on (id, sample))", where, pairing_counts)
    if paired and min(counts["run_paired"] / max(1, counts["run_rows"]),
                      counts["baseline_paired"] / max(1, counts["baseline_rows"])) < 0.5:
        msg = (f"gate FAIL: the baseline is not of this evaluation set: {pairing_counts}; fewer than half of a side "
               f"pair on (id, sample), so no verdict on the remnant; write a baseline from a run evaluated on the "
               f"same set (`speechalign gate RUN --write-baseline FILE`) [{where}]")
        return GateResult(False, msg, [dict(counts, metric=m, paired=True, failed=True, reason="baseline of another "
                                            "evaluation set") for m in cfg.metrics])
    if paired:
        a = merged.merge(base, on=["id", "sample"], how="left")
        b = merged.merge(rows, on=["id", "sample"], how="left")
    else:
        log.warning("gate: %s round %d shares no utterance ids with %s; comparing unpaired", run_dir, k, baseline)
        a, b = base, rows
    checks = []
    for m in cfg.metrics:
        if not (available(a, m) and available(b, m)):
            if m == "dnsmos":
                log.warning("gate: dnsmos missing from the run or the baseline rows; not gated")
                continue
            raise ValueError(f"gate: metric {m!r} is missing from the run's or the baseline's rows")
        test = (paired_test if paired else unpaired_test)(*metric_arrays(a, m), *metric_arrays(b, m),
                                                          n_boot=cfg.n_boot, level=cfg.confidence, seed=cfg.seed)
        # orient: worse > 0 (WER up, SIM/DNSMOS down)
        sign = -GATE_DIRECTIONS[m]
        # round away float dust (and -0.0) so an identical rerun reads +0.0000
        worse, lo, hi = (round(x, 12) + 0.0 for x in (sign * test.delta, *sorted((sign * test.lo, sign * test.hi))))
        tol = cfg.tolerance(m)
        checks.append({"metric": m, "worse_by": worse, "ci_lo": lo, "ci_hi": hi, "tolerance": tol, "n": test.n,
                       "paired": paired, "failed": lo > tol, **counts})
    checks += _within_run_checks(run_dir, k, cfg)
    pairing = (f"paired on {checks[0]['n']} utterances ({pairing_counts})" if paired and checks else
               f"unpaired ({counts['run_rows']} run rows, {counts['baseline_rows']} baseline rows)")
    failed = [c for c in checks if c["failed"]]
    if failed:
        within = [c for c in failed if "message" in c]
        if within:
            c = within[0]
            msg = f"gate FAIL: {c['message']} [{where}]"
        else:
            c = max(failed, key=lambda c: c["ci_lo"] - c["tolerance"])
            msg = (f"gate FAIL: {c['metric']} worse than baseline by {c['worse_by']:.4f} ({cfg.confidence:.0%} CI "
                   f"{c['ci_lo']:.4f}..{c['ci_hi']:.4f}, {pairing}) > tolerance {c['tolerance']:g} [{where}]")
        if len(failed) > 1:
            msg += f"; also {', '.join(x['metric'] for x in failed if x is not c)}"
        return GateResult(False, msg, checks)
    parts = ", ".join(f"{c['metric']} {c['worse_by']:+.4f} (CI {c['ci_lo']:+.4f}..{c['ci_hi']:+.4f}, tol {c['tolerance']:g})"
                      for c in checks if "message" not in c)
    parts += "".join(f"; {c['message']}" for c in checks if "message" in c)
    return GateResult(True, f"gate PASS: worse-by {parts}, {pairing} [{where}]", checks)


# At step 1 the policy is its reference: the two log-probs of a sequence are the same computation on the same weights,
# differing at most by float32 rounding of sums over its tokens (a sequence's summed log-prob is a few hundred nats;
# rounding of such sums is ~1e-6 of them). FIRST_STEP_REL x (1 + |summed log-probs|) bounds that with room; a wrong
# reference reads rewards of the size of a round's learning (the CI loop's: ~1 nat x beta).
FIRST_STEP_REL = 1e-5


def first_step_violations(history: list[dict], sft_weight: float | None = None) -> list[str]:
    """What step 1 of every round must read, whatever else was recorded: the policy is its own reference, so the
    implicit rewards are 0 and, without an SFT term (``sft_weight`` == 0), the sigmoid DPO loss is ln 2.

    history: per-step logs ``{"step", "round"?, "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
    "logps/chosen", "logps/rejected"}`` (TRL's DPO log; keys a method does not log are not checked). Returns the
    violations, one line each."""
    import math

    bad = []
    for first in (r for r in history if int(r.get("step", 0)) == 1):
        k = first.get("round", 1)
        scale = 1 + abs(first.get("logps/chosen", 0.0)) + abs(first.get("logps/rejected", 0.0))
        tol = FIRST_STEP_REL * scale
        bad += [f"round {k} step 1 {key} = {first[key]:.3g}, not 0 within {tol:.2g} (the policy is its reference at "
                "step 1: is the reference another policy?)"
                for key in ("rewards/chosen", "rewards/rejected", "rewards/margins")
                if key in first and not abs(first[key]) <= tol]
        if sft_weight == 0 and "loss" in first and not abs(first["loss"] - math.log(2)) <= tol / 2 + 1e-6:
            bad.append(f"round {k} step 1 loss = {first['loss']:.6f}, not ln 2 = {math.log(2):.6f} (sigmoid DPO at "
                       "margin 0)")
    return bad


def defect_counts(run_dir: str | Path, k: int) -> pd.DataFrame:
    """Round k's pause-defect counts per evaluated row: ``id``, ``sample``, ``k`` (samples with the defect) and
    ``n`` (samples judged: the row's own and its ``eval.defect_samples`` extra ones), from its rows.jsonl."""
    from models.io import read_jsonl
    from models.rundir import RunLayout

    path = RunLayout(run_dir).eval_dir(k) / "rows.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: round {k} has no evaluation rows ({path})")
    out = []
    for r in read_jsonl(path):
        if r.get("defect") is None:
            raise ValueError(f"{path}: row {r.get('id')} carries no defect; evaluate with the pause detector")
        n = 1 + len(r.get("pauses") or [])
        events = r["defect"] * n
        if abs(events - round(events)) > 1e-6:
            raise ValueError(f"{path}: row {r.get('id')} defect {r['defect']} is not a share of its {n} samples")
        out.append({"id": r["id"], "sample": int(r.get("sample", 0)), "k": int(round(events)), "n": n})
    return pd.DataFrame(out)


def probe_movement(margins_0: list[float], margins_k: list[float]) -> float:
    """The median over probes of |margin_k - margin_0| (nats): how far training moved the policy's log-probs on
    fixed sequences, whichever way. Probes a policy can never say (-inf margins) are left out."""
    import numpy as np

    a, b = np.asarray(margins_0, dtype=float), np.asarray(margins_k, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"probe_movement: {a.size} round-0 margins against {b.size}; the same probes are needed")
    d = np.abs(b - a)
    d = d[np.isfinite(d)]
    return float(np.median(d)) if d.size else float("nan")


def _within_run_checks(run_dir: str | Path, k: int, cfg: GateConfig) -> list[dict]:
    """The checks of the run against itself (``defect_drop``, ``min_probe_accuracy``, ``min_probe_movement``,
    ``first_step``): what a working round must do, whatever the baseline."""
    from eval.stats import stratified_rate_test
    from models.rundir import RunLayout

    layout = RunLayout(run_dir)
    out = []
    if cfg.defect_drop is not None:
        if k == 0:
            raise ValueError(f"gate.defect_drop: {run_dir} has only round 0 evaluated")
        r0, rk = defect_counts(run_dir, 0), defect_counts(run_dir, k)
        both = r0.merge(rk, on=["id", "sample"], suffixes=("_0", "_k"))
        if both.empty:
            raise ValueError(f"gate.defect_drop: {run_dir} needs round 0 and round {k} evaluated with the pause "
                             "detector on the same utterances")
        t = stratified_rate_test(both["k_0"], both["n_0"], both["k_k"], both["n_k"], n_boot=cfg.n_boot,
                                 level=cfg.confidence, seed=cfg.seed)
        rate0, ratek = float((both["k_0"] / both["n_0"]).mean()), float((both["k_k"] / both["n_k"]).mean())
        failed = not t.hi < -cfg.defect_drop  # the whole CI below -drop: an unchanged rate fails
        out.append({"metric": "defect_drop", "round0": rate0, "final": ratek, "delta": t.delta, "ci_lo": t.lo,
                    "ci_hi": t.hi, "p": t.p, "required": cfg.defect_drop, "n": t.n, "samples": t.samples,
                    "failed": bool(failed),
                    "message": f"defect rate {rate0:.3f} -> {ratek:.3f} (change {t.delta:+.3f}, {cfg.confidence:.0%} "
                               f"CI {t.lo:+.3f}..{t.hi:+.3f}, p = {t.p:.2g}, {t.n} texts, {t.samples} samples, texts "
                               f"held fixed; a drop of at least {cfg.defect_drop:g} "
                               f"{'not shown' if failed else 'shown'})"})
    if cfg.min_probe_accuracy is not None:
        summary_path = layout.eval_dir(k) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        acc = summary.get("probe_accuracy_pause")
        if acc is None:
            raise ValueError(f"gate.min_probe_accuracy: {summary_path} has no probe_accuracy_pause; evaluate with "
                             "eval.probes > 0")
        failed = acc < cfg.min_probe_accuracy
        out.append({"metric": "probe_accuracy_pause", "value": acc, "required": cfg.min_probe_accuracy,
                    "n": summary.get("probe_n"), "failed": bool(failed),
                    "message": f"pause probes preferred over round 0: {acc:.3f} (at least {cfg.min_probe_accuracy:g} "
                               f"required; margin {summary.get('probe_margin_pause', float('nan')):+.2f})"})
    if cfg.min_probe_movement is not None:
        paths = [layout.eval_dir(j) / "probes.json" for j in (0, k)]
        if k == 0 or not all(p.is_file() for p in paths):
            raise ValueError(f"gate.min_probe_movement: {run_dir} needs the probe margins of round 0 and round {k} "
                             "(eval.probes > 0)")
        m0, mk = (json.loads(p.read_text())["margins"] for p in paths)
        moved = probe_movement(m0, mk)
        failed = not moved >= cfg.min_probe_movement
        out.append({"metric": "probe_movement", "value": moved, "required": cfg.min_probe_movement, "n": len(m0),
                    "failed": bool(failed),
                    "message": f"probe margins moved {moved:.1f} nats from round 0 (median over {len(m0)} probes; at "
                               f"least {cfg.min_probe_movement:g} required)"})
    if cfg.first_step:
        history = []
        for j in range(1, k + 1):
            path = layout.train_dir(j) / "metrics.json"
            if path.is_file():
                history += [dict(h, round=j) for h in json.loads(path.read_text()).get("history", [])]
        bad = first_step_violations(history)
        rounds = sorted({h["round"] for h in history if int(h.get("step", 0)) == 1})
        out.append({"metric": "first_step", "rounds": rounds, "violations": bad, "failed": bool(bad),
                    "message": (f"training logs: {'; '.join(bad)}" if bad else
                                f"step 1 of round{'s' if len(rounds) != 1 else ''} {rounds or '-'} at the reference "
                                "(implicit rewards 0)")})
    return out
