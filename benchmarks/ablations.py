"""Ablation of preference methods and pair strategies: every config in configs/ablations/, one table.

    OMP_NUM_THREADS=2 python benchmarks/ablations.py [--configs 'configs/ablations/*.yaml'] [--set key=value ...]
    python benchmarks/ablations.py --stats-only      # recompute the tables from the run directories, no training

1. One shared round-0 policy: the first config's base stage, run once as ``abl_base`` (rounds=0), so
   every method starts from the same weights and the same round-0 figures.
2. Each ablation config runs from it (``policy.pretrained``), sequentially; a finished run is skipped
   and a killed one resumes (the loop's own state.json).
3. ``ablation_stats`` (``eval.compare.build_comparison`` over the run directories, no run-vs-run tests)
   writes one round-by-round table to ``benchmarks/results/ablations.{md,csv}``: every p-value is an
   exact sign-flip test with its n, corrected over every test of the table (Holm; BH beside it).
A run that fails is recorded in the table's notes and the others still run.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from align.config import load_config  # noqa: E402
from align.loop import run_loop  # noqa: E402
from eval.compare import Comparison, build_comparison, to_markdown  # noqa: E402

log = logging.getLogger("speechalign.bench")

# Shown in the Markdown (the CSV has every column of eval.compare's table).
MD_COLUMNS = ["run", "round", "method", "wer", "wer_lo", "wer_hi", "sim", "sim_lo", "sim_hi", "dnsmos",
              "reward_accuracy", "reward_margin", "dpo_loss", "pairs", "empty_outputs", "gap_auc"]
MD_TEST_COLUMNS = ["run", "metric", "round", "vs_round", "n", "delta", "delta_lo", "delta_hi", "p", "test",
                   "p_holm", "p_bh", "better"]


def finished(cfg) -> bool:
    from models.io import read_jsonl

    path = cfg.run_dir / "metrics.jsonl"
    return path.exists() and {r["round"] for r in read_jsonl(path)} >= set(range(cfg.rounds + 1))


def round_seconds(cfg) -> float:
    """Stage seconds of rounds >= 1 (state.json): what the method cost, whichever invocation ran it."""
    done = json.loads((cfg.run_dir / "state.json").read_text())["done"]
    return sum(v["seconds"] for k, stages in done.items() if int(k) >= 1 for v in stages.values())


def share_round0(base_dir: Path, run_dir: Path) -> None:
    """Start a new run from the shared base's round 0 (policy and its evaluation), marked done.

    Round 0 of every ablation run would be the same copied policy evaluated with the same seed on the
    same items, so it is copied instead of recomputed (pocketsphinx on early-round babble is slow).
    """
    import shutil

    if run_dir.exists():
        return
    shutil.copytree(base_dir / "round_000", run_dir / "round_000")
    state = json.loads((base_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({"done": {"0": state["done"]["0"]}}, indent=2))


def ablation_stats(run_dirs: list[Path], correction: str = "holm", *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Comparison:
    """The table's statistics from finished run directories alone (no training): per-round bootstrap CIs
    and, per run and metric, the sign-flip tests of each round vs the previous one and vs round 0, with
    ``correction`` over all of them. Round 0 is the same copied evaluation in every run, so run-vs-run
    tests at a round would mostly re-test it; they are left out of the family."""
    return build_comparison(run_dirs, n_boot=n_boot, level=level, seed=seed, correction=correction,
                            between_runs=False)


def findings(cmp: Comparison) -> list[str]:
    """What the tests say after the correction, as Markdown bullets (generated from the numbers)."""
    t = cmp.tests.dropna(subset=["p"])
    c, alpha = cmp.correction, 1 - cmp.level
    if t.empty:
        return ["- No paired tests (fewer than two rounds evaluated)."]
    n_min, n_max = int(t["n"].min()), int(t["n"].max())
    floor = 2 / 2 ** n_max
    lines = [f"- {len(t)} paired tests (runs x metrics x round 1 vs 0, round 2 vs 1, round 2 vs 0) on "
             f"{n_min}{'' if n_min == n_max else f'-{n_max}'} paired utterances each. With n = {n_max} pairs no test "
             f"can give p below 2/2^{n_max} = {floor:.4f} (every utterance moving the same way), and Holm multiplies "
             f"the smallest p of the table by m = {len(t)}: a test at that floor reads p_holm = "
             f"{min(1.0, len(t) * floor):.3g}."]
    survivors = t[t[f"p_{c}"] < alpha]
    if survivors.empty:
        lines.append(f"- **No change survives the correction** (every p_{c} >= {alpha:.2f}; smallest "
                     f"{t[f'p_{c}'].min():.3g}); BH (false discovery rate) also leaves "
                     f"{int((t['p_bh'] < alpha).sum())} of {len(t)}. The table shows that every method runs end to "
                     "end and what it costs; it cannot rank methods at this scale.")
    else:
        for r in survivors.itertuples(index=False):
            lines.append(f"- Survives {c}: `{r.run}` {r.metric} round {r.round} vs {r.vs_round}: delta {r.delta:+.4f} "
                         f"(CI {r.delta_lo:+.4f}..{r.delta_hi:+.4f}), n = {r.n}, p = {r.p:.4g} ({r.test}), "
                         f"p_{c} = {getattr(r, f'p_{c}'):.4g}.")
    sft = t[(t["run"] == "abl_sft_control") & (t["metric"] == "sim") & (t["round"] == 2) & (t["vs_round"] == 0)]
    for r in sft.itertuples(index=False):  # the claim earlier versions of this table made (HISTORY)
        lines.append(f"- The continue-SFT control's SIM, round 2 vs 0: delta {r.delta:+.4f} (CI {r.delta_lo:+.4f}.."
                     f"{r.delta_hi:+.4f}), n = {r.n}, p = {r.p:.4g} ({r.test}), p_{c} = {getattr(r, f'p_{c}'):.3g}: "
                     + ("it survives the correction." if getattr(r, f"p_{c}") < alpha else
                        "it does not survive the correction, so the earlier \"significant loss of speaker "
                        "similarity\" is withdrawn."))
    raw = t[t["p"] < alpha].sort_values("p")
    if len(raw):
        lines.append(f"- Before the correction {len(raw)} of {len(t)} tests read p < {alpha:.2f} (at most "
                     f"about {alpha * len(t):.1f} would by chance alone if nothing changed): "
                     + "; ".join(f"`{r.run}` {r.metric} r{r.round} vs r{r.vs_round} {r.delta:+.3f} "
                                 f"(n = {r.n}, p = {r.p:.4g}, p_{c} = {getattr(r, f'p_{c}'):.3g})"
                                 for r in raw.itertuples(index=False)) + ".")
    else:
        lines.append(f"- Before the correction no test reads p < {alpha:.2f} either.")
    return lines


# Measured by earlier invocations whose run directories were since replaced; kept as a record, not recomputed.
HISTORY = [
    "- Earlier versions of this table reported percentile-bootstrap \"p-values\" with no correction, e.g. "
    "p = 0.001 for the continue-SFT control's SIM at round 2 vs round 0 (0.545 -> 0.526, read then as a significant "
    "loss of speaker similarity): every bootstrap resample had the same sign. On 6 pairs no test can give less "
    "than 2/64 = 0.031.",
    "- Before the Best-of-N length guard (`train.best_of_n_length_band`, 0.5-2x the text's expected length), an "
    "earlier invocation saw `reward_bon` collapse in round 2: the reward model, trained on golden-vs-babble pairs, "
    "preferred short samples, the reranked outputs averaged 0.25 s (the test sentences are ~2.5 s), 4 of 6 were "
    "silent and SIM read 0.206 (round 0: 0.545). That is a record of a failure mode seen in the outputs, not a "
    "tested effect (its bootstrap p = 0.009 is below what 6 pairs allow); the guarded rerun is in the table.",
]


def write_results(out: Path, cmp: Comparison, notes: list[str], header: str, pending: int = 0) -> None:
    """``<out>.csv`` (eval.compare's per-round table: every p with its n, test and corrected p) and
    ``<out>.md`` (metrics, every paired test, generated findings)."""
    from models.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".csv"), cmp.table.to_csv(index=False))
    table = cmp.table[[c for c in MD_COLUMNS if c in cmp.table.columns]]
    tests = cmp.tests[[c for c in MD_TEST_COLUMNS if c in cmp.tests.columns]].sort_values(["run", "metric", "round",
                                                                                            "vs_round"])
    c = cmp.correction
    md = ["# Ablation: preference methods and pair strategies", "", header, "",
          "`dpo_loss` is each method's training loss (DPO, SFT, reward-model or GRPO loss, see `method`); "
          "`reward_accuracy`/`reward_margin`: DPO implicit-reward or reward-model pair accuracy/margin. "
          f"`*_lo`/`*_hi`: {cmp.level:.0%} percentile bootstrap CI over the utterances ({cmp.n_boot} resamples).", "",
          to_markdown(table), "",
          "## Paired tests", "",
          "Each round of each run vs the previous round and vs round 0 (round 1: one test for both), paired on "
          "utterance id. p: two-sided sign-flip permutation test, exact over all 2^k sign patterns of the k utterances "
          "whose score changed (wer: per-utterance edit-error counts, whose sum over the reference words is the "
          "corpus-WER delta; sim, dnsmos: per-utterance values). "
          f"p_holm: Holm (family-wise error) and p_bh: Benjamini-Hochberg (false discovery rate), each over all "
          f"{len(cmp.tests)} tests of this table; better: p_{c} < {1 - cmp.level:.2f} in the good (True) or bad "
          "(False) direction. The CSV holds the same p, n and p_holm per round (`wer_p_r0`, `wer_n_r0`, "
          "`wer_p_r0_holm`, ...).", "",
          to_markdown(tests), "",
          f"## Findings ({'Holm' if c == 'holm' else 'Benjamini-Hochberg'} over the whole table)", "",
          *findings(cmp), *HISTORY, "",
          "Runs:", *notes] + ([f"- {pending} config(s) not run yet"] if pending else []) + [""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))


def header(args, total: float | None) -> str:
    wall = (f"wall {total / 60:.1f} min for this invocation" if total is not None
            else "statistics recomputed from the existing run directories (no training in this invocation)")
    return (f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/ablations.py "
            f"{' '.join(sys.argv[1:])}`; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {wall}. "
            "Every run starts from the same round-0 policy and its evaluation (`abl_base`, copied); configs in "
            "`configs/ablations/`. WER: pocketsphinx corpus WER on the 6-utterance test subset; SIM: resemblyzer "
            "cosine to a real recording of the target speaker. At this scale (CI-size corpus and base model, 6 test "
            "utterances, a few steps per round) the base policy babbles (WER > 1).")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=str(ROOT / "configs" / "ablations" / "*.yaml"))
    parser.add_argument("--set", action="append", default=[], help="override for every run, e.g. out_dir=runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablations"))
    parser.add_argument("--stats-only", action="store_true",
                        help="recompute the tables from the runs' directories without training anything")
    parser.add_argument("--correction", choices=["holm", "bh"], default="holm",
                        help="multiple-testing correction over every test of the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)

    # the SpeechAlign recipe and its continue-SFT control first: the comparison that matters most if time runs out
    first = {"dpo_sigmoid.yaml": 0, "sft_control.yaml": 1}
    paths = sorted(glob.glob(args.configs), key=lambda p: (first.get(Path(p).name, 2), p))
    if not paths:
        raise SystemExit(f"no configs match {args.configs}")
    t_all = time.time()
    base_cfg = load_config(paths[0], args.set + ["name=abl_base", "rounds=0"])
    if not args.stats_only and not finished(base_cfg):
        run_loop(base_cfg)
    base_policy = base_cfg.run_dir / "round_000" / "policy"

    run_dirs, notes = [], []
    for p in paths:
        cfg = load_config(p, args.set + [f"policy.pretrained={base_policy}"])
        if args.stats_only:
            if finished(cfg):
                run_dirs.append(cfg.run_dir)
                notes.append(f"- `{Path(p).name}` ({cfg.train.method}): {round_seconds(cfg):.0f} s in rounds >= 1")
            else:
                notes.append(f"- `{Path(p).name}` ({cfg.train.method}): no finished run in {cfg.run_dir}; left out")
            continue
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
        # rewritten after every run, so a cut-short invocation still leaves a table
        write_results(out, ablation_stats(run_dirs, args.correction), notes, header(args, time.time() - t_all),
                      pending=len(paths) - len(notes))
    if args.stats_only:
        if not run_dirs:
            raise SystemExit(f"no finished ablation runs under {base_cfg.run_dir.parent}; run without --stats-only")
        write_results(out, ablation_stats(run_dirs, args.correction), notes, header(args, None))


if __name__ == "__main__":
    main()
