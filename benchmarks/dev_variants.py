"""Round settings that might make the rounds help, tried on dev from the main job's round-0 policy.

    python benchmarks/dev_variants.py --run runs/tiny [--only NAME ...] [--root runs/dev_variants]

``efficacy.md`` found the main job's DPO rounds do not lower test WER on the current default. Each variant
below runs the main job's rounds (``rounds`` of the run's config) from the run's own round-0 policy
(``policy.pretrained``) with a few settings changed; then the run's round-0 policy, its own last round
(the default rounds) and each variant's last round score every dev utterance through the loop's own
evaluation (``benchmarks/eval_decoding.score_setting``: the run's eval temperature, top-k and seed). Tests:
paired sign-flip on per-utterance error counts, each last round vs round 0 and each variant vs the default's
last round, Holm over the table. Only dev is read here, so a winner can be chosen; report it on test
elsewhere (efficacy.py with ``--set``). The variants' own loop evaluations (test split, 8 utterances, to
keep them cheap) are not read.

Variants (the levers issue 12 names):
- ``rpo``: an SFT term on the chosen (golden) side, ``dpo.sft_weight=1`` (RPO).
- ``ranked``: pairs ranked on the rendered audio, as NeMo's Magpie-TTS does: 4 samples per prompt at
  temperatures 0.7 / 1.0 / 1.3 / 1.0, best vs worst on the Pareto front of (WER, SIM), chosen WER at most
  0.5, 120 prompts per round. These pairs see what the renderer makes of the codes, which golden-vs-
  synthetic pairs do not.

Writes ``benchmarks/results/dev_variants.{md,json}``; finished variant runs are read, not rerun.
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

import torch  # noqa: E402

log = logging.getLogger("speechalign.bench")

VARIANTS: dict[str, list[str]] = {
    "rpo": ["dpo.sft_weight=1.0"],
    "ranked": ["pair.strategy=ranked_samples", "sample.n=4", "sample.temperatures=[0.7, 1.0, 1.3, 1.0]",
               "sample.prompts_per_round=120", "pair.rank_by=pareto", "pair.scorers=[wer, sim]"],
}


def main() -> None:
    from align.config import load_config
    from align.loop import run_loop
    from align.run import Context
    from align.stages import eval_items
    from benchmarks.eval_decoding import add_holm, compare, delta_cells, score_setting
    from models.codec_lm import Policy
    from models.rundir import RunLayout

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    parser.add_argument("--root", default=str(ROOT / "runs" / "dev_variants"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dev_variants"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    run = Path(args.run)
    layout = RunLayout(run)
    cfg = load_config(run / "config.yaml", ["eval.max_utterances=0"])
    last = cfg.rounds
    if not layout.policy_dir(last).exists():
        raise SystemExit(f"{run}: round {last}'s policy is missing; finish the run first")
    t0 = time.time()
    dirs = {"round 0": layout.policy_dir(0), f"default round {last}": layout.policy_dir(last)}
    for name in args.only:
        vcfg = load_config(run / "config.yaml", [f"name=dv_{name}", f"out_dir={args.root}", "eval.max_utterances=8",
                                                  f"policy.pretrained={layout.policy_dir(0)}", *VARIANTS[name]])
        dirs[f"{name} round {last}"] = RunLayout(run_loop(vcfg)).policy_dir(last)
    train_s = time.time() - t0

    ctx = Context(cfg, None)
    items = eval_items(ctx, ctx.splits.dev)  # every dev utterance: eval.max_utterances=0
    scores = {}
    for label, path in dirs.items():
        scores[label] = s = score_setting(ctx, Policy.load(path), items, cfg.eval.temperature, cfg.eval.top_k)
        log.info("dev %s: WER %.4f SIM %.4f", label, s["wer"], s["sim"])
    default = f"default round {last}"
    pairs = [(label, "round 0") for label in dirs if label != "round 0"]
    pairs += [(f"{name} round {last}", default) for name in args.only]
    tests = add_holm({(b, a): compare(scores[a], scores[b]) for b, a in pairs})

    rel = os.path.relpath(run.resolve(), ROOT.resolve())
    result = {"run": rel, "variants": {n: VARIANTS[n] for n in args.only}, "rounds": last,
              "seconds": round(time.time() - t0, 1), "run_seconds": round(train_s, 1), "n_dev": len(items),
              "scores": scores, "tests": {f"{b} vs {a}": v for (b, a), v in tests.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Round settings tried on dev", "",
          f"`python benchmarks/dev_variants.py --run {rel} --only {' '.join(args.only)}` ({result['seconds'] / 60:.0f} "
          f"min, of which the variants' runs {train_s / 60:.0f} min; a finished run is read, not rerun). Every variant "
          f"runs {last} rounds of `{run.name}`'s config from its round-0 policy; all {len(items)} dev utterances "
          f"through the loop's evaluation (temperature {cfg.eval.temperature:g}, top-k {cfg.eval.top_k}). "
          "Pocketsphinx corpus WER, resemblyzer SIM.", "",
          "| variant | overrides |", "|---|---|"]
    md += [f"| {n} | `{' '.join(VARIANTS[n])}` |" for n in args.only]
    md += ["", "| policy | WER dev | SIM dev |", "|---|---|---|"]
    md += [f"| {label} | {s['wer']} | {s['sim']} |" for label, s in scores.items()]
    md += ["", "| comparison | WER delta [95% CI] | p | p Holm | n | SIM delta (p) |", "|---|---|---|---|---|---|"]
    md += [f"| {b} vs {a} | {delta_cells(c)} | {c['sim_delta']:+.4f} ({c['sim_p']:.3g}) |"
           for (b, a), c in tests.items()]
    md += ["", f"Tests: {next(iter(tests.values()))['test']}, Holm over the table.", ""]
    Path(f"{out}.md").write_text("\n".join(md))
    log.info("wrote %s.md", out)


if __name__ == "__main__":
    main()
