"""SpeechGPT-Gen as a base stage: AR semantic LM + flow-matching perceptual model.

    base.stage: speechgpt_gen
    round_000/base_work/ar/     the AR half (text + prompt RVQ-1 -> RVQ-1), once trained
    round_000/base_work/flow/   the flow half (RVQ-1 + prompt latent -> codec latent), once trained
    round_000/policy/           both together; speechalign.json says renderer: flow

The AR half is exactly the policy the loop aligns (``base.train_ar``, shared with ``sft``); the
flow model replaces the NAR as the renderer, so every later round samples RVQ-1, renders it
through the flow for WER/SIM, and DPO touches only the AR half. The halves are checkpointed
separately, so a run killed between (or during the second of) them resumes without retraining
the first; ``base_work/`` is removed once the policy is written.

Also the inference entry points behind ``speechalign tts`` and ``speechalign vc``.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from align.run import Context

log = logging.getLogger("speechalign.speechgpt_gen")


@dataclass
class SpeechGPTGenConfig:
    """The flow-matching half of the SpeechGPT-Gen base stage (the AR half uses ``base:``)."""

    flow_size: str = field(default="tiny", metadata={
        "help": "flow size: tiny (4 x 128, CPU minutes) or paper (conformer 1024 x 12, 16 heads)"})
    chain: str = field(default="implicit", metadata={
        "help": "implicit: prior N(0,I) + RVQ-1 latent (SpeechGPT-Gen); explicit: RVQ-1 latent as input"})
    steps: int = field(default=600, metadata={"help": "flow optimiser steps"})
    batch_size: int = field(default=16, metadata={"help": "utterances per flow step"})
    lr: float = field(default=1e-3, metadata={"help": "flow peak learning rate (AdamW, cosine, warm-up)"})
    warmup_steps: int = field(default=50, metadata={"help": "flow linear warm-up steps"})
    crop_frames: int = field(default=0, metadata={
        "help": "train on random windows of at most this many frames (0 = whole utterances); the prompt "
                "prefix is drawn inside the window. Cuts CPU cost roughly in proportion"})
    max_prompt_frames: int = field(default=300, metadata={
        "help": "longest random prompt prefix in training (the paper's 300 frames)"})
    cfg_dropout: float = field(default=0.0, metadata={
        "help": "train without the prompt context with this probability (> 0 allows guidance)"})
    solver: str = field(default="midpoint", metadata={"help": "ODE solver when rendering: euler or midpoint"})
    ode_steps: int = field(default=8, metadata={
        "help": "solver steps when rendering (NFE = 2 x steps for midpoint); the paper used 8-16"})
    guidance: float = field(default=0.0, metadata={"help": "classifier-free guidance strength; 0 = off"})

    def __post_init__(self):
        from models.flow import CHAINS, FLOW_SIZES, SOLVERS

        if self.flow_size not in FLOW_SIZES:
            raise ValueError(f"speechgpt_gen.flow_size={self.flow_size!r} unknown; choose one of {sorted(FLOW_SIZES)}")
        if self.chain not in CHAINS:
            raise ValueError(f"speechgpt_gen.chain={self.chain!r}: choose one of {CHAINS}")
        if self.solver not in SOLVERS:
            raise ValueError(f"speechgpt_gen.solver={self.solver!r}: choose one of {SOLVERS}")
        for key in ("steps", "batch_size", "ode_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"speechgpt_gen.{key}={getattr(self, key)} must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_prompt_frames < 0:
            raise ValueError("speechgpt_gen.lr > 0, warmup_steps >= 0 and max_prompt_frames >= 0 are required")
        if self.crop_frames != 0 and self.crop_frames < 8:
            raise ValueError(f"speechgpt_gen.crop_frames={self.crop_frames}: use 0 (no crop) or >= 8 frames")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"speechgpt_gen.cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.guidance < 0 or (self.guidance > 0 and self.cfg_dropout == 0):
            raise ValueError(f"speechgpt_gen.guidance={self.guidance}: must be >= 0, and > 0 needs cfg_dropout > 0")

    def flow_config(self, latent_dim: int):
        from models.flow import FlowConfig

        return FlowConfig.named(self.flow_size, latent_dim, chain=self.chain, max_prompt_frames=self.max_prompt_frames,
                                cfg_dropout=self.cfg_dropout, solver=self.solver, steps=self.ode_steps,
                                guidance=self.guidance)


def flow_data(codec, examples: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x1 = codec.latent(codes) [T, D], v1 = codec.semantic_latent(codes) [T, D]) per example."""
    if not hasattr(codec, "latent"):
        raise ValueError(f"codec {codec.identity} exposes no continuous latent (latent / semantic_latent / "
                         "decode_latent); use codec.backend=mel_rvq or encodec for the flow renderer")
    return [(codec.latent(codes), codec.semantic_latent(codes)) for _, codes, _ in examples]


