"""Ablation: SpeechGPT-Gen's implicit chain vs the explicit chain, at equal training steps.

    OMP_NUM_THREADS=2 python benchmarks/chain_ablation.py [--config configs/tiny.yaml] [--steps 300]

On the embedded default (tiny.yaml's corpus and mel-RVQ codec) two tiny flow models are trained
with the same data, seed, optimiser and number of steps, differing only in the chain:

* implicit: prior N(0, I) + v1 (the RVQ-1 latent), no v1 input;
* explicit: prior N(0, I), v1 as an input, residual target x1 - v1.

Each renders the golden RVQ-1 tokens of ``--eval`` test utterances with a 1 s voice prompt (another
utterance of the same speaker), with the midpoint solver at NFE 2/4/8/16. Reported per chain and
NFE: latent MSE to the golden latent (log-mel units), WER (pocketsphinx) and SIM (resemblyzer);
plus the final training loss and two references: the codec's own reconstruction (golden latent)
and the RVQ-1 latent alone (what the flow starts from). The golden RVQ-1 is used (not AR samples)
so that only the renderer differs. Writes ``benchmarks/results/chain_ablation.{md,json}``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from align.config import load_config  # noqa: E402
from align.run import Context  # noqa: E402
from align.base.speechgpt_gen import flow_data, train_flow  # noqa: E402
from align.config import SpeechGPTGenConfig  # noqa: E402
from models.codec import prompt_frames  # noqa: E402

log = logging.getLogger("speechalign.bench")
NFES = (2, 4, 8, 16)


def score(wavs, texts, refs, codec, asr, speaker) -> dict:
    from eval.evaluate import score_wavs

    return score_wavs(wavs, codec.sample_rate, texts, refs, asr=asr, speaker=speaker)[0]


def latent_mse(latents, golden, codec) -> float:
    """Mean squared error to the golden latent (log-mel units), averaged over utterances."""
    return round(float(np.mean([((x - codec.latent(c)) ** 2).mean().item() for x, c in zip(latents, golden)])), 4)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=300, help="flow optimiser steps per chain")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128, help="training windows of at most this many frames")
    parser.add_argument("--eval", type=int, default=32, help="test utterances rendered")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chain_ablation"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    cfg = load_config(args.config, [f"cache_dir={ROOT / 'runs' / '_cache'}",
                                     f"data.corpus_dir={ROOT / 'runs' / '_corpus'}"] + args.set)
    ctx = Context(cfg, None)
    t0 = time.time()
    codec, train, test = ctx.codec, ctx.splits.train, ctx.splits.test
    data = flow_data(codec, [(u.text, ctx.codes(u), None) for u in train])
    prep_seconds = time.time() - t0

    from models.audio import load_audio
    from align.stages import round_subset
    from eval.asr import build_asr
    from eval.speaker import build_speaker_encoder

    asr, speaker = build_asr(cfg.eval.asr), build_speaker_encoder(cfg.eval.speaker)
    items = round_subset(test, args.eval, cfg.seed)
    n_prompt = prompt_frames(cfg.policy.prompt_seconds, codec.frame_rate)
    golden = [ctx.codes(u) for u in items]
    prompts = [ctx.codes(ctx.prompt_for(u, test))[:, :n_prompt] for u in items]
    texts = [u.text for u in items]
    refs = [load_audio(u.audio, speaker.sample_rate) for u in items]

    t0 = time.time()
    torch.manual_seed(0)  # Griffin-Lim's random phases
    references = {}
    for name, to_latent in (("codec (golden latent)", codec.latent), ("RVQ-1 latent alone", codec.semantic_latent)):
        latents = [to_latent(c) for c in golden]
        references[name] = {"latent_mse": latent_mse(latents, golden, codec),
                            **score([codec.decode_latent(x) for x in latents], texts, refs, codec, asr, speaker)}
    ref_seconds = time.time() - t0

    chains = {}
    for chain in ("implicit", "explicit"):
        scfg = SpeechGPTGenConfig(chain=chain, steps=args.steps, batch_size=args.batch_size, crop_frames=args.crop)
        t0 = time.time()
        flow, stats = train_flow(ctx, scfg, data, rng=random.Random(cfg.seed), seed=cfg.seed, device="cpu")
        train_seconds = time.time() - t0
        rows = []
        for n in NFES:
            t0 = time.time()
            latents, wavs = [], []
            torch.manual_seed(0)
            for i, (c, p) in enumerate(zip(golden, prompts)):
                lat = flow.synthesize(codec.semantic_latent(c[0]), codec.latent(p), codec.semantic_latent(p),
                                      steps=n // 2, solver="midpoint", generator=torch.Generator().manual_seed(i))
                latents.append(lat)
                wavs.append(codec.decode_latent(lat))
            synth_seconds = time.time() - t0
            row = {"nfe": n, "latent_mse": latent_mse(latents, golden, codec), **score(wavs, texts, refs, codec, asr, speaker),
                   "synth_seconds": round(synth_seconds, 1)}
            log.info("%s NFE %d: %s", chain, n, row)
            rows.append(row)
        best_mse = min(r["latent_mse"] for r in rows)
        best_wer = min(r["wer"] for r in rows)
        chains[chain] = {
            "final_flow_loss": round(stats["flow_loss"], 4), "train_seconds": round(train_seconds, 1),
            "params": sum(p.numel() for p in flow.parameters()), "by_nfe": rows,
            "nfe_within_5pct_of_best_mse": next(r["nfe"] for r in rows if r["latent_mse"] <= 1.05 * best_mse),
            "nfe_within_0.02_of_best_wer": next(r["nfe"] for r in rows if r["wer"] <= best_wer + 0.02),
        }

    result = {"config": str(Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT)
                            else args.config),
              "codec": codec.identity, "train_utterances": len(data), "eval_utterances": len(items),
              "steps_per_chain": args.steps, "batch_size": args.batch_size, "crop_frames": args.crop,
              "solver": "midpoint",
              "prompt_frames": n_prompt, "references": references, "chains": chains,
              "seconds": {"prepare": round(prep_seconds, 1), "references": round(ref_seconds, 1)},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                          "load_average_at_end": [round(x, 1) for x in os.getloadavg()]}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from models.io import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), to_markdown(result))
    print(to_markdown(result))


def to_markdown(r: dict) -> str:
    lines = [
        "# Chain ablation: implicit vs explicit (SpeechGPT-Gen flow renderer)", "",
        f"Embedded default ({r['config']}), codec `{r['codec']}`; {r['train_utterances']} training utterances, "
        f"{r['steps_per_chain']} steps x batch {r['batch_size']} windows of <= {r['crop_frames']} frames per chain "
        "(tiny flow, same seed); "
        f"{r['eval_utterances']} test utterances rendered from their golden RVQ-1 with a "
        f"{r['prompt_frames']}-frame voice prompt, {r['solver']} solver. Produced by "
        f"`python benchmarks/chain_ablation.py --steps {r['steps_per_chain']} --batch-size {r['batch_size']} "
        f"--crop {r['crop_frames']} --eval {r['eval_utterances']}`.", "",
        "| chain | final flow loss | train s | NFE | latent MSE | WER | SIM |", "|---|---|---|---|---|---|---|"]
    for chain, c in r["chains"].items():
        for row in c["by_nfe"]:
            lines.append(f"| {chain} | {c['final_flow_loss']} | {c['train_seconds']} | {row['nfe']} | "
                         f"{row['latent_mse']} | {row['wer']} | {row['sim']} |")
    lines += ["", "| reference | latent MSE | WER | SIM |", "|---|---|---|---|"]
    for name, ref in r["references"].items():
        lines.append(f"| {name} | {ref['latent_mse']} | {ref['wer']} | {ref['sim']} |")
    lines += ["", "NFE needed (smallest tested NFE within 5% of the chain's best latent MSE / within 0.02 of its "
              "best WER):", ""]
    for chain, c in r["chains"].items():
        lines.append(f"- {chain}: MSE {c['nfe_within_5pct_of_best_mse']}, WER {c['nfe_within_0.02_of_best_wer']}")
    lines += ["", "Losses are not comparable across chains (the explicit chain regresses a different velocity); "
              "latent MSE, WER and SIM are. Machine: {}.".format(r["machine"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
