"""Benchmark of the main job: run (or read) the tiny default and print its figures.

    python benchmarks/tiny_default.py [--config configs/tiny.yaml] [--set key=value ...]

Writes ``benchmarks/results/tiny_default.md`` and ``.json``:
  * WER / SIM / DPO statistics per round (from the run's metrics.jsonl),
  * wall time per stage per round (state.json),
  * the codec bar on the test split: raw vs round-trip WER, reconstruction SIM vs the mean SIM of
    two different utterances of the same speaker,
  * sampler throughput of the round-0 policy, batched vs one utterance at a time.
A finished run is resumed (nothing recomputed), so rerunning only re-measures codec and sampler.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

import torch  # noqa: E402

from align.config import load_config  # noqa: E402
from align.loop import run_loop  # noqa: E402
from align.run import Context, RunDir  # noqa: E402
from eval.compare import compare_runs, to_markdown  # noqa: E402

log = logging.getLogger("speechalign.bench")


def sampler_throughput(ctx: Context, n_prompts: int, batch_size: int) -> dict:
    from models.codec_lm import Policy

    policy = Policy.load(ctx.run.policy_dir(0))
    train = ctx.splits.train[:n_prompts]
    prompts = [ctx.codes(ctx.prompt_for(u, ctx.splits.train)) for u in train]
    texts = [u.text for u in train]
    out = {}
    for name, bs in (("batched", batch_size), ("one_at_a_time", 1)):
        t0 = time.time()
        samples = policy.generate(texts, prompts, n=1, temperature=1.0, top_k=50, batch_size=bs, seed=0)
        dt = time.time() - t0
        tokens = sum(int(s[0].numel()) for s in samples)
        out[name] = {"batch_size": bs, "seconds": round(dt, 2), "tokens": tokens,
                     "tokens_per_second": round(tokens / dt, 1), "utterances_per_second": round(len(texts) / dt, 2)}
    out["speedup"] = round(out["batched"]["tokens_per_second"] / out["one_at_a_time"]["tokens_per_second"], 2)
    return out


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tiny_default"))
    parser.add_argument("--sampler-prompts", type=int, default=32)
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    t0 = time.time()
    run_dir = run_loop(cfg)
    run_seconds = time.time() - t0
    ctx = Context(cfg, RunDir(cfg))

    from eval.asr import build_asr
    from eval.codec_check import codec_roundtrip
    from eval.speaker import build_speaker_encoder

    codec_bar = codec_roundtrip(ctx.codec, ctx.splits.test, asr=build_asr(cfg.eval.asr),
                                speaker=build_speaker_encoder(cfg.eval.speaker), load=ctx.load_wav)
    codec_bar["bar_wer_holds"] = codec_bar["wer_codec"] <= codec_bar["wer_raw"] + 0.05
    codec_bar["bar_sim_holds"] = codec_bar["sim_recon"] >= codec_bar["sim_same_speaker_other_utt"]
    sampler = sampler_throughput(ctx, args.sampler_prompts, cfg.sample.batch_size)

    table = compare_runs([run_dir])
    state = json.loads((run_dir / "state.json").read_text())
    total_stage_seconds = sum(v["seconds"] for stages in state["done"].values() for v in stages.values())
    # the run's own wall clock: from the base stage's start (corpus, codec fit and golden tokens happen inside
    # it when the cache is empty) to the last stage's end, whichever invocation ran them
    stages = [v for by_stage in state["done"].values() for v in by_stage.values()]
    base = state["done"]["0"]["base"]
    wall_seconds = max(v["finished"] for v in stages) - (base["finished"] - base["seconds"])
    result = {
        "config": str(args.config), "overrides": args.set, "run_dir": str(run_dir),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "this_invocation_seconds": round(run_seconds, 1),
        "sum_of_stage_seconds": round(total_stage_seconds, 1),
        "run_wall_seconds": round(wall_seconds, 1),
        "rounds": table.to_dict(orient="records"),
        "codec_bar": codec_bar,
        "sampler": sampler,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [f"# tiny default benchmark ({cfg.name})", "",
          f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, CUDA {torch.cuda.is_available()}. "
          f"Sum of stage wall times: {total_stage_seconds / 60:.1f} min; the run's wall clock from the base stage's "
          f"start to the last stage's end: {wall_seconds / 60:.1f} min (with an empty cache the base stage includes "
          "the corpus, the codec fit and the golden tokens).", "",
          "## Rounds (WER: pocketsphinx corpus WER on the test split; SIM: resemblyzer cosine to a real "
          "recording of the target speaker; sec_*: wall seconds per stage)", "", to_markdown(table), "",
          "## Codec bar on the test split", "",
          "| n | WER raw | WER codec | SIM recon | SIM same speaker, other utterance | WER bar | SIM bar |",
          "|---|---|---|---|---|---|---|",
          f"| {codec_bar['n']} | {codec_bar['wer_raw']:.4f} | {codec_bar['wer_codec']:.4f} | "
          f"{codec_bar['sim_recon']:.4f} | {codec_bar['sim_same_speaker_other_utt']:.4f} | "
          f"{'holds' if codec_bar['bar_wer_holds'] else 'FAILS'} | {'holds' if codec_bar['bar_sim_holds'] else 'FAILS'} |",
          "", f"Codec: `{codec_bar['codec']}`, {codec_bar['codec_seconds_per_audio_second']:.3f} s per audio second "
          "(encode + decode).", "",
          f"## Sampler throughput (round-0 policy, {args.sampler_prompts} prompts)", "",
          "| mode | batch | seconds | tokens/s | utterances/s |", "|---|---|---|---|---|"]
    for mode in ("batched", "one_at_a_time"):
        s = sampler[mode]
        md.append(f"| {mode} | {s['batch_size']} | {s['seconds']} | {s['tokens_per_second']} | {s['utterances_per_second']} |")
    md += ["", f"Batched speed-up: {sampler['speedup']}x.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
