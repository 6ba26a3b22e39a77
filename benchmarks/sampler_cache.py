"""The sampler's key/value cache: transformers' DynamicCache (a torch.cat of the whole cache at every step) against
models/kv_cache.GrowingCache (in-place appends into a buffer that doubles), on the CI round-0 policy and its corpus.

    python benchmarks/sampler_cache.py [--threads 2] [--repeats 2]

Each setting draws the same samples under both caches (same seed; the script counts the identical ones) and times
them in one process, alternating the caches so that a machine's drift falls on both; the ratio is the figure to read.
"""
from __future__ import annotations

import time

from common import ROOT, arg_parser, machine, write_results

SETTINGS = [  # (what it is, prompts per generate() call, samples per prompt)
    ("the CI sample stage (48 prompts x 4)", 48, 4),
    ("an evaluation batch (32 prompts x 1)", 32, 1),
]


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers.cache_utils import DynamicCache

    from align.config import load_config
    from align.run import Context
    from models.codec_lm import Policy
    from models.kv_cache import GrowingCache

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "ci.yaml")
    ctx = Context(cfg, None)
    policy = Policy.load(ROOT / "configs" / "ci_round0")
    train = ctx.splits.train
    generate = policy.lm.generate
    caches = {"DynamicCache": DynamicCache, "GrowingCache": GrowingCache}
    rows = []
    for what, prompts_n, n in SETTINGS:
        texts = [u.text for u in train[:prompts_n]]
        prompts = [ctx.codes(ctx.prompt_for(u, train, salt=1)) for u in train[:prompts_n]]
        seconds = {name: [] for name in caches}
        drawn = {}
        for rep in range(args.repeats):
            for name, cache in (caches.items() if rep % 2 == 0 else reversed(caches.items())):
                policy.lm.generate = lambda *a, _c=cache, **k: generate(*a, **{**k, "cache": _c()})
                t0 = time.perf_counter()
                drawn[name] = policy.generate(texts, prompts, n=n, temperature=1.0, top_k=50, batch_size=prompts_n,
                                              seed=rep)
                seconds[name].append(time.perf_counter() - t0)
            same = sum(torch.equal(a, b) for x, y in zip(drawn["DynamicCache"], drawn["GrowingCache"])
                       for a, b in zip(x, y))
        policy.lm.generate = generate
        tokens = sum(len(c) for o in drawn["GrowingCache"] for c in o)
        best = {name: min(s) for name, s in seconds.items()}
        rows.append({"setting": what, "prompts": prompts_n, "n": n, "tokens_last_repeat": tokens,
                     "identical_last_repeat": same, "samples": prompts_n * n,
                     **{f"seconds_{name}": s for name, s in seconds.items()},
                     "speedup": best["DynamicCache"] / best["GrowingCache"]})
    md = [f"# Sampler key/value cache\n\n`python benchmarks/sampler_cache.py --threads {args.threads} --repeats "
          f"{args.repeats}` on {machine()}, {args.threads} torch threads, the CI round-0 policy (configs/ci_round0) on "
          "its corpus's training texts. Seconds per generate() call, each repeat with its own seed; the speed-up is "
          "of the best repeat of each. Identical: samples of the last repeat drawn equal under both caches.\n",
          "| setting | samples | DynamicCache s | GrowingCache s | speed-up | identical samples |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['setting']} | {r['samples']} | {', '.join(f'{s:.1f}' for s in r['seconds_DynamicCache'])} | "
                  f"{', '.join(f'{s:.1f}' for s in r['seconds_GrowingCache'])} | {r['speedup']:.2f}x | "
                  f"{r['identical_last_repeat']} of {r['samples']} |")
    print(write_results("sampler_cache", "\n".join(md), {"machine": machine(), "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
