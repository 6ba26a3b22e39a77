"""The embedded evaluators on real recordings: pocketsphinx WER, DNSMOS, speaker separation.

    python benchmarks/real_speech.py [--manifest tests/data/real_speech/manifest.jsonl]

Reads any JSONL/CSV manifest ``{id, audio, text, speaker}`` (default: the 13 real recordings of 3
speakers in ``tests/data/real_speech``, copied from the shared test data) and reports, per utterance and overall:

* pocketsphinx corpus WER (``eval.asr``, the normaliser of ``eval/text.py``);
* DNSMOS P.808 MOS and P.835 SIG/BAK/OVRL (``eval.quality``, speechmos's ONNX models);
* speaker similarity of every embedded encoder (resemblyzer; ECAPA / WavLM-SV too when
  ``--ecapa DIR`` / ``--wavlm DIR`` name local models): the mean cosine over all same-speaker
  pairs vs all different-speaker pairs.

Writes ``benchmarks/results/real_speech.{md,json}``. The product never needs these recordings; this
script only measures the evaluators the loop relies on.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

import numpy as np  # noqa: E402

log = logging.getLogger("speechalign.bench")


def speaker_separation(name: str, encoder, wavs: list[np.ndarray], speakers: list[str]) -> dict:
    """Mean cosine of same-speaker and of different-speaker pairs (every unordered pair once)."""
    emb = encoder.embed(wavs)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    same, diff = [], []
    for i, j in itertools.combinations(range(len(wavs)), 2):
        (same if speakers[i] == speakers[j] else diff).append(float(emb[i] @ emb[j]))
    return {"encoder": name, "same_speaker": round(float(np.mean(same)), 4), "n_same": len(same),
            "different_speaker": round(float(np.mean(diff)), 4), "n_different": len(diff),
            "min_same": round(min(same), 4), "max_different": round(max(diff), 4)}


def main() -> None:
    import soundfile as sf

    from models.audio import load_audio, resample
    from models.data import load_manifest
    from eval.asr import PocketSphinxASR, corpus_wer, utterance_wer
    from eval.quality import DNSMOS
    from eval.speaker import build_speaker_encoder

    parser = arg_parser(__doc__)
    parser.add_argument("--manifest", default=str(ROOT / "tests" / "data" / "real_speech" / "manifest.jsonl"))
    parser.add_argument("--ecapa", default=None, help="local speechbrain ECAPA folder (hyperparams.yaml + ckpts)")
    parser.add_argument("--wavlm", default=None, help="local WavLMForXVector folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_speech"))
    args = parser.parse_args()

    utts, skips = load_manifest(args.manifest)
    if skips:
        log.warning("%d manifest rows skipped: %s", len(skips), [s.id for s in skips])
    rates = sorted({sf.info(u.audio).samplerate for u in utts})
    wavs = [load_audio(u.audio, 16000) for u in utts]
    t0 = time.time()
    hyps = PocketSphinxASR().transcribe(wavs)
    t_asr = time.time() - t0
    t0 = time.time()
    mos = DNSMOS(p835=True).score(wavs)
    t_mos = time.time() - t0
    rows = [{"id": u.id, "speaker": u.speaker, "seconds": round(len(w) / 16000, 2), "text": u.text, "hypothesis": h,
             "wer": round(utterance_wer(u.text, h), 4), **{k: round(v, 3) for k, v in m.items()}}
            for u, w, h, m in zip(utts, wavs, hyps, mos)]
    summary = {"n": len(utts), "speakers": len({u.speaker for u in utts}), "source_rates_hz": rates,
               "wer": round(corpus_wer([u.text for u in utts], hyps), 4),
               **{k: round(float(np.mean([m[k] for m in mos])), 3) for k in mos[0]},
               "asr_seconds": round(t_asr, 1), "dnsmos_seconds": round(t_mos, 1)}

    encoders = [("resemblyzer", {})]
    if args.ecapa:
        encoders.append(("ecapa", {"model": args.ecapa}))
    if args.wavlm:
        encoders.append(("wavlm", {"model": args.wavlm}))
    speakers = [u.speaker for u in utts]
    separation = []
    for name, kw in encoders:
        enc = build_speaker_encoder(name, **kw)
        separation.append(speaker_separation(name, enc, [resample(w, 16000, enc.sample_rate) for w in wavs], speakers))

    machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "speakers": separation, "rows": rows,
                                                    "machine": machine}, indent=1) + "\n")
    md = ["# Embedded evaluators on real recordings", "",
          f"`python benchmarks/real_speech.py`: {summary['n']} recordings of {summary['speakers']} speakers "
          f"({Path(args.manifest).parent.name}, source rates {', '.join(map(str, rates))} Hz, resampled to 16 kHz).",
          "WER: pocketsphinx (its shipped English model) + jiwer, references and hypotheses normalised by "
          "`eval/text.py`; DNSMOS: speechmos's P.808 model (`dnsmos`) and P.835 model (SIG/BAK/OVRL), "
          "mean over 9 s windows; speaker rows: mean cosine over all same-speaker and all different-speaker "
          "pairs.", "",
          "| n | corpus WER | DNSMOS P.808 | SIG | BAK | OVRL | ASR s | DNSMOS s |", "|---|---|---|---|---|---|---|---|",
          f"| {summary['n']} | {summary['wer']} | {summary['dnsmos']} | {summary['dnsmos_sig']} | "
          f"{summary['dnsmos_bak']} | {summary['dnsmos_ovrl']} | {summary['asr_seconds']} | "
          f"{summary['dnsmos_seconds']} |", "",
          "| encoder | same speaker | different speaker | min same | max different | pairs same / different |",
          "|---|---|---|---|---|---|"]
    md += [f"| {s['encoder']} | {s['same_speaker']} | {s['different_speaker']} | {s['min_same']} | "
           f"{s['max_different']} | {s['n_same']} / {s['n_different']} |" for s in separation]
    md += ["", "| id | speaker | s | WER | DNSMOS | hypothesis |", "|---|---|---|---|---|---|"]
    md += [f"| {r['id']} | {r['speaker']} | {r['seconds']} | {r['wer']} | {r['dnsmos']} | {r['hypothesis']} |"
           for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
