"""Round comparison: one table of rounds (and runs) side by side from their ``metrics.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

COLUMNS = ["run", "round", "method", "wer", "sim", "dnsmos", "utmos", "reward_accuracy", "reward_margin", "dpo_loss",
           "pairs", "mean_token_distance", "grpo_reward", "n_eval", "empty_outputs"]


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
        row["run"] = Path(run_dir).name
        rows.append(row)
    return pd.DataFrame(rows)


def compare_runs(run_dirs: list[str | Path], rounds: list[int] | None = None) -> pd.DataFrame:
    """Rounds of every run, sorted by (run, round); ``rounds`` keeps only those rounds."""
    df = pd.concat([load_metrics(d) for d in run_dirs], ignore_index=True)
    if rounds is not None:
        df = df[df["round"].isin(rounds)]
    cols = [c for c in COLUMNS if c in df.columns] + sorted(c for c in df.columns if c.startswith("sec_"))
    return df[cols].sort_values(["run", "round"]).reset_index(drop=True)


def write_comparison(df: pd.DataFrame, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<prefix>.csv`` and ``<prefix>.md``; returns both paths."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    csv, md = out_prefix.with_suffix(".csv"), out_prefix.with_suffix(".md")
    df.to_csv(csv, index=False)
    md.write_text(to_markdown(df) + "\n")
    return csv, md


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table without the optional ``tabulate`` dependency."""
    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
