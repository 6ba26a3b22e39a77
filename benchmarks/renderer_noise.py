"""Renderer code noise, chosen on dev: how much of the phone renderer's training RVQ-1 to randomise.

    python benchmarks/renderer_noise.py --run runs/tiny [--rates 0 0.15 0.3 0.5] [--report-test]

The phone renderer learns from golden RVQ-1 but renders the AR policy's samples, whose codes are wrong
where golden ones are right (where_wer_is_lost.md: the AR's samples cost ~0.18 WER over golden RVQ-1
through the same renderer). ``base.renderer_code_noise`` replaces that fraction of its training codes by
random ones (``models.renderer.corrupt_codes``). For each rate other than the run's own this script
trains the renderer of a finished run the base stage's way (``align.training.train_renderer``: the same
examples, steps, batch, learning rate and seed; only its shuffle starts from ``random.Random(seed)``
instead of where the AR's training left the base stage's generator); at the run's own rate it takes the
run's renderer. Each goes behind the run's round-0 AR policy and scores all dev utterances with the loop's
own evaluation (``benchmarks/eval_decoding.score_setting`` at the run's eval temperature / top-k and seed). The AR's
samples are the same for every rate (the renderer does not take part in sampling), so the tests pair
the same codes rendered by different renderers: sign-flip on per-utterance error counts vs rate 0,
Holm over the table. The lowest dev WER is the choice; ``--report-test`` scores rate 0 and the choice
once on the test split, to report (never to choose).

Trained renderers are kept under ``<run>/renderer_noise/`` so a rerun only re-scores.
Writes ``benchmarks/results/renderer_noise.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("speechalign.bench")


def renderer_for(ctx, rate: float, cache: Path, examples, streams):
    """The run's phone renderer retrained with code noise ``rate`` (loaded from ``cache`` when there)."""
    import dataclasses

    from align.training import train_renderer
    from models.renderer import PhoneRenderer

    path = cache / f"rate_{rate:g}"
    if (path / "renderer.json").exists():
        log.info("rate %g: the renderer trained before, from %s", rate, path)
        return PhoneRenderer.load(path)
    cfg = ctx.cfg
    ctx.cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, renderer_code_noise=rate))
    try:
        model, loss = train_renderer(ctx, examples, random.Random(cfg.seed), size=cfg.policy.renderer_size,
                                     steps=cfg.base.nar_steps, batch_size=cfg.base.nar_batch_size, lr=cfg.base.nar_lr,
                                     seed=cfg.seed + 1, streams=streams, name=f"renderer noise {rate:g}")
    finally:
        ctx.cfg = cfg
    log.info("rate %g: final L1 %.4f", rate, loss)
    model = model.cpu().eval()
    model.save(path)
    return model


def phone_run_config(run: Path):
    """A finished run's config with every utterance evaluated; refuses a run without the phone renderer."""
    from align.config import load_config

    cfg = load_config(run / "config.yaml", ["eval.max_utterances=0"])
    if cfg.policy.renderer != "phones":
        raise SystemExit(f"{run}: policy.renderer={cfg.policy.renderer!r}; this benchmark retrains the phone renderer")
    return cfg


def renderers_at(ctx, run: Path, rates: list[float], own_renderer) -> dict:
    """The phone renderer at each code-noise rate: ``own_renderer`` (the run's) at the run's own rate, the
    others retrained the base stage's way or read from ``<run>/renderer_noise/`` (``renderer_for``)."""
    from align.training import golden_examples, golden_streams, policy_format

    own = ctx.cfg.base.renderer_code_noise
    if all(r == own for r in rates):
        return {r: own_renderer for r in rates}
    examples = golden_examples(ctx, 0)  # the base stage's salt
    streams = golden_streams(ctx, policy_format(ctx))
    return {r: own_renderer if r == own else renderer_for(ctx, r, run / "renderer_noise", examples, streams)
            for r in rates}


