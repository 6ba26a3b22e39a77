"""Ablation of preference methods and pair strategies: every config in configs/ablations/, one table.

    OMP_NUM_THREADS=2 python benchmarks/ablations.py [--configs 'configs/ablations/*.yaml'] [--set key=value ...]

1. One shared round-0 policy: the first config's base stage, run once as ``abl_base`` (rounds=0), so
   every method starts from the same weights and the same round-0 figures.
2. Each ablation config runs from it (``policy.pretrained``), sequentially; a finished run is skipped
   and a killed one resumes (the loop's own state.json).
3. ``eval.compare`` writes one round-by-round table to ``benchmarks/results/ablations.{md,csv}``.
A run that fails is recorded in the table's notes and the others still run.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from align.config import load_config  # noqa: E402
from align.loop import run_loop  # noqa: E402
from eval.compare import compare_runs, to_markdown  # noqa: E402

log = logging.getLogger("speechalign.bench")


def finished(cfg) -> bool:
    from align.run import read_jsonl

    path = cfg.run_dir / "metrics.jsonl"
    return path.exists() and {r["round"] for r in read_jsonl(path)} >= set(range(cfg.rounds + 1))


def round_seconds(cfg) -> float:
    """Stage seconds of rounds >= 1 (state.json): what the method cost, whichever invocation ran it."""
    import json

    done = json.loads((cfg.run_dir / "state.json").read_text())["done"]
    return sum(v["seconds"] for k, stages in done.items() if int(k) >= 1 for v in stages.values())


def share_round0(base_dir: Path, run_dir: Path) -> None:
    """Start a new run from the shared base's round 0 (policy and its evaluation), marked done.

    Round 0 of every ablation run would be the same copied policy evaluated with the same seed on the
    same items, so it is copied instead of recomputed (pocketsphinx on early-round babble is slow).
    """
    import json
    import shutil

    if run_dir.exists():
        return
    shutil.copytree(base_dir / "round_000", run_dir / "round_000")
    state = json.loads((base_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({"done": {"0": state["done"]["0"]}}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=str(ROOT / "configs" / "ablations" / "*.yaml"))
    parser.add_argument("--set", action="append", default=[], help="override for every run, e.g. out_dir=runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablations"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # the SpeechAlign recipe and its continue-SFT control first: the comparison that matters most if time runs out
    first = {"dpo_sigmoid.yaml": 0, "sft_control.yaml": 1}
    paths = sorted(glob.glob(args.configs), key=lambda p: (first.get(Path(p).name, 2), p))
    if not paths:
        raise SystemExit(f"no configs match {args.configs}")
    t_all = time.time()
    base_cfg = load_config(paths[0], args.set + ["name=abl_base", "rounds=0"])
    if not finished(base_cfg):
        run_loop(base_cfg)
    base_policy = base_cfg.run_dir / "round_000" / "policy"

    run_dirs, notes = [], []
    for p in paths:
        cfg = load_config(p, args.set + [f"policy.pretrained={base_policy}"])
        t0 = time.time()
        share_round0(base_cfg.run_dir, cfg.run_dir)
        if finished(cfg):
            log.info("%s: finished earlier, skipped", cfg.name)
            notes.append(f"- `{Path(p).name}` ({cfg.train.method}): {round_seconds(cfg):.0f} s in rounds >= 1 "
                         "(finished by an earlier invocation)")
        else:
            try:
                run_loop(cfg)
                notes.append(f"- `{Path(p).name}` ({cfg.train.method}): {round_seconds(cfg):.0f} s in rounds >= 1, "
                             f"{time.time() - t0:.0f} s wall")
            except Exception as e:  # one broken method must not cost the whole table; the note says why
                log.exception("%s failed", cfg.name)
                notes.append(f"- `{Path(p).name}` ({cfg.train.method}): FAILED: {type(e).__name__}: {e}")
        if (cfg.run_dir / "metrics.jsonl").exists():
            run_dirs.append(cfg.run_dir)
        write_table(args, run_dirs, notes, time.time() - t_all, pending=len(paths) - len(notes))


def write_table(args, run_dirs: list[Path], notes: list[str], total: float, pending: int) -> None:
    """The comparison so far (rewritten after every run, so a cut-short invocation still leaves a table)."""
    if not run_dirs:
        return
    df = compare_runs(run_dirs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    md = ["# Ablation: preference methods and pair strategies", "",
          f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/ablations.py "
          f"{' '.join(sys.argv[1:])}`; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, wall {total / 60:.1f} min for this "
          "invocation. Every run starts from the same round-0 policy and its evaluation (`abl_base`, copied); configs in "
          "`configs/ablations/`. WER: pocketsphinx corpus WER on the 6-utterance test subset; SIM: resemblyzer "
          "cosine to a real recording of the target speaker; `*_lo`/`*_hi`: bootstrap 95% CI, `*_p_r0`: paired "
          "bootstrap p-value against round 0. At this scale (CI-size corpus and base model, 6 test utterances, "
          "a few steps per round) the base policy babbles (WER > 1) and most differences are within noise: the "
          "table shows that every method runs end to end, round by round, and what it costs; read a method's "
          "effect only where its p-value says so.", "",
          "`dpo_loss` is each method's training loss (DPO, SFT, reward-model or GRPO loss, see `method`); "
          "`reward_accuracy`/`reward_margin`: DPO implicit-reward or reward-model pair accuracy/margin.", "",
          to_markdown(df), "", "Runs:", *notes] + ([f"- {pending} config(s) not run yet"] if pending else []) + [""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
