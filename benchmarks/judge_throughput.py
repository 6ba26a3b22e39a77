"""What a round's stages cost per item: sampling, judging (render, ASR, SIM, DNSMOS) and evaluation, on the main job's
round-0 policy. The judge's throughput decides how many samples a round can afford.

    python benchmarks/judge_throughput.py --policy runs/r0/round_000/policy [--n 64] [--samples 4]

Measured in one process on this machine's cores (the stages deal their batches over processes with --nproc; on 2
cores that is overhead, not speed-up: scaling.md). Also measured: the ASR pool's start-up, which a stage that judges
in batches pays once (eval.asr keeps its decoding processes).
"""
from __future__ import annotations

import time

from common import ROOT, arg_parser, machine, write_results


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--policy", default=str(ROOT / "runs" / "r0" / "round_000" / "policy"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--n", type=int, default=64, help="training texts")
    ap.add_argument("--samples", type=int, default=4, help="samples per text")
    args = ap.parse_args()

    import numpy as np
    import torch

    from align.config import load_config
    from align.run import Context
    from eval.scorers import build_scorers
    from models.audio import load_audio
    from models.codec_lm import Policy
    from models.layout import split_stream

    torch.manual_seed(0)
    cfg = load_config(args.config, [f"policy.pretrained={args.policy}"])
    ctx = Context(cfg, None)
    policy = Policy.load(args.policy)
    train = ctx.splits.train[: args.n]
    prompts = [ctx.codes(ctx.prompt_for(u, ctx.splits.train, salt=1)) for u in train]
    texts = [u.text for u in train]
    rows, t = {}, {}

    t0 = time.perf_counter()
    out = policy.generate(texts, prompts, n=args.samples, temperature=cfg.eval.temperature, top_k=cfg.eval.top_k,
                          batch_size=32, seed=0)
    t["generate"] = time.perf_counter() - t0
    streams = [s for o in out for s in o]
    pcs = [p for p in prompts for _ in range(args.samples)]
    refs_text = [x for x in texts for _ in range(args.samples)]
    n = len(streams)
    tokens = sum(len(s) for s in streams)
    rows["generate"] = {"items": n, "seconds": t["generate"], "per_second": n / t["generate"],
                        "tokens_per_second": tokens / t["generate"]}

    codec, renderer = policy.codec, policy.renderer
    t0 = time.perf_counter()
    latents = []
    for s, p in zip(streams, pcs):
        codes, units, pos = split_stream(s)
        latents.append(renderer.generate(codec.latent(policy.prompt_codes(p)), codes, units, pos))
    t["renderer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantised = [codec.quantize(lat) for lat in latents]
    t["quantise"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wavs = [codec.decode(q) for q in quantised]
    t["decode (Griffin-Lim, one at a time)"] = time.perf_counter() - t0
    seconds_audio = sum(len(w) for w in wavs) / codec.sample_rate

    scorers = build_scorers(cfg.eval, "cpu")
    t0 = time.perf_counter()
    scorers.asr.transcribe([np.zeros(16000, np.float32)] * 8)  # the decoding pool starts here, once
    t["ASR pool start-up (once)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wers, _ = scorers.wer(wavs, codec.sample_rate, refs_text)
    t["ASR (pocketsphinx)"] = time.perf_counter() - t0
    refs = [load_audio(u.audio, scorers.speaker.sample_rate, 10) for u in train for _ in range(args.samples)]
    t0 = time.perf_counter()
    scorers.sim(wavs, codec.sample_rate, refs)
    t["SIM (resemblyzer)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorers.quality_scores(wavs, codec.sample_rate)
    t["DNSMOS P.808"] = time.perf_counter() - t0
    for key in ("renderer", "quantise", "decode (Griffin-Lim, one at a time)", "ASR (pocketsphinx)",
                "SIM (resemblyzer)", "DNSMOS P.808"):
        rows[key] = {"items": n, "seconds": t[key], "per_second": n / t[key]}
    parts = ("renderer", "quantise", "decode (Griffin-Lim, one at a time)", "ASR (pocketsphinx)", "SIM (resemblyzer)")
    judge = sum(t[k] for k in parts)  # what the pair stage spends per sample (DNSMOS only when a scorer)
    rows["judge (render + ASR + SIM)"] = {"items": n, "seconds": judge, "per_second": n / judge}
    top = max(parts, key=t.get)

    md = ["# What a round's stages cost per item", "",
          f"`python benchmarks/judge_throughput.py --n {args.n} --samples {args.samples}` on {machine()}, one process "
          f"(torch threads {torch.get_num_threads()}, pocketsphinx in {scorers.asr.workers} decoding processes): the "
          f"main job's round-0 policy (`{args.policy}`) speaks {args.n} training texts x {args.samples} samples at the "
          f"evaluation decoding ({n} samples, {seconds_audio:.0f} s of audio, mean {seconds_audio / n:.2f} s), each "
          "then judged as the pair stage judges it.", "",
          "| stage | items | seconds | items/s |", "|---|---|---|---|"]
    for key, r in rows.items():
        md.append(f"| {key} | {r['items']} | {r['seconds']:.1f} | {r['per_second']:.2f} |")
    md += ["", f"Generation: {rows['generate']['tokens_per_second']:.0f} tokens/s. ASR pool start-up, paid once per "
           f"process: {t['ASR pool start-up (once)']:.1f} s.", "",
           f"At {rows['judge (render + ASR + SIM)']['per_second']:.2f} judged samples/s, a round of 64 texts x 8 samples "
           f"spends {512 / rows['judge (render + ASR + SIM)']['per_second'] / 60:.1f} min judging on this machine; "
           f"the largest part is {top} ({t[top] / judge:.0%})."]
    out = write_results("judge_throughput", "\n".join(md),
                        {"machine": machine(), "rows": rows, "args": vars(args)})
    print(out.read_text())


if __name__ == "__main__":
    main()