def main() -> None:
    from align.run import Context
    from align.stages import eval_items
    from benchmarks.eval_decoding import add_holm, compare, delta_cells, score_setting, test_section
    from models.codec_lm import Policy
    from models.rundir import RunLayout

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.15, 0.3, 0.5])
    parser.add_argument("--report-test", action="store_true",
                        help="also score rate 0 and the dev-chosen rate on the test split")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "renderer_noise"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    run = Path(args.run)
    cfg = phone_run_config(run)
    rates = sorted(set([0.0, *args.rates]))
    ctx = Context(cfg, None)
    policy = Policy.load(RunLayout(run).policy_dir(0))
    t0 = time.time()
    own = cfg.base.renderer_code_noise
    cached = [r for r in rates if r != own and (run / "renderer_noise" / f"rate_{r:g}" / "renderer.json").exists()]
    renderers = renderers_at(ctx, run, rates, policy.renderer)
    train_s = time.time() - t0

    def score(split: str, chosen: list[float]) -> dict:
        items = eval_items(ctx, getattr(ctx.splits, split))  # every utterance: eval.max_utterances=0
        out = {}
        for r in chosen:
            policy.renderer = renderers[r]
            out[r] = score_setting(ctx, policy, items, cfg.eval.temperature, cfg.eval.top_k)
            log.info("%s rate %g: WER %.4f SIM %.4f", split, r, out[r]["wer"], out[r]["sim"])
        return out

    dev = score("dev", rates)
    tests = add_holm({r: compare(dev[0.0], dev[r]) for r in rates if r != 0.0})
    chosen = min(rates, key=lambda r: (dev[r]["wer"], r))
    test = score("test", sorted({0.0, chosen})) if args.report_test else {}
    test_cmp = compare(test[0.0], test[chosen]) if test and chosen != 0.0 else None

    result = {"run": os.path.relpath(run.resolve(), ROOT.resolve()), "rates": rates, "chosen": chosen, "cached": cached,
              "train_seconds": round(train_s, 1), "seconds": round(time.time() - t0, 1),
              "dev": {f"{r:g}": v for r, v in dev.items()}, "dev_tests": {f"{r:g}": v for r, v in tests.items()},
              "test": {f"{r:g}": v for r, v in test.items()}, "test_chosen_vs_0": test_cmp}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    cached_note = (f"; the renderers of rates {', '.join(f'{r:g}' for r in cached)} trained by an earlier invocation "
                   f"and read from `{Path(result['run']) / 'renderer_noise'}`" if cached else "")
    md = ["# Renderer code noise, chosen on dev", "",
          f"`python benchmarks/renderer_noise.py --run {result['run']} --rates {' '.join(f'{r:g}' for r in args.rates)}"
          f"{' --report-test' if args.report_test else ''}` ({result['seconds']:.0f} s, of which training "
          f"{train_s:.0f} s{cached_note}): the phone renderer of `{run.name}` retrained at each `base.renderer_code_noise` "
          f"({cfg.base.nar_steps} steps, seed {cfg.seed + 1}; at the run's own rate, {own:g}, its own renderer), "
          f"behind the same round-0 AR policy, on all "
          f"{len(ctx.splits.dev)} dev utterances (eval temperature {cfg.eval.temperature:g}, top-k {cfg.eval.top_k}); "
          "pocketsphinx corpus WER, resemblyzer SIM. Tests: paired sign-flip on per-utterance error counts vs "
          "rate 0 (the same AR samples through both renderers), Holm over the table.", "",
          "| code noise | WER dev | SIM dev | WER delta vs 0 [95% CI] | p | p Holm | n | SIM delta (p) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rates:
        d, c = dev[r], tests.get(r)
        cmp = f"{delta_cells(c)} | {c['sim_delta']:+.4f} ({c['sim_p']:.3g})" if c else "| | | |"
        md.append(f"| {r:g} | {d['wer']} | {d['sim']} | {cmp} |")
    md += ["", f"Lowest dev WER: **{chosen:g}**.", ""]
    if test:
        md += test_section("code noise", len(ctx.splits.test), {f"{r:g}": v for r, v in test.items()}, test_cmp, "0")
    Path(f"{out}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
