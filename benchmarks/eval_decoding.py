"""How the policy decodes at evaluation: WER and SIM of one round's policy per (temperature, top-k), chosen on dev.

    python benchmarks/eval_decoding.py --run runs/tiny [--round 0] [--settings 0.8:50 0.5:50 ...] [--report-test]

Every dev utterance of a finished run is spoken by round ``--round``'s policy under each (temperature, top-k)
setting and scored by the loop's own evaluation (``align.stages.eval_items`` prompts, ``evaluate_policy`` with
the run's judges and seed: pocketsphinx corpus WER, resemblyzer SIM). Each setting is compared with the run's
configured one (``eval.temperature`` / ``eval.top_k``) by the paired sign-flip test on utterance error
counts (exact when n is small, else Monte Carlo), Holm-corrected over the table. The setting with the
lowest dev WER is the choice; ``--report-test`` then scores the configured and the chosen setting once on
the test split, to report (never to choose). Temperature 0 is greedy decoding.

Writes ``benchmarks/results/eval_decoding.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("speechalign.bench")


def score_setting(ctx, policy, items, temperature: float, top_k: int) -> dict:
    """One decoding setting over ``items`` through the loop's own evaluation (``evaluate_policy`` with the
    run's judges and seed): corpus WER, mean SIM, and per utterance the error counts, reference words
    (``eval.table.rows_frame``), SIMs and frames."""
    from eval.evaluate import evaluate_policy
    from eval.table import rows_frame

    summary, rows = evaluate_policy(policy, items, scorers=ctx.scorers, temperature=temperature, top_k=top_k,
                                    top_p=1.0, seed=ctx.cfg.seed + 7, batch_size=ctx.cfg.eval.batch_size,
                                    max_seconds=ctx.cfg.data.max_seconds)
    df = rows_frame(rows)
    return {"wer": round(summary["wer"], 4), "sim": round(summary["sim"], 4), "errors": df["errors"].tolist(),
            "ref_words": df["ref_words"].tolist(), "sims": df["sim"].tolist(),
            "mean_frames": round(float(df["n_frames"].mean()), 1)}


def compare(base: dict, other: dict) -> dict:
    """Paired tests of ``other`` vs ``base`` on the same utterances, each metric as ``eval.stats`` tests a
    round (WER on error counts, SIM on values)."""
    import pandas as pd

    from eval.stats import metric_arrays, paired_test

    a, b = (pd.DataFrame({"errors": r["errors"], "ref_words": r["ref_words"], "sim": r["sims"]}) for r in (base, other))
    w = paired_test(*metric_arrays(a, "wer"), *metric_arrays(b, "wer"))
    s = paired_test(*metric_arrays(a, "sim"), *metric_arrays(b, "sim"))
    return {"wer_delta": round(w.delta, 4), "wer_lo": round(w.lo, 4), "wer_hi": round(w.hi, 4), "wer_p": w.p,
            "sim_delta": round(s.delta, 4), "sim_p": s.p, "n": w.n, "test": w.test}


def add_holm(tests: dict) -> dict:
    """Holm-adjust the WER p of every ``compare`` result in ``tests`` (any keys), as ``wer_p_holm``, in place."""
    from eval.stats import adjust_p

    for t, p in zip(tests.values(), adjust_p([t["wer_p"] for t in tests.values()], "holm")):
        t["wer_p_holm"] = float(p)
    return tests


def delta_cells(c: dict) -> str:
    """A ``compare`` result (with ``wer_p_holm``) as table cells: WER delta [95% CI] | p | p Holm | n."""
    return (f"{c['wer_delta']:+.4f} [{c['wer_lo']:+.4f}, {c['wer_hi']:+.4f}] | {c['wer_p']:.3g} | "
            f"{c['wer_p_holm']:.3g} | {c['n']}")


def test_section(label: str, n_test: int, test: dict, test_cmp: dict | None, versus: str) -> list[str]:
    """Markdown lines for a report-only test split: WER and SIM per ``test`` row (``score_setting`` results
    keyed by name), then ``test_cmp`` (``compare`` of the chosen row vs ``versus``) when there is one."""
    md = [f"Test split ({n_test} utterances), to report only:", "",
          f"| {label} | WER test | SIM test |", "|---|---|---|"]
    md += [f"| {name} | {r['wer']} | {r['sim']} |" for name, r in test.items()]
    if test_cmp:
        c = test_cmp
        md += ["", f"Chosen vs {versus} on test: WER {c['wer_delta']:+.4f} [{c['wer_lo']:+.4f}, {c['wer_hi']:+.4f}], "
                   f"{c['test']} p = {c['wer_p']:.3g} (n = {c['n']}); "
                   f"SIM {c['sim_delta']:+.4f} (p = {c['sim_p']:.3g})."]
    return md + [""]


def main() -> None:
    from align.config import load_config
    from align.run import Context
    from align.stages import eval_items
    from models.codec_lm import Policy
    from models.rundir import RunLayout

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=["0.8:50", "1.0:50", "0.6:50", "0.4:50", "0.6:10", "0:0"],
                        help="temperature:top_k pairs (0:0 = greedy)")
    parser.add_argument("--report-test", action="store_true",
                        help="also score the configured and the dev-chosen setting on the test split")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_decoding"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    run = Path(args.run)
    cfg = load_config(run / "config.yaml", ["eval.max_utterances=0"])
    ctx = Context(cfg, None)
    policy = Policy.load(RunLayout(run).policy_dir(args.round))
    configured = f"{cfg.eval.temperature:g}:{cfg.eval.top_k}"
    settings = list(dict.fromkeys([configured, *args.settings]))  # the configured one first, once
    t0 = time.time()

    def run_split(split: str, names: list[str]) -> dict:
        items = eval_items(ctx, getattr(ctx.splits, split))  # every utterance: eval.max_utterances=0
        out = {}
        for name in names:
            t, k = name.split(":")
            out[name] = score_setting(ctx, policy, items, float(t), int(k))
            log.info("%s %s: WER %.4f SIM %.4f", split, name, out[name]["wer"], out[name]["sim"])
        return out

    dev = run_split("dev", settings)
    tests = add_holm({name: compare(dev[configured], dev[name]) for name in settings if name != configured})
    chosen = min(settings, key=lambda name: (dev[name]["wer"], settings.index(name)))
    test = run_split("test", list(dict.fromkeys([configured, chosen]))) if args.report_test else {}
    test_cmp = compare(test[configured], test[chosen]) if test and chosen != configured else None

    result = {"run": os.path.relpath(run, ROOT), "round": args.round, "configured": configured, "chosen": chosen,
              "seconds": round(time.time() - t0, 1), "dev": dev, "dev_tests": tests, "test": test,
              "test_chosen_vs_configured": test_cmp}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    n_dev = len(ctx.splits.dev)
    md = ["# Decoding at evaluation: temperature and top-k, chosen on dev", "",
          f"`python benchmarks/eval_decoding.py --run {result['run']} --round {args.round} --settings "
          f"{' '.join(args.settings)}{' --report-test' if args.report_test else ''}` ({result['seconds']:.0f} s): "
          f"round {args.round}'s policy of `{run.name}` speaks all {n_dev} dev utterances under each setting; "
          "pocketsphinx corpus WER, resemblyzer SIM. Tests: paired sign-flip on per-utterance error counts vs the "
          f"configured setting ({configured}), Holm over the table.", "",
          "| temperature:top_k | WER dev | SIM dev | mean frames | WER delta vs configured [95% CI] | p | p Holm | n |",
          "|---|---|---|---|---|---|---|---|"]
    for name in settings:
        r = dev[name]
        cmp = delta_cells(tests[name]) if name in tests else "(configured) | | |"
        md.append(f"| {name} | {r['wer']} | {r['sim']} | {r['mean_frames']} | {cmp} |")
    md += ["", f"Lowest dev WER: **{chosen}**.", ""]
    if test:
        md += test_section("temperature:top_k", len(ctx.splits.test), test, test_cmp, "configured")
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