def train_flow(ctx: "Context", scfg: SpeechGPTGenConfig, data: list, *, rng: random.Random, seed: int,
               device: str | None = None, accelerator=None):
    """Train a flow model on ``flow_data`` rows through ``base._fit``; returns (FlowModel on cpu, stats)."""
    from align.base import _fit
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

    final, history = _fit("base flow", flow, loss_fn, n_items=len(data), batch_size=scfg.batch_size,
                          steps=scfg.steps, lr=scfg.lr, warmup=min(scfg.warmup_steps, scfg.steps // 10),
                          betas=(0.9, 0.999), bcfg=ctx.cfg.base, rng=rng, accelerator=accelerator)
    return flow.cpu().eval(), {"flow_loss": final, "flow_history": history}


def speechgpt_gen_base(ctx: "Context", out_dir: Path) -> dict:
    """Train the AR semantic LM, then the flow model; write ``out_dir`` (a policy dir, renderer flow)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.base import _examples, train_ar
    from align.io import atomic_dir
    from align.run import write_json
    from models.codec_lm import Policy, policy_meta
    from models.flow import FlowModel

    cfg, scfg = ctx.cfg, ctx.cfg.speechgpt_gen
    accelerator = Accelerator(cpu=ctx.device == "cpu")
    device = str(accelerator.device)
    main = accelerator.is_main_process
    work = Path(out_dir).parent / "base_work"
    examples = _examples(ctx, 0)

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

    meta = dict(policy_meta(cfg.policy, ar_stats["frames_per_char"]), base_stage="speechgpt_gen")
    if main:
        Policy(lm=lm.eval(), tokenizer=tok, nar=None, codec=ctx.codec, meta=meta, flow=flow).save(out_dir)
        shutil.rmtree(work, ignore_errors=True)  # the policy dir now holds both halves
    accelerator.wait_for_everyone()
    return {"ar_loss": ar_stats["ar_loss"], "flow_loss": flow_stats["flow_loss"], "chain": scfg.chain,
            "frames_per_char": ar_stats["frames_per_char"], "examples": ar_stats["examples"],
            "history": ar_stats["history"], "flow_history": flow_stats["flow_history"]}


# ---------------------------------------------------------------------------------------------
# Inference: ``speechalign tts`` and ``speechalign vc``
# ---------------------------------------------------------------------------------------------
def synthesize_tts(policy_dir: str | Path, text: str, prompt_wav: str | Path, out: str | Path, *,
                   temperature: float = 0.8, top_k: int = 50, seed: int = 0, device: str = "cpu") -> dict:
    """Zero-shot TTS: the AR half speaks ``text`` in RVQ-1, the renderer (flow or NAR) gives it the
    prompt's voice. Writes ``out`` (WAV at the codec's rate); returns {frames, seconds, out}."""
    from align.audio import load_audio, save_audio
    from models.codec_lm import Policy

    policy = Policy.load(policy_dir, device=device)
    codec = policy.codec
    prompt = codec.encode(load_audio(prompt_wav, codec.sample_rate))
    first = policy.generate([text], [prompt], n=1, temperature=temperature, top_k=top_k, seed=seed)[0][0]
    if first.numel() == 0:
        raise ValueError(f"the policy at {policy_dir} produced no speech tokens for {text!r}; try another --seed")
    wav = policy.render(first, prompt)
    save_audio(out, wav, codec.sample_rate)
    return {"frames": int(first.numel()), "seconds": len(wav) / codec.sample_rate, "out": str(out)}


def convert_voice(policy_dir: str | Path, source_wav: str | Path, prompt_wav: str | Path, out: str | Path, *,
                  device: str = "cpu") -> dict:
    """Voice conversion: the source's RVQ-1 tokens (what is said) + the target prompt (whose voice),
    through the renderer. Writes ``out``; returns {frames, seconds, out}."""
    from align.audio import load_audio, save_audio
    from models.codec_lm import Policy

    policy = Policy.load(policy_dir, device=device)
    if policy.flow is None:
        log.warning("%s has no flow model; converting through its NAR renderer instead", policy_dir)
    codec = policy.codec
    first = codec.encode(load_audio(source_wav, codec.sample_rate))[0]
    prompt = codec.encode(load_audio(prompt_wav, codec.sample_rate))
    wav = policy.render(first, prompt)
    save_audio(out, wav, codec.sample_rate)
    return {"frames": int(first.numel()), "seconds": len(wav) / codec.sample_rate, "out": str(out)}
