"""Scaling figures: the loop at 1 and 2 processes, the DPO reference live vs precomputed, the sampler's batching.

    python benchmarks/scaling.py [--run runs/efficacy/dpo_s0] [--out benchmarks/results/scaling]

1. ``configs/ci.yaml`` end to end as 1 process x 2 threads, 1 process x 1 thread and 2 processes x 1 thread
   (``speechalign run --nproc 2``: gloo on this CPU): wall time per stage from each run's ``state.json``, and
   whether the 2-process run's metrics equal the 1 x 1 run's (same threads per process). On 2 cores this
   measures correctness and overhead, not speed-up.
2. DPO on the main job's round-1 pairs (``--run``: a finished run of configs/tiny.yaml; its round-0 policy and
   round-1 pairs), ``dpo.steps`` as configured, with the live frozen reference and with
   ``dpo.precompute_ref=true``, full weights and LoRA: median optimiser step and the whole train() call
   (which, precomputed, includes the pass that scores every pair first).
3. The sampler: that run's round-0 policy speaking 32 and 96 training texts in batches of 32 vs one at a
   time (the batch size the main job samples with); the median of 3 timed calls after one untimed warm-up.

Writes ``benchmarks/results/scaling.{md,json}``. Every figure is measured by this script on this machine;
nothing is read from elsewhere. No GPU part: this project's machines have none (see the file's header).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

log = logging.getLogger("speechalign.bench")


def loop_runs(scratch: Path) -> dict:
    """configs/ci.yaml as 1x2, 1x1 and 2x1 (processes x threads); seconds per stage and metric agreement."""
    out = {}
    common = ["--set", f"out_dir={scratch}", "--set", f"cache_dir={scratch / '_cache'}",
              "--set", f"data.corpus_dir={scratch / '_corpus'}"]
    # a first run builds the corpus and the codec cache, so no timed run pays for them
    subprocess.run([sys.executable, "-m", "align.cli", "prepare", str(ROOT / "configs" / "ci.yaml"), *common],
                   cwd=ROOT, check=True, capture_output=True)
    for name, nproc, threads in (("1x2", 1, 2), ("1x1", 1, 1), ("2x1", 2, 1)):
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "align.cli", "run", str(ROOT / "configs" / "ci.yaml"), "--nproc",
                        str(nproc), "--set", f"threads={threads}", "--set", f"name=scale_{name}", *common],
                       cwd=ROOT, check=True, capture_output=True)
        wall = time.time() - t0
        run = scratch / f"scale_{name}"
        done = json.loads((run / "state.json").read_text())["done"]
        stages: dict[str, float] = {}
        for k, by_stage in done.items():
            for stage, v in by_stage.items():
                stages[stage] = round(stages.get(stage, 0.0) + v["seconds"], 1)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out[name] = {"processes": nproc, "threads": threads, "wall_seconds": round(wall, 1), "stages": stages,
                     "wer": [m["wer"] for m in metrics], "sim": [m["sim"] for m in metrics]}
        log.info("ci.yaml %s: %.0f s %s", name, wall, stages)
    a, b = out["1x1"], out["2x1"]
    out["agreement_2x1_vs_1x1"] = {"wer_equal": a["wer"] == b["wer"],
                                   "sim_max_abs_diff": max(abs(x - y) for x, y in zip(a["sim"], b["sim"]))}
    return out


def dpo_reference(run: Path, scratch: Path) -> list[dict]:
    """DPO's round 1 on ``run``'s pairs: live reference vs precomputed, full weights and LoRA."""
    from align.config import load_config
    from align.methods import dpo
    from align.run import Context, RunDir

    import yaml

    seed = yaml.safe_load((run / "config.yaml").read_text()).get("seed", 0)
    rows = []
    for lora in (False, True):
        for pre in (False, True):
            name = f"dpo_{'lora' if lora else 'full'}_{'pre' if pre else 'live'}"
            cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"name={name}", f"out_dir={scratch}",
                                                                f"dpo.lora={str(lora).lower()}",
                                                                f"dpo.precompute_ref={str(pre).lower()}",
                                                                f"seed={seed}"])
            rd = RunDir(cfg)
            shutil.copytree(run / "round_000" / "policy", rd.policy_dir(0), dirs_exist_ok=True)
            shutil.copytree(run / "round_001" / "pairs", rd.pairs_dir(1), dirs_exist_ok=True)
            stats = dpo(Context(cfg, rd), 1)
            rows.append({"weights": "lora" if lora else "full", "reference": "precomputed" if pre else "live",
                         "steps": stats["steps"], "pairs": stats["pairs"], "batch": cfg.dpo.batch_size,
                         "step_seconds": stats["step_seconds"], "train_seconds": stats["train_seconds"],
                         "loss": round(stats["loss"], 4)})
            log.info("%s: step %.3f s, train %.1f s", name, stats["step_seconds"], stats["train_seconds"])
    for r in rows:
        live = next(x for x in rows if x["weights"] == r["weights"] and x["reference"] == "live")
        r["step_vs_live"] = round(r["step_seconds"] / live["step_seconds"], 3)
        r["train_vs_live"] = round(r["train_seconds"] / live["train_seconds"], 3)
    return rows


def sampler(run: Path, batch_size: int, repeats: int = 3) -> list[dict]:
    """Tokens per second of the round-0 policy on the first N training texts, batched vs one at a time
    (after one untimed warm-up call; the median of ``repeats`` timed calls)."""
    from align.config import load_config
    from align.run import Context
    from models.codec_lm import Policy

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["name=scaling_sampler"])
    ctx = Context(cfg, None)
    policy = Policy.load(run / "round_000" / "policy")
    train = ctx.splits.train
    rows = []
    # one untimed call first: the first generate() pays for lazy initialisation, which is neither mode's cost
    policy.generate([train[0].text], [ctx.codes(ctx.prompt_for(train[0], train, salt=1))], n=1, seed=0)
    for n in (32, 96):
        texts = [u.text for u in train[:n]]
        prompts = [ctx.codes(ctx.prompt_for(u, train, salt=1)) for u in train[:n]]
        per = {}
        for bs in (batch_size, 1):
            times = []
            for _ in range(repeats):  # the same seed each time: the same tokens, so the median is a fair clock
                t0 = time.perf_counter()
                out = policy.generate(texts, prompts, n=1, temperature=1.0, top_k=50, batch_size=bs, seed=0)
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            tokens = sum(len(s[0]) for s in out)
            per[bs] = tokens / dt
            rows.append({"prompts": n, "batch_size": bs, "seconds": round(dt, 2), "repeats": repeats,
                         "seconds_each": [round(t, 2) for t in times], "tokens": tokens,
                         "tokens_per_second": round(tokens / dt, 1)})
            log.info("sampler %d prompts, batch %d: %.0f tokens/s", n, bs, tokens / dt)
        rows.append({"prompts": n, "speedup": round(per[batch_size] / per[1], 2)})
    return rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--run", default=str(ROOT / "runs" / "efficacy" / "dpo_s0"),
                        help="a finished run of configs/tiny.yaml (round-0 policy and round-1 pairs)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    parser.add_argument("--parts", nargs="+", default=["loop", "dpo", "sampler"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run = Path(args.run)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "run": os.path.relpath(run, ROOT),
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if "loop" in args.parts:
            result["loop"] = loop_runs(Path(tmp) / "loop")
        if "dpo" in args.parts:
            result["dpo"] = dpo_reference(run, Path(tmp) / "dpo")
        if "sampler" in args.parts:
            result["sampler"] = sampler(run, 32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Scaling: processes, the DPO reference, the sampler", "",
          f"`python benchmarks/scaling.py --parts {' '.join(args.parts)}` on {result['machine']} (torch "
          f"{result['torch']}). GPU figures: none, no GPU was available to this project's sessions.", ""]
    if "loop" in result:
        lp = result["loop"]
        md += ["## configs/ci.yaml at 1 and 2 processes", "",
               "Seconds per stage, summed over rounds (state.json); processes x torch threads each.", "",
               "| run | wall s | base | sample | pair | train | evaluate | WER per round |", "|---|---|---|---|---|---|---|---|"]
        for name in ("1x2", "1x1", "2x1"):
            r = lp[name]
            st = r["stages"]
            md.append(f"| {name} | {r['wall_seconds']} | {st.get('base')} | {st.get('sample')} | {st.get('pair')} | "
                      f"{st.get('train')} | {st.get('evaluate')} | {', '.join(f'{w:.3f}' for w in r['wer'])} |")
        ag = lp["agreement_2x1_vs_1x1"]
        md += ["", f"2 x 1 vs 1 x 1: WER per round equal: {ag['wer_equal']}; SIM max |diff| "
                   f"{ag['sim_max_abs_diff']:.1e} (tests/test_multiprocess.py asserts the same codes, pairs and "
                   "transcripts).", ""]
    if "dpo" in result:
        md += ["## DPO reference: live vs precomputed (main job's round-1 pairs)", "",
               "| weights | reference | steps | pairs | batch | median step s | x live | train() s | x live | loss |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["dpo"]:
            md.append(f"| {r['weights']} | {r['reference']} | {r['steps']} | {r['pairs']} | {r['batch']} | "
                      f"{r['step_seconds']:.3f} | {r['step_vs_live']:.2f} | {r['train_seconds']:.1f} | "
                      f"{r['train_vs_live']:.2f} | {r['loss']} |")
        md.append("")
    if "sampler" in result:
        md += ["## Sampler: batched vs one at a time (round-0 policy)", "",
               "Median of 3 timed calls after one untimed warm-up call (each call's seconds in scaling.json).", "",
               "| prompts | batch | seconds | tokens | tokens/s |", "|---|---|---|---|---|"]
        for r in result["sampler"]:
            if "speedup" in r:
                md.append(f"| {r['prompts']} | speed-up | | | **{r['speedup']}x** |")
            else:
                md.append(f"| {r['prompts']} | {r['batch_size']} | {r['seconds']} | {r['tokens']} | "
                          f"{r['tokens_per_second']} |")
        md.append("")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
