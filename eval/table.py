"""Per-utterance results of every evaluation of a run as one pandas table.

Built from the rounds' own ``round_k/eval/rows.jsonl`` files, so it works on any finished (or
half-finished) run, old ones included, and is never out of step with them::

    table = load_table("runs/tiny")              # one row per (round, utterance, sample)
    write_table("runs/tiny")                     # -> runs/tiny/utterances.parquet

Columns: run, round, item (position in the fixed eval set), id, sample (sample index per text),
speaker, text, hypothesis, wer, sim, dnsmos (NaN where the rows carry none), duration (s),
n_frames, ref_words and errors (so corpus WER = errors.sum() / ref_words.sum()), audio and
prompt_audio (paths of the golden and prompt recordings where the rows record them).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from models.io import atomic_write_text

log = logging.getLogger("speechalign.eval")

TABLE_COLUMNS = ["run", "round", "item", "id", "sample", "speaker", "text", "hypothesis", "wer", "sim", "dnsmos",
                 "duration", "n_frames", "ref_words", "errors", "pause", "defect", "per", "phone_errors", "ref_phones",
                 "ear_nll", "audio", "prompt_audio"]
_ROUND_RE = re.compile(r"round_(\d+)$")


def read_jsonl(path: str | Path) -> list[dict]:
    """JSON lines -> dicts (here rather than align.run's, which imports torch: compare stays quick)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def eval_rounds(run_dir: str | Path) -> dict[int, Path]:
    """{round: its eval folder} for every round of a run that has ``eval/rows.jsonl``."""
    out = {}
    for d in sorted(Path(run_dir).glob("round_*")):
        m = _ROUND_RE.search(d.name)
        if m and (d / "eval" / "rows.jsonl").is_file():
            out[int(m.group(1))] = d / "eval"
    return out


def rows_frame(rows: list[dict], run: str = "", round_: int | None = None) -> pd.DataFrame:
    """Eval rows (dicts as ``stages.evaluate`` writes them) -> a table with ``TABLE_COLUMNS``.

    Missing optional keys become NaN/empty; ``ref_words``/``errors`` are derived from the text and
    the per-utterance WER with the same normaliser the ASR scorer uses.
    """
    from models.text import normalize_text

    df = pd.DataFrame(rows)
    if df.empty:
        raise ValueError("no evaluation rows to tabulate; evaluate at least one round first")
    for key in ("id", "text", "wer", "sim"):
        if key not in df.columns:
            raise ValueError(f"eval rows lack the {key!r} key; are these rows from stages.evaluate / speechalign eval?")
    df["run"] = run
    if round_ is not None:
        df["round"] = round_
    if "round" not in df.columns:
        df["round"] = 0
    if "item" not in df.columns:
        df["item"] = df.groupby("round").cumcount()
    # pause / defect: the pause detector's (eval/defects.py); per ... ear_nll: the second ear's (eval.ear); NaN in
    # rows evaluated without them
    for key, default in (("sample", 0), ("speaker", ""), ("hypothesis", ""), ("dnsmos", np.nan), ("pause", np.nan),
                         ("defect", np.nan), ("per", np.nan), ("phone_errors", np.nan), ("ref_phones", np.nan),
                         ("ear_nll", np.nan),
                         ("duration", np.nan), ("n_frames", np.nan), ("audio", None), ("prompt_audio", None)):
        if key not in df.columns:
            df[key] = default
    df["hypothesis"] = df["hypothesis"].fillna("")
    df["ref_words"] = [len(normalize_text(t).split()) for t in df["text"]]
    # Per-utterance WER x reference words = that utterance's edit errors (an integer up to float noise).
    df["errors"] = np.round(df["wer"].astype(float) * df["ref_words"]).astype(int)
    for key in ("dnsmos", "pause", "defect", "per", "phone_errors", "ref_phones", "ear_nll"):
        df[key] = pd.to_numeric(df[key], errors="coerce")
    return df[TABLE_COLUMNS].sort_values(["round", "item", "sample"]).reset_index(drop=True)


def load_table(run_dir: str | Path) -> pd.DataFrame:
    """Every evaluated round of a run, one row per (round, utterance, sample)."""
    run_dir = Path(run_dir)
    rounds = eval_rounds(run_dir)
    if not rounds:
        raise ValueError(f"{run_dir} has no round_*/eval/rows.jsonl: is it a run directory with round 0 evaluated?")
    frames = [rows_frame(read_jsonl(d / "rows.jsonl"), run=run_dir.name, round_=k) for k, d in rounds.items()]
    return pd.concat(frames, ignore_index=True)


def write_table(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's table as parquet (``<run>/utterances.parquet`` by default); returns the path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "utterances.parquet"
    df = load_table(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".csv":
        atomic_write_text(out, df.to_csv(index=False))
        return out
    df.to_parquet(tmp, index=False)
    tmp.replace(out)
    return out


def read_rows_file(path: str | Path) -> pd.DataFrame:
    """A table from any per-utterance results file: our parquet/CSV table, an eval ``rows.jsonl``,
    a ``speechalign eval`` JSON (``rows`` key) or a ``gate --write-baseline`` JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a rows.jsonl, utterances.parquet/.csv or baseline .json")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=True)
    if path.suffix == ".jsonl":
        return rows_frame(read_jsonl(path))
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError(f"{path} has no 'rows' list; pass a `speechalign gate --write-baseline` or "
                             "`speechalign eval` output (metrics.jsonl holds only means, which cannot be paired)")
        return rows_frame(data["rows"], run=data.get("run", ""), round_=data.get("round"))
    raise ValueError(f"{path}: unknown results format {path.suffix!r}; use .parquet, .csv, .jsonl or .json")
