"""Evaluate a policy: synthesise each test text in the target speaker's voice, then score it.

WER: the ASR backend's transcript of the synthesised audio against the text (one normaliser,
``eval.text.normalize_text``). SIM: speaker-embedding cosine between the synthesised audio and a
real recording of the target speaker (the utterance's own ``audio``). Quality (optional): a
non-intrusive MOS proxy per utterance (DNSMOS P.808 by default, ``eval.quality``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from align.audio import load_audio, resample, save_audio

log = logging.getLogger("speechalign.eval")


@dataclass
class EvalItem:
    """One test case: the text to say, whose voice, and real audio of that speaker."""

    id: str
    text: str
    speaker: str
    audio: str                 # real recording of `speaker` saying `text` (SIM reference)
    prompt_audio: str          # another real recording of `speaker` (the voice prompt)
    prompt_codes: torch.Tensor | None = None  # [n_q, Tp]; encoded from prompt_audio when None


def evaluate_policy(policy, items: list[EvalItem], *, asr, speaker, temperature: float, top_k: int, top_p: float,
                    seed: int, batch_size: int, save_audio_dir: Path | None = None, save_n: int = 0,
                    max_seconds: float | None = None, quality=None) -> tuple[dict, list[dict]]:
    """Synthesise and score every item.

    Returns (summary, rows): summary has corpus WER, mean SIM, the mean of each quality score (over
    the utterances it could score; NaN ones, i.e. silent outputs, are counted in ``quality_unscored``),
    counts and timings; rows one dict per utterance (id, text, speaker, hypothesis, wer, sim,
    duration, n_frames, and the quality model's keys, e.g. ``dnsmos``).
    """
    from eval.asr import corpus_wer, utterance_wer

    codec = policy.codec
    t0 = time.time()
    prompts = []
    for it in items:
        if it.prompt_codes is None:
            it.prompt_codes = codec.encode(load_audio(it.prompt_audio, codec.sample_rate, max_seconds))
        prompts.append(it.prompt_codes)
    samples = policy.generate([it.text for it in items], prompts, n=1, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, batch_size=batch_size, progress=True)
    t_gen = time.time() - t0

    t0 = time.time()
    from tqdm import tqdm

    wavs = [policy.render(s[0], p) for s, p in tqdm(list(zip(samples, prompts)), desc="rendering", leave=False)]
    t_render = time.time() - t0

    t0 = time.time()
    asr_in = [resample(w, codec.sample_rate, asr.sample_rate) if len(w) else w for w in wavs]
    hyps = asr.transcribe(asr_in)
    t_asr = time.time() - t0
    t0 = time.time()
    refs = [load_audio(it.audio, speaker.sample_rate, max_seconds) for it in items]
    spk_in = [resample(w, codec.sample_rate, speaker.sample_rate) if len(w) else w for w in wavs]
    sims = speaker.similarity(spk_in, refs)
    t_sim = time.time() - t0
    t0 = time.time()
    scores = [{} for _ in wavs]
    if quality is not None:
        scores = quality.score([resample(w, codec.sample_rate, quality.sample_rate) if len(w) else w for w in wavs])
    t_quality = time.time() - t0

    rows = []
    for i, (it, s, w, h, sim, q) in enumerate(zip(items, samples, wavs, hyps, sims, scores)):
        rows.append({"id": it.id, "text": it.text, "speaker": it.speaker, "hypothesis": h,
                     "wer": utterance_wer(it.text, h), "sim": float(sim), "duration": len(w) / codec.sample_rate,
                     "n_frames": int(s[0].numel()), **q})
        if save_audio_dir is not None and i < save_n and len(w):
            save_audio(Path(save_audio_dir) / f"{it.id}.wav", w, codec.sample_rate)
    summary = {
        "wer": corpus_wer([it.text for it in items], hyps),
        "wer_mean": float(np.mean([r["wer"] for r in rows])),
        "sim": float(np.mean(sims)),
        "n": len(rows),
        "empty_outputs": sum(1 for r in rows if r["n_frames"] == 0),
        "mean_duration": float(np.mean([r["duration"] for r in rows])),
        "seconds": {"generate": round(t_gen, 2), "render": round(t_render, 2), "asr": round(t_asr, 2),
                    "sim": round(t_sim, 2), "quality": round(t_quality, 2)},
    }
    if quality is not None:
        for key in quality.keys:
            vals = np.array([q[key] for q in scores], dtype=np.float64)
            summary[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
        summary["quality_unscored"] = int(sum(not np.isfinite(q[quality.keys[0]]) for q in scores))
    return summary, rows


def score_wavs(wavs: list[np.ndarray], sample_rate: int, texts: list[str], refs: list[np.ndarray], *, asr,
               speaker) -> tuple[dict, list[str], np.ndarray]:
    """WER and SIM of ready waveforms (benchmarks that render audio their own way).

    wavs: B float32 [n] at ``sample_rate`` (empty = said nothing); refs: B real recordings at
    ``speaker.sample_rate``. Returns ({wer: corpus WER, sim: mean SIM}, B hypotheses, B SIMs).
    """
    from eval.asr import corpus_wer

    hyps = asr.transcribe([resample(w, sample_rate, asr.sample_rate) if len(w) else w for w in wavs])
    sims = np.asarray(speaker.similarity([resample(w, sample_rate, speaker.sample_rate) if len(w) else w
                                          for w in wavs], refs))
    return {"wer": round(corpus_wer(texts, hyps), 4), "sim": round(float(sims.mean()), 4)}, hyps, sims


def evaluate_manifest(policy_dir: str, manifest: str, out: str, *, asr_name: str = "pocketsphinx",
                      speaker_name: str = "resemblyzer", temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0,
                      seed: int = 0, batch_size: int = 16, device: str = "cpu", quality_name: str = "dnsmos_p808",
                      asr_kwargs: dict | None = None, speaker_kwargs: dict | None = None,
                      prompt_min_seconds: float = 3.0) -> dict:
    """``speechalign eval``: evaluate any policy directory on any manifest; writes ``out`` (JSON).

    Manifest rows: ``{id, text, speaker, audio, prompt_audio, prompt_text}`` (paths relative to the
    manifest). Rows without ``prompt_audio`` get another utterance of the same speaker as prompt
    (at least ``prompt_min_seconds`` long when the speaker has one).
    """
    import json

    from align.data import atomic_write_text, choose_prompt, load_manifest
    from eval.asr import build_asr
    from eval.quality import build_quality
    from eval.speaker import build_speaker_encoder
    from models.codec_lm import Policy

    utts, skips = load_manifest(manifest)
    items = [EvalItem(u.id, u.text, u.speaker, u.audio,
                      u.prompt_audio or choose_prompt(u, utts, seed, min_seconds=prompt_min_seconds).audio)
             for u in utts]
    policy = Policy.load(policy_dir, device=device)
    summary, rows = evaluate_policy(policy, items, asr=build_asr(asr_name, **(asr_kwargs or {})),
                                    speaker=build_speaker_encoder(speaker_name, **(speaker_kwargs or {})),
                                    quality=build_quality(quality_name), temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, batch_size=batch_size)
    result = dict(summary, policy=str(policy_dir), manifest=str(manifest), skipped=[s.__dict__ for s in skips],
                  rows=rows)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result
