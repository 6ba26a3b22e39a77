"""Evaluate a policy: synthesise each test text in the target speaker's voice, then score it.

WER: the ASR backend's transcript of the synthesised audio against the text (one normaliser,
``models.text.normalize_text``). SIM: speaker-embedding cosine between the synthesised audio and a
real recording of the target speaker (the utterance's own ``audio``). Quality (optional): a
non-intrusive MOS proxy per utterance (DNSMOS P.808 by default, ``eval.quality``).
"""
from __future__ import annotations

import logging
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from eval.defects import DefectConfig, has_pause, pause_of_logmel, pause_of_wav
from models.audio import load_audio, save_audio
from models.data import batch_slices
from models.io import BatchStore

if TYPE_CHECKING:
    from eval.scorers import EvalConfig, Scorers

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
    prompt_id: str | None = None  # the prompt utterance's id, where it has one


def item_seed(seed: int, item_id: str) -> int:
    """The seed one utterance is rendered under: a function of (run seed, utterance id) alone, so its audio
    is the same whichever process, batch or position renders it."""
    return (seed * 1_000_003 + zlib.crc32(item_id.encode())) % 2**63


def evaluate_policy(policy, items: list[EvalItem], *, scorers: "Scorers", temperature: float, top_k: int,
                    top_p: float, seed: int, batch_size: int, save_audio_dir: Path | None = None, save_n: int = 0,
                    max_seconds: float | None = None, batches: list[tuple[int, int]] | None = None,
                    gather: Callable[[list], list] | None = None, quality: bool = True,
                    store: BatchStore | None = None, defect: "DefectConfig | None" = None,
                    defect_samples: int = 0) -> tuple[dict, list[dict]]:
    """Synthesise and score every item with ``scorers`` (``eval.scorers.build_scorers``).

    Items are spoken in batches of ``batch_size`` cut from the whole list; batch [start, stop) samples
    under ``seed + start`` and each utterance renders under ``item_seed(seed, id)``. Each batch is spoken,
    rendered and scored before the next, and kept in ``store`` (``models.io.BatchStore``) when one is given, so a
    crash loses at most one batch. Several processes share the work by passing ``batches`` (the (start, stop)
    slices this one speaks, default all of them) and ``gather`` (every process's rows, concatenated, on every
    process; e.g. ``align.dist.Ranks.gather``): the result is the one a single process gives.

    Returns (summary, rows): summary has corpus WER, mean SIM, the mean of each quality score (over
    the utterances it could score; NaN ones, i.e. silent outputs, are counted in ``quality_unscored``),
    counts and timings (of this process); rows one dict per utterance in item order (id, text, speaker,
    hypothesis, wer, sim, duration, n_frames, codes: the RVQ-1 tokens spoken, and the quality model's
    keys, e.g. ``dnsmos``). The first ``save_n`` utterances' audio goes to ``save_audio_dir`` when given.
    ``quality=False`` skips the quality model (WER and SIM only).

    The pause detector (eval/defects.py, ``defect`` settings) reads every clip: ``pause`` is its longest internal
    silence in seconds; with ``defect_samples`` = m each utterance also speaks m more samples judged by the detector
    alone (``pauses``); ``defect`` is the share of the utterance's 1 + m samples that pause, and the summary's
    ``defect_rate`` their mean over ``defect_n`` samples.
    """
    from tqdm import tqdm

    from eval.asr import corpus_wer

    codec = policy.codec
    store = store or BatchStore(None)
    audio_dir = None if store.folder is None else store.folder / "audio"
    if batches is None:
        batches = batch_slices(len(items), batch_size)
    quality_model = scorers.quality if quality else None
    seconds = dict.fromkeys(("generate", "render", "asr", "ear", "sim", "quality", "defect"), 0.0)
    defect = defect or DefectConfig()
    rows: list[dict] = []
    cached = 0  # batches read from the store (tests assert a stage computed what it is compared on)
    for start, stop in tqdm(batches, desc="evaluating", leave=False):
        done = store.get(f"{start}-{stop}")
        if done is not None:
            cached += 1
            for r in done:  # a batch stored with fewer clips than asked for now (eval.save_audio grew): render them
                if r["_index"] < save_n and r["n_frames"] and not (isinstance(r["_wav"], str) and Path(r["_wav"]).is_file()):
                    it = items[r["_index"]]
                    r["_wav"] = _clip(policy, it, r["codes"], seed, audio_dir, max_seconds)
            rows += done
            continue
        part = items[start:stop]
        t0 = time.time()
        for it in part:
            if it.prompt_codes is None:
                it.prompt_codes = codec.encode(load_audio(it.prompt_audio, codec.sample_rate, max_seconds))
        samples = policy.generate([it.text for it in part], [it.prompt_codes for it in part], n=1,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + start,
                                  batch_size=stop - start)
        seconds["generate"] += time.time() - t0
        t0 = time.time()
        wavs = []
        for it, s in zip(part, samples):
            torch.manual_seed(item_seed(seed, it.id))  # a stochastic renderer (flow, sampled NAR) draws its own noise
            wavs.append(policy.render(s[0], it.prompt_codes))
        seconds["render"] += time.time() - t0
        t0 = time.time()
        wers, hyps = scorers.wer(wavs, codec.sample_rate, [it.text for it in part])
        seconds["asr"] += time.time() - t0
        t0 = time.time()
        heard = scorers.phones(wavs, codec.sample_rate, [it.text for it in part])  # the second ear ({} without one)
        seconds["ear"] += time.time() - t0
        t0 = time.time()
        refs = [load_audio(it.audio, scorers.speaker.sample_rate, max_seconds) for it in part]
        sims = scorers.sim(wavs, codec.sample_rate, refs)
        seconds["sim"] += time.time() - t0
        t0 = time.time()
        scores = scorers.quality_scores(wavs, codec.sample_rate) if quality_model is not None else [{} for _ in wavs]
        seconds["quality"] += time.time() - t0
        t0 = time.time()
        pauses = [pause_of_wav(w, codec.sample_rate, defect) for w in wavs]
        extra = _extra_pauses(policy, part, defect_samples, defect, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed + 104_729 + start)
        seconds["defect"] += time.time() - t0
        part_rows = []
        for i, it, s, w, h, wer, sim, q, p, more, ph in zip(range(start, stop), part, samples, wavs, hyps, wers, sims,
                                                             scores, pauses, extra, heard):
            row = {"id": it.id, "text": it.text, "speaker": it.speaker, "hypothesis": h, "wer": wer, **ph,
                   "sim": float(sim), "duration": len(w) / codec.sample_rate,
                   "n_frames": int(policy.format.frames(s[0]).numel()),
                   "codes": s[0].tolist(), "prompt_id": it.prompt_id, **{k: float(v) for k, v in q.items()},
                   "pause": p, "pauses": more,
                   "defect": float(np.mean([has_pause(x, defect) for x in [p, *more]])),
                   "_index": i, "_wav": None}
            if i < save_n and len(w):
                if audio_dir is not None:  # kept with the batch: a resumed stage still has it
                    save_audio(audio_dir / f"{it.id}.wav", w, codec.sample_rate)
                    row["_wav"] = str(audio_dir / f"{it.id}.wav")
                else:
                    row["_wav"] = w
            part_rows.append(row)
        if audio_dir is not None:
            store.put(f"{start}-{stop}", part_rows)
        rows += part_rows
    if gather is not None:
        rows = gather(rows)
        cached = sum(gather([cached]))
    rows.sort(key=lambda r: r["_index"])
    for r in rows:
        w = r.pop("_wav")
        r.pop("_index")
        if save_audio_dir is not None and w is not None:
            target = Path(save_audio_dir) / f"{r['id']}.wav"
            if isinstance(w, str):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(w, target)
            else:
                save_audio(target, w, codec.sample_rate)
    summary = {
        "wer": corpus_wer([r["text"] for r in rows], [r["hypothesis"] for r in rows]),
        "wer_mean": float(np.mean([r["wer"] for r in rows])),
        "sim": float(np.mean(np.asarray([r["sim"] for r in rows], dtype=np.float32))),  # the encoder's precision
        "n": len(rows),
        "empty_outputs": sum(1 for r in rows if r["n_frames"] == 0),
        "mean_duration": float(np.mean([r["duration"] for r in rows])),
        "defect_rate": float(np.mean([r["defect"] for r in rows])),
        # the second ear (eval.ear): corpus PER (phone errors over reference phones) and the mean NLL per phone
        **({"per": float(sum(r["phone_errors"] for r in rows) / max(1.0, sum(r["ref_phones"] for r in rows))),
            "ear_nll": float(np.mean([r["ear_nll"] for r in rows]))} if rows and "per" in rows[0] else {}),
        "defect_n": sum(1 + len(r["pauses"]) for r in rows),
        "seconds": {key: round(v, 2) for key, v in seconds.items()},
        "cached_batches": cached,  # over every process
    }
    if quality_model is not None:
        for key in quality_model.keys:
            vals = np.array([r[key] for r in rows], dtype=np.float64)
            summary[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
        summary["quality_unscored"] = int(sum(not np.isfinite(r[quality_model.keys[0]]) for r in rows))
    return summary, rows


def _extra_pauses(policy, part: list[EvalItem], m: int, defect: DefectConfig, *, temperature: float, top_k: int,
                  top_p: float, seed: int) -> list[list[float]]:
    """m more samples of each item, judged by the pause detector alone: [len(part)][m] longest pauses (seconds).
    Read from the rendered log-mel where the policy has a phone renderer (no vocoder), else from the audio."""
    if m == 0:
        return [[] for _ in part]
    samples = policy.generate([it.text for it in part], [it.prompt_codes for it in part], n=m, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, batch_size=len(part))
    out = []
    for it, ss in zip(part, samples):
        row = []
        for j, s in enumerate(ss):
            torch.manual_seed(item_seed(seed + j, it.id))
            if getattr(policy, "renders_logmel", False):
                row.append(pause_of_logmel(policy.render_logmel(s, it.prompt_codes), policy.codec.frame_rate, defect))
            else:
                row.append(pause_of_wav(policy.render(s, it.prompt_codes), policy.codec.sample_rate, defect))
        out.append(row)
    return out


def _clip(policy, it: EvalItem, codes: list[int], seed: int, audio_dir: Path | None, max_seconds: float | None):
    """The audio of a stored evaluation row, rendered again from its codes under the item's seed (the same clip the
    row was scored on): a path in ``audio_dir`` when there is one, else the waveform."""
    codec = policy.codec
    if it.prompt_codes is None:
        it.prompt_codes = codec.encode(load_audio(it.prompt_audio, codec.sample_rate, max_seconds))
    torch.manual_seed(item_seed(seed, it.id))
    w = policy.render(torch.tensor(codes, dtype=torch.long), it.prompt_codes)
    if audio_dir is None:
        return w
    save_audio(audio_dir / f"{it.id}.wav", w, codec.sample_rate)
    return str(audio_dir / f"{it.id}.wav")


def score_wavs(wavs: list[np.ndarray], sample_rate: int, texts: list[str], refs: list[np.ndarray], *, asr,
               speaker) -> tuple[dict, list[str], np.ndarray]:
    """WER and SIM of ready waveforms (benchmarks that render audio their own way).

    wavs: B float32 [n] at ``sample_rate`` (empty = said nothing); refs: B real recordings at
    ``speaker.sample_rate``. Returns ({wer: corpus WER, sim: mean SIM}, B hypotheses, B SIMs).
    """
    from eval.asr import corpus_wer
    from eval.scorers import resample_all

    hyps = asr.transcribe(resample_all(wavs, sample_rate, asr.sample_rate))
    sims = np.asarray(speaker.similarity(resample_all(wavs, sample_rate, speaker.sample_rate), refs))
    return {"wer": round(corpus_wer(texts, hyps), 4), "sim": round(float(sims.mean()), 4)}, hyps, sims


def check_items(policy, items: list[EvalItem], max_seconds: float) -> tuple[list[EvalItem], list[dict]]:
    """Guard the inputs before any model work: (items that can be evaluated, skips with their reasons).

    An item is skipped when its text is empty or too long for the policy, or when its prompt or reference
    recording is missing, unreadable, empty or longer than ``max_seconds``. Good items get their prompt
    encoded here, so nothing is read twice.
    """
    from models.audio import AudioError

    codec = policy.codec
    good, skips = [], []
    for it in items:
        problem = policy.text_problem(it.text)
        if problem is None:
            try:
                load_audio(it.audio, 16000, max_seconds)  # the reference: readable and bounded
                if it.prompt_codes is None:
                    it.prompt_codes = codec.encode(load_audio(it.prompt_audio, codec.sample_rate, max_seconds))
            except AudioError as e:
                problem = str(e)
        if problem is None:
            good.append(it)
        else:
            skips.append({"id": it.id, "reason": problem})
            log.warning("eval: skipping %s: %s", it.id, problem)
    return good, skips


def evaluate_manifest(policy_dir: str, manifest: str, out: str, *, ecfg: "EvalConfig | None" = None,
                      seed: int = 0, device: str = "cpu", max_seconds: float = 30.0,
                      save_audio: str | Path | None = None) -> dict:
    """``speechalign eval``: evaluate any policy directory on any manifest; writes ``out`` (JSON).

    Manifest rows: ``{id, text, speaker, audio, prompt_audio, prompt_text}`` (paths relative to the
    manifest). Rows without ``prompt_audio`` get another utterance of the same speaker as prompt
    (at least ``eval.prompt_min_seconds`` long when the speaker has one). ``ecfg``: the judges and the
    sampling settings (an ``eval:`` section; default ``EvalConfig()``). Rows that cannot be evaluated
    (``check_items``: text too long or empty, prompt or reference unreadable or over ``max_seconds``) are
    listed under ``skipped`` with their reasons; the others are scored. ``save_audio``: a folder that gets every
    scored clip as ``<id>.wav``; each row's ``output_audio`` is its clip's path there (None for an output with no
    audio, which has no file).
    """
    import json

    from eval.scorers import EvalConfig, build_scorers
    from models.codec_lm import Policy
    from models.data import choose_prompt, load_manifest
    from models.io import atomic_write_text

    ecfg = ecfg or EvalConfig()
    utts, skips = load_manifest(manifest)
    items = [EvalItem(u.id, u.text, u.speaker, u.audio,
                      u.prompt_audio or choose_prompt(u, utts, seed, min_seconds=ecfg.prompt_min_seconds).audio)
             for u in utts]
    policy = Policy.load(policy_dir, device=device)
    items, bad = check_items(policy, items, max_seconds)
    skipped = [s.__dict__ for s in skips] + bad
    if not items:
        raise ValueError(f"{manifest}: no row can be evaluated ({len(skipped)} skipped; first: "
                         f"{skipped[0]['id'] if skipped else '-'}: {skipped[0]['reason'] if skipped else 'empty manifest'})")
    summary, rows = evaluate_policy(policy, items, scorers=build_scorers(ecfg, device), temperature=ecfg.temperature,
                                    top_k=ecfg.top_k, top_p=ecfg.top_p, seed=seed, batch_size=ecfg.batch_size,
                                    save_audio_dir=None if save_audio is None else Path(save_audio),
                                    save_n=len(items) if save_audio is not None else 0, defect=ecfg.defect,
                                    defect_samples=ecfg.defect_samples)
    if save_audio is not None:
        for r in rows:  # evaluate_policy writes a clip that has samples (an empty output has no file)
            r["output_audio"] = str(Path(save_audio) / f"{r['id']}.wav") if r["duration"] > 0 else None
    result = dict(summary, policy=str(policy_dir), manifest=str(manifest), skipped=skipped, rows=rows)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result
