"""Do the rounds' changes to the AR policy reach the audio? Every round's policy through two renderers, on dev.

    python benchmarks/rounds_by_renderer.py --run runs/tiny [--rates 0 0.5] [--split dev]

The phone renderer trained with half its RVQ-1 codes random (``base.renderer_code_noise: 0.5``, the main
job's default) takes the content from the phones where the codes disagree. DPO changes the AR policy's
codes and durations; the renderer takes no part in sampling, pairing or DPO. So a round that improves the
codes may show under a renderer that reads them (rate 0) and not under one that learnt to distrust them.
For each round of a finished run this script puts that round's AR policy in front of the run's own renderer
and in front of the renderer retrained at each other rate (``benchmarks/renderer_noise.renderer_for``: the
base stage's examples, steps and seed; kept under ``<run>/renderer_noise/``, so the renderer_noise
benchmark's renderers are reused), and scores every utterance of the split with the loop's own evaluation
(``benchmarks/eval_decoding.score_setting``: the run's eval temperature, top-k and seed, so both renderers
see the same AR samples). Tests: each round vs round 0 under each renderer, paired sign-flip on
per-utterance error counts (same utterances), Holm over the table. Dev by default: this is a diagnosis
that chooses nothing.

Writes ``benchmarks/results/rounds_by_renderer.{md,json}``.
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


def main() -> None:
    from align.run import Context
    from align.stages import eval_items
    from benchmarks.eval_decoding import add_holm, compare, delta_cells, score_setting
    from benchmarks.renderer_noise import phone_run_config, renderers_at
    from models.codec_lm import Policy
    from models.rundir import RunLayout

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--split", choices=("dev", "test"), default="dev")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rounds_by_renderer"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    run = Path(args.run)
    cfg = phone_run_config(run)
    layout = RunLayout(run)
    rounds = [r for r in range(cfg.rounds + 1) if layout.policy_dir(r).exists()]
    if rounds[:1] != [0] or len(rounds) < 2:
        raise SystemExit(f"{run}: needs round 0 and at least one later round's policy; found rounds {rounds}")
    ctx = Context(cfg, None)
    own = cfg.base.renderer_code_noise
    rates = sorted(set(args.rates) | {own})
    t0 = time.time()
    renderers = renderers_at(ctx, run, rates, Policy.load(layout.policy_dir(0)).renderer)
    train_s = time.time() - t0

    items = eval_items(ctx, getattr(ctx.splits, args.split))  # every utterance: eval.max_utterances=0
    scores: dict[tuple[int, float], dict] = {}
    for rnd in rounds:
        policy = Policy.load(layout.policy_dir(rnd))
        for rate in rates:
            policy.renderer = renderers[rate]
            scores[rnd, rate] = s = score_setting(ctx, policy, items, cfg.eval.temperature, cfg.eval.top_k)
            log.info("%s round %d, renderer noise %g: WER %.4f SIM %.4f", args.split, rnd, rate, s["wer"], s["sim"])
    tests = add_holm({(rnd, rate): compare(scores[0, rate], scores[rnd, rate]) for rate in rates for rnd in rounds[1:]})

    rel = os.path.relpath(run.resolve(), ROOT.resolve())
    result = {"run": rel, "split": args.split, "rates": rates, "own_rate": own, "rounds": rounds,
              "train_seconds": round(train_s, 1), "seconds": round(time.time() - t0, 1),
              "scores": {f"round {r} noise {q:g}": v for (r, q), v in scores.items()},
              "tests": {f"round {r} vs 0 noise {q:g}": v for (r, q), v in tests.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    n = len(items)
    md = ["# The rounds' policies through renderers that trust their codes more or less", "",
          f"`python benchmarks/rounds_by_renderer.py --run {rel} --rates {' '.join(f'{r:g}' for r in args.rates)} "
          f"--split {args.split}` ({result['seconds']:.0f} s, of which renderer training or loading {train_s:.0f} s). "
          f"Each round's AR policy of `{run.name}` in front of the phone renderer trained with "
          f"`base.renderer_code_noise` at each rate (at the run's own, {own:g}, its own renderer; the others "
          f"retrained with the base stage's examples, {cfg.base.nar_steps} steps), all {n} {args.split} utterances, "
          f"eval temperature {cfg.eval.temperature:g}, top-k {cfg.eval.top_k}: both renderers render the same AR "
          "samples. Pocketsphinx corpus WER, resemblyzer SIM. Tests: each round vs round 0 under the same renderer, "
          "paired sign-flip on per-utterance error counts, Holm over the table.", "",
          "| renderer code noise | round | WER | SIM | WER delta vs round 0 [95% CI] | p | p Holm | n | SIM delta (p) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        for rnd in rounds:
            s, c = scores[rnd, rate], tests.get((rnd, rate))
            cells = f"{delta_cells(c)} | {c['sim_delta']:+.4f} ({c['sim_p']:.3g})" if c else "| | | |"
            md.append(f"| {rate:g}{' (own)' if rate == own else ''} | {rnd} | {s['wer']} | {s['sim']} | {cells} |")
    md += ["", f"Tests: {next(iter(tests.values()))['test']}.", ""]
    Path(f"{out}.md").write_text("\n".join(md))
    log.info("wrote %s.md", out)


if __name__ == "__main__":
    main()
