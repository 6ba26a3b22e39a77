"""SpeechGPT-Gen as a base stage: AR semantic LM + flow-matching perceptual model.

    base.stage: speechgpt_gen
    round_000/base_work/ar/     the AR half (text + prompt RVQ-1 -> RVQ-1), once trained
    round_000/base_work/flow/   the flow half (RVQ-1 + prompt latent -> codec latent), once trained
    round_000/policy/           both together; speechalign.json says renderer: flow

The AR half is exactly the policy the loop aligns (``align.training.train_ar``, shared with ``sft``); the
flow model replaces the NAR as the renderer, so every later round samples RVQ-1, renders it
through the flow for WER/SIM, and DPO touches only the AR half. The halves are checkpointed
separately, so a run killed between (or during the second of) them resumes without retraining
the first; ``base_work/`` is removed once the policy is written.

The inference entry points behind ``speechalign tts`` and ``speechalign vc`` are in models/inference.py.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from align.config import SpeechGPTGenConfig
    from align.run import Context

log = logging.getLogger("speechalign.speechgpt_gen")


def flow_data(codec, examples: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x1 = codec.latent(codes) [T, D], v1 = codec.semantic_latent(codes) [T, D]) per example."""
    if not hasattr(codec, "latent"):
        raise ValueError(f"codec {codec.identity} exposes no continuous latent (latent / semantic_latent / "
                         "decode_latent); use codec.backend=mel_rvq or encodec for the flow renderer")
    return [(codec.latent(codes), codec.semantic_latent(codes)) for _, codes, _ in examples]


def train_flow(ctx: "Context", scfg: SpeechGPTGenConfig, data: list, *, rng: random.Random, seed: int,
               device: str | None = None, accelerator=None):
    """Train a flow model on ``flow_data`` rows through ``align.training.fit``; returns (FlowModel on cpu, stats)."""
    from align.training import fit
    from models.flow import FlowModel, flow_batch

    device = device or ctx.device
    torch.manual_seed(seed)
    flow = FlowModel(scfg.flow_config(data[0][0].shape[1]))
    flow.set_normalizer([x for x, _ in data])
    flow.to(device)
    gen = torch.Generator().manual_seed(seed + 1)  # noise, times and prompt lengths: one seeded stream
    log.info("base flow: %d utterances, %.2fM params, chain %s", len(data),
             sum(p.numel() for p in flow.parameters()) / 1e6, scfg.chain)

    def window(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, v = data[i]
        if scfg.crop_frames and len(x) > scfg.crop_frames:
            s = int(torch.randint(0, len(x) - scfg.crop_frames + 1, (1,), generator=gen))
            return x[s: s + scfg.crop_frames], v[s: s + scfg.crop_frames]
        return x, v

    def loss_fn(batch: list[int]) -> torch.Tensor:
        x1, v1, mask = flow_batch([window(i) for i in batch])
        return flow.loss(x1.to(device), v1.to(device), mask.to(device), generator=gen)

    final, history = fit("base flow", flow, loss_fn, n_items=len(data), batch_size=scfg.batch_size,
                          steps=scfg.steps, lr=scfg.lr, warmup=min(scfg.warmup_steps, scfg.steps // 10),
                          betas=(0.9, 0.999), bcfg=ctx.cfg.base, rng=rng, accelerator=accelerator)
    return flow.cpu().eval(), {"flow_loss": final, "flow_history": history}


def speechgpt_gen_base(ctx: "Context", out_dir: Path) -> dict:
    """Train the AR semantic LM, then the flow model; write ``out_dir`` (a policy dir, renderer flow)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.training import golden_examples, train_ar
    from models.io import atomic_dir, write_json
    from models.codec_lm import Policy, policy_meta
    from models.flow import FlowModel

    cfg, scfg = ctx.cfg, ctx.cfg.speechgpt_gen
    accelerator = Accelerator(cpu=ctx.device == "cpu")
    device = str(accelerator.device)
    main = accelerator.is_main_process
    work = Path(out_dir).parent / "base_work"
    examples = golden_examples(ctx, 0)

    ar_dir = work / "ar"
    if (ar_dir / "stats.json").is_file():
        log.info("base AR: reusing %s", ar_dir)
        lm = AutoModelForCausalLM.from_pretrained(ar_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(ar_dir)
        ar_stats = json.loads((ar_dir / "stats.json").read_text())
    else:
        lm, tok, ar_stats = train_ar(ctx, examples, random.Random(cfg.seed), device, accelerator)
        lm = lm.cpu()
        if main:
            with atomic_dir(ar_dir) as tmp:
                lm.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                write_json(tmp / "stats.json", ar_stats)
        accelerator.wait_for_everyone()

    flow_dir = work / "flow"
    if (flow_dir / "stats.json").is_file():
        log.info("base flow: reusing %s", flow_dir)
        flow = FlowModel.load(flow_dir)
        flow_stats = json.loads((flow_dir / "stats.json").read_text())
    else:
        # its own seeds, so a resumed run trains the same flow whether or not the AR half was reloaded
        flow, flow_stats = train_flow(ctx, scfg, flow_data(ctx.codec, examples), rng=random.Random(cfg.seed + 2),
                                      seed=cfg.seed + 2, device=device, accelerator=accelerator)
        if main:
            with atomic_dir(flow_dir) as tmp:
                flow.save(tmp)
                write_json(tmp / "stats.json", flow_stats)
        accelerator.wait_for_everyone()

    meta = dict(policy_meta(cfg.policy, ar_stats["frames_per_char"], ar_stats.get("max_frames_per_unit")),
                base_stage="speechgpt_gen")
    if main:
        Policy(lm=lm.eval(), tokenizer=tok, nar=None, codec=ctx.codec, meta=meta, flow=flow).save(out_dir)
        shutil.rmtree(work, ignore_errors=True)  # the policy dir now holds both halves
    accelerator.wait_for_everyone()
    return {"ar_loss": ar_stats["ar_loss"], "flow_loss": flow_stats["flow_loss"], "chain": scfg.chain,
            "frames_per_char": ar_stats["frames_per_char"], "examples": ar_stats["examples"],
            "history": ar_stats["history"], "flow_history": flow_stats["flow_history"]}
