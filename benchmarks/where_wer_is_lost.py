"""Where a policy loses intelligibility: codec, renderer, or the AR model on seen vs unseen texts.

    python benchmarks/where_wer_is_lost.py --run runs/tiny [--round 0] [--n 32]

Scores pocketsphinx corpus WER (and resemblyzer SIM to the real recording) of ``--n`` training and
``--n`` test utterances of a finished run, each rendered six ways, so the gap between two rows
is what one component costs:

1. ``raw``: the recording itself;
2. ``codec``: its golden tokens decoded (all levels) - what the codec costs;
3. ``rvq1_only``: the golden RVQ-1 alone (``codec.semantic_latent`` decoded) - what the first level keeps;
4. ``golden_rvq1_rendered``: the golden RVQ-1 through the policy's renderer (NAR or flow) - the renderer's cost;
5. ``ar_rendered``: the round's AR sample for the text (eval temperature/top-k) through the renderer;
6. ``ar_rvq1_only``: that sample's RVQ-1 alone.
Train vs test tells memorisation from generalisation. Writes ``benchmarks/results/where_wer_is_lost.{md,json}``.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def main() -> None:
    from models.audio import load_audio, resample
    from align.config import load_config
    from align.run import Context
    from align.stages import round_subset
    from eval.asr import PocketSphinxASR
    from eval.evaluate import score_wavs
    from eval.speaker import ResemblyzerSpeaker
    from models.codec_lm import Policy
    from models.rundir import RunLayout

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--n", type=int, default=32, help="utterances per split")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "where_wer_is_lost"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    ctx = Context(cfg, None)
    codec = ctx.codec
    policy = Policy.load(RunLayout(run).policy_dir(args.round))
    asr, spk = PocketSphinxASR(), ResemblyzerSpeaker()
    sr = codec.sample_rate
    e = cfg.eval
    results, t0 = {}, time.time()
    for split, pool in (("train", ctx.splits.train), ("test", ctx.splits.test)):
        utts = round_subset(pool, args.n, cfg.seed + 3)
        prompts = [ctx.codes(ctx.prompt_for(u, pool)) for u in utts]
        golden = [ctx.codes(u) for u in utts]
        samples = [s[0] for s in policy.generate([u.text for u in utts], prompts, n=1, temperature=e.temperature,
                                                  top_k=e.top_k, top_p=e.top_p, seed=cfg.seed + 7)]
        refs = [load_audio(u.audio, sr, cfg.data.max_seconds) for u in utts]
        ways = {
            "raw": refs,
            "codec": [codec.decode(c) for c in golden],
            "rvq1_only": [codec.decode_latent(codec.semantic_latent(c[:1])) for c in golden],
            "golden_rvq1_rendered": [policy.render(c[0], p) for c, p in zip(golden, prompts)],
            "ar_rendered": [policy.render(s, p) for s, p in zip(samples, prompts)],  # empty stays empty
            "ar_rvq1_only": [codec.decode_latent(codec.semantic_latent(s[None])) if s.numel()
                             else np.zeros(0, np.float32) for s in samples],
        }
        texts = [u.text for u in utts]
        spk_refs = [resample(r, sr, spk.sample_rate) for r in refs]
        for name, wavs in ways.items():
            results.setdefault(name, {})[split] = score_wavs(wavs, sr, texts, spk_refs, asr=asr, speaker=spk)[0]
            log.info("%s %s: %s", split, name, results[name][split])
        results.setdefault("_frames", {})[split] = {
            "golden_mean": round(float(np.mean([c.shape[1] for c in golden])), 1),
            "ar_mean": round(float(np.mean([s.numel() for s in samples])), 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"run": str(run), "round": args.round, "n_per_split": args.n, "seconds": round(time.time() - t0, 1),
            "policy": dataclasses.asdict(cfg.policy)}
    out.with_suffix(".json").write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
    md = ["# Where WER is lost", "",
          f"`python benchmarks/where_wer_is_lost.py --run {args.run} --round {args.round} --n {args.n}` "
          f"({meta['seconds']:.0f} s): {args.n} training and {args.n} test utterances of `{run.name}`, round "
          f"{args.round}'s policy; pocketsphinx corpus WER and resemblyzer SIM to the real recording. The gap between "
          "two rows is what one component costs (see the script's docstring).", "",
          "| rendering | WER train | WER test | SIM train | SIM test |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if not name.startswith("_"):
            md.append(f"| {name} | {r['train']['wer']} | {r['test']['wer']} | {r['train']['sim']} | {r['test']['sim']} |")
    f = results["_frames"]
    md += ["", f"Mean frames, golden vs AR sample: train {f['train']['golden_mean']} vs {f['train']['ar_mean']}, "
           f"test {f['test']['golden_mean']} vs {f['test']['ar_mean']}.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
