"""Where a policy loses intelligibility: codec, renderer, or the AR model on seen vs unseen texts.

    python benchmarks/where_wer_is_lost.py --run runs/tiny [--round 0] [--n 32] [--split test|dev]

Scores pocketsphinx corpus WER (and resemblyzer SIM to the real recording) of ``--n`` training and
``--n`` test utterances of a finished run, each rendered six ways, so the gap between two rows
is what one component costs:

1. ``raw``: the recording itself;
2. ``codec``: its golden tokens decoded (all levels) - what the codec costs;
3. ``rvq1_only``: the golden RVQ-1 alone (``codec.semantic_latent`` decoded) - what the first level keeps;
4. ``golden_rvq1_rendered``: the golden RVQ-1 through the policy's renderer (NAR, flow, or the phone
   renderer, which also gets the golden phones of each frame) - the renderer's cost;
5. ``ar_rendered``: the round's AR sample for the text (eval temperature/top-k) through the renderer;
6. ``ar_rvq1_only``: that sample's RVQ-1 alone.
Train vs test tells memorisation from generalisation; ``--split dev`` scores the dev split instead of
the test split, for choosing settings (its results go to ``--out``, default ``..._dev``).
Writes ``benchmarks/results/where_wer_is_lost.{md,json}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

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

    parser = arg_parser(__doc__)
    parser.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--n", type=int, default=32, help="utterances per split")
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="the held-out split beside train (dev to choose settings, test to report)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" /
                               ("where_wer_is_lost" + ("_dev" if args.split == "dev" else "")))
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
    held_out = args.split
    for split, pool in (("train", ctx.splits.train), (held_out, getattr(ctx.splits, held_out))):
        utts = round_subset(pool, args.n, cfg.seed + 3)
        prompts = [ctx.codes(ctx.prompt_for(u, pool)) for u in utts]
        golden = [ctx.codes(u) for u in utts]
        streams = [ctx.golden_stream(u, policy.format) for u in utts]  # RVQ-1, with its units when interleaved
        samples = [s[0] for s in policy.generate([u.text for u in utts], prompts, n=1, temperature=e.temperature,
                                                  top_k=e.top_k, top_p=e.top_p, seed=cfg.seed + 7)]
        refs = [load_audio(u.audio, sr, cfg.data.max_seconds) for u in utts]
        ways = {
            "raw": refs,
            "codec": [codec.decode(c) for c in golden],
            "rvq1_only": [codec.decode_latent(codec.semantic_latent(c[:1])) for c in golden],
            "golden_rvq1_rendered": [policy.render(g, p) for g, p in zip(streams, prompts)],
            "ar_rendered": [policy.render(s, p) for s, p in zip(samples, prompts)],  # empty stays empty
            "ar_rvq1_only": [codec.decode_latent(codec.semantic_latent(policy.format.frames(s)[None]))
                             if policy.format.frames(s).numel() else np.zeros(0, np.float32) for s in samples],
        }
        texts = [u.text for u in utts]
        spk_refs = [resample(r, sr, spk.sample_rate) for r in refs]
        for name, wavs in ways.items():
            results.setdefault(name, {})[split] = score_wavs(wavs, sr, texts, spk_refs, asr=asr, speaker=spk)[0]
            log.info("%s %s: %s", split, name, results[name][split])
        results.setdefault("_frames", {})[split] = {
            "golden_mean": round(float(np.mean([c.shape[1] for c in golden])), 1),
            "ar_mean": round(float(np.mean([policy.format.frames(s).numel() for s in samples])), 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"run": str(run), "round": args.round, "n_per_split": args.n, "held_out": held_out,
            "seconds": round(time.time() - t0, 1),
            "policy": dataclasses.asdict(cfg.policy)}
    out.with_suffix(".json").write_text(json.dumps({"results": results, "meta": meta}, indent=1) + "\n")
    md = ["# Where WER is lost", "",
          f"`python benchmarks/where_wer_is_lost.py --run {args.run} --round {args.round} --n {args.n} "
          f"--split {held_out}` "
          f"({meta['seconds']:.0f} s): {args.n} training and {args.n} {held_out} utterances of `{run.name}`, round "
          f"{args.round}'s policy; pocketsphinx corpus WER and resemblyzer SIM to the real recording. The gap between "
          "two rows is what one component costs (see the script's docstring).", "",
          f"| rendering | WER train | WER {held_out} | SIM train | SIM {held_out} |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if not name.startswith("_"):
            md.append(f"| {name} | {r['train']['wer']} | {r[held_out]['wer']} | {r['train']['sim']} | "
                      f"{r[held_out]['sim']} |")
    f = results["_frames"]
    md += ["", f"Mean frames, golden vs AR sample: train {f['train']['golden_mean']} vs {f['train']['ar_mean']}, "
           f"{held_out} {f[held_out]['golden_mean']} vs {f[held_out]['ar_mean']}.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
