"""The probe set: constructed preference pairs whose right answer is known, read by every round's evaluation.

Each probe is a golden stream of a held-out utterance (chosen) against a corrupted copy of it (rejected):

    pause      a 0.6 s run of the codec's silence code after a word-final unit: the planted defect itself
    shuffle    the frames within every unit in a seeded random order
    duplicate  a seeded third of the frames said twice (within the walk's frame cap)

A round's policy "prefers" a probe when its implicit reward margin over round 0 is positive:
``[log p_k(chosen) - log p_k(rejected)] - [log p_0(chosen) - log p_0(rejected)] > 0`` (summed log-probs
under the emit rule, as DPO scores them). ``probe_accuracy`` is the share of probes preferred, per kind and in all;
a round that learnt the preference the pairs teach (no pauses) moves the pause probes above 0.5, and one trained
on swapped pairs moves them below. Unlike WER on a dozen utterances, this reads the policy's own log-probs on fixed
sequences, so it is nearly free of sampling noise.

    probes = build_probes(ctx, fmt, utts)      # rows {id, kind, prompt_codes, text, chosen, rejected}
    margins = probe_margins(policy, probes)     # [N] log p(chosen) - log p(rejected)
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from align.run import Context

PROBE_KINDS = ("pause", "shuffle", "duplicate")
PROBE_PAUSE_SECONDS = 0.6


def silence_code(codec) -> int:
    """The RVQ-1 code the codec gives to a pause (1 s of noise 70 dB below full scale, as the planted pauses)."""
    from align.corpus import PAUSE_NOISE_DBFS

    quiet = np.random.default_rng(0).standard_normal(codec.sample_rate) * 10 ** (PAUSE_NOISE_DBFS / 20)
    codes = codec.encode(quiet.astype(np.float32))[0]
    return int(torch.mode(codes).values)


def word_final_units(text: str, frontend: str) -> list[int]:
    """Indices into ``text_units(text)`` of the last unit of every word but the last."""
    from models.layout import text_to_tokens

    out, i = [], -1
    for tok in text_to_tokens(text, frontend).split():
        if tok == "|":
            out.append(i)
        else:
            i += 1
    return out


def _units(stream: list[int]) -> list[tuple[int, list[int]]]:
    """An interleaved stream -> [(marker, its frames)]."""
    out: list[tuple[int, list[int]]] = []
    for x in stream:
        if x < 0:
            out.append((x, []))
        elif out:
            out[-1][1].append(x)
    return out


def _join(units: list[tuple[int, list[int]]]) -> list[int]:
    return [x for m, frames in units for x in (m, *frames)]


def corrupt(stream: list[int], kind: str, *, rng: random.Random, word_ends: list[int], silence: int,
            frame_rate: float, max_frames: int | None) -> list[int] | None:
    """A corrupted copy of an interleaved golden stream [T'] (see the module docstring), or None where the kind
    cannot apply (no word boundary to pause at)."""
    units = _units(stream)
    if kind == "pause":
        if not word_ends:
            return None
        j = rng.choice(word_ends)
        marker, frames = units[j]
        n = int(round(PROBE_PAUSE_SECONDS * frame_rate))
        if max_frames is not None:
            n = max(1, min(n, max_frames - len(frames)))
        units[j] = (marker, frames + [silence] * n)
    elif kind == "shuffle":
        units = [(m, rng.sample(f, len(f))) for m, f in units]
    elif kind == "duplicate":
        out = []
        for m, f in units:
            room = len(f) if max_frames is None else max(0, max_frames - len(f))
            doubled = []
            for x in f:
                doubled.append(x)
                if room > 0 and rng.random() < 1 / 3:
                    doubled.append(x)
                    room -= 1
            out.append((m, doubled))
        units = out
    else:
        raise ValueError(f"unknown probe kind {kind!r}; choose from {PROBE_KINDS}")
    return _join(units)


def build_probes(ctx: "Context", fmt, utts: list, *, frontend: str, max_frames: int | None, seed: int,
                 kinds: tuple[str, ...] = PROBE_KINDS) -> list[dict]:
    """One probe per (utterance, kind): golden stream vs its corrupted copy, with the utterance's voice prompt (another
    utterance of the speaker in ``utts``). Interleaved policies only (the corruptions walk units)."""
    if fmt.units is None:
        raise ValueError("the probe set corrupts interleaved streams (policy.layout=interleaved)")
    silence = silence_code(ctx.codec)
    out = []
    for u in utts:
        golden = ctx.golden_stream(u, fmt).tolist()
        prompt = ctx.prompt_for(u, utts)
        for kind in kinds:
            rng = random.Random(f"probe-{seed}-{u.id}-{kind}")
            bad = corrupt(golden, kind, rng=rng, word_ends=word_final_units(u.text, frontend), silence=silence,
                          frame_rate=ctx.codec.frame_rate, max_frames=max_frames)
            if bad is not None and bad != golden:
                out.append({"id": u.id, "kind": kind, "text": u.text, "prompt_id": prompt.id,
                            "prompt_codes": ctx.codes(prompt).tolist(), "chosen": golden, "rejected": bad})
    return out


def probe_margins(policy, probes: list[dict], batch_size: int = 16) -> np.ndarray:
    """[N] summed log p(chosen) - log p(rejected) of every probe under ``policy`` (its emit rule)."""
    from eval.gap import completion_logprobs

    texts = [p["text"] for p in probes]
    prompts = [torch.tensor(p["prompt_codes"], dtype=torch.long) for p in probes]
    chosen = completion_logprobs(policy, texts, prompts, [p["chosen"] for p in probes], batch_size, reduce="sum")
    rejected = completion_logprobs(policy, texts, prompts, [p["rejected"] for p in probes], batch_size, reduce="sum")
    return chosen - rejected


def probe_summary(probes: list[dict], margins: np.ndarray, reference: np.ndarray) -> dict:
    """``probe_accuracy`` (share of probes whose margin grew over the reference's), per kind and in all, the mean
    growth ``probe_margin``, and n."""
    grew = np.asarray(margins) - np.asarray(reference)
    out = {"probe_accuracy": float(np.mean(grew > 0)), "probe_margin": float(np.mean(grew)), "probe_n": len(grew)}
    for kind in PROBE_KINDS:
        sel = np.array([p["kind"] == kind for p in probes])
        if sel.any():
            out[f"probe_accuracy_{kind}"] = float(np.mean(grew[sel] > 0))
            out[f"probe_margin_{kind}"] = float(np.mean(grew[sel]))
    return out
