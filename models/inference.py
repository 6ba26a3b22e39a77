"""Inference with any policy directory: ``speechalign tts`` and ``speechalign vc``.

    synthesize_tts(policy_dir, "the cat sat", "prompt.wav", "out.wav")    # AR RVQ-1, then the renderer
    convert_voice(policy_dir, "source.wav", "target_voice.wav", "out.wav") # source RVQ-1 + target prompt
"""
from __future__ import annotations

import logging
from pathlib import Path

from models.audio import load_audio, save_audio
from models.codec_lm import Policy

log = logging.getLogger("speechalign.inference")


def synthesize_tts(policy_dir: str | Path, text: str, prompt_wav: str | Path, out: str | Path, *,
                   temperature: float = 0.8, top_k: int = 50, seed: int = 0, device: str = "cpu") -> dict:
    """Zero-shot TTS: the AR half speaks ``text`` in RVQ-1, the renderer (flow or NAR) gives it the
    prompt's voice. Writes ``out`` (WAV at the codec's rate); returns {frames, seconds, out}."""
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
    policy = Policy.load(policy_dir, device=device)
    if policy.renderer is not None:
        raise ValueError(f"{policy_dir} renders through a phone renderer, which needs the text unit of every source "
                         "frame; voice conversion takes a policy with a flow (SpeechGPT-Gen) or NAR renderer")
    if policy.flow is None:
        log.warning("%s has no flow model; converting through its NAR renderer instead", policy_dir)
    codec = policy.codec
    first = codec.encode(load_audio(source_wav, codec.sample_rate))[0]
    prompt = codec.encode(load_audio(prompt_wav, codec.sample_rate))
    wav = policy.render(first, prompt)
    save_audio(out, wav, codec.sample_rate)
    return {"frames": int(first.numel()), "seconds": len(wav) / codec.sample_rate, "out": str(out)}
