"""SpeechGPT-Gen on the embedded default, as a user runs it: base (both halves), rounds, tts, vc.

    OMP_NUM_THREADS=2 python benchmarks/speechgpt_gen_tiny.py [--set rounds=1] [--set key=value ...]

1. ``configs/speechgpt-gen-tiny.yaml`` through ``run_loop`` (the loop ``speechalign run`` calls): round 0
   trains the AR semantic LM and the flow-matching renderer, rounds >= 1 align the AR half;
2. ``speechalign tts`` and ``speechalign vc`` on the final policy (first test utterance's text,
   another utterance of its speaker as the prompt; vc converts a different speaker's recording);
   both outputs are scored like an evaluation (pocketsphinx WER against the text that was
   spoken, resemblyzer SIM to the prompt speaker's real recording).
Writes ``benchmarks/results/speechgpt_gen_tiny.{md,json}``. A finished run is resumed, not redone.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from common import ROOT, arg_parser  # noqa: E402  (the repository on sys.path, logging)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from align.config import load_config  # noqa: E402
from align.loop import run_loop  # noqa: E402
from align.run import Context  # noqa: E402
from eval.compare import compare_runs, to_markdown  # noqa: E402

log = logging.getLogger("speechalign.bench")


def score(wav: np.ndarray, sr: int, text: str, reference: str, asr, speaker) -> dict:
    from models.audio import load_audio
    from eval.evaluate import score_wavs

    means, hyps, _ = score_wavs([wav], sr, [text], [load_audio(reference, speaker.sample_rate)], asr=asr,
                                speaker=speaker)
    return {"text": text, "hypothesis": hyps[0], **means, "seconds_audio": round(len(wav) / sr, 2)}


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "speechgpt-gen-tiny.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speechgpt_gen_tiny"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from models.audio import load_audio
    from models.inference import convert_voice, synthesize_tts

    cfg = load_config(args.config, args.set)
    t0 = time.time()
    run_dir = run_loop(cfg)
    loop_seconds = time.time() - t0
    ctx = Context(cfg, None)
    test = ctx.splits.test
    target = test[0]
    prompt = next(u for u in test if u.speaker == target.speaker and u.text != target.text)
    source = next(u for u in test if u.speaker != target.speaker)
    policy = run_dir / f"round_{cfg.rounds:03d}" / "policy"
    out_dir = run_dir / "inference"
    out_dir.mkdir(exist_ok=True)

    t0 = time.time()
    synthesize_tts(policy, target.text, prompt.audio, out_dir / "tts.wav", seed=cfg.seed)
    tts_s = time.time() - t0
    t0 = time.time()
    convert_voice(policy, source.audio, prompt.audio, out_dir / "vc.wav")
    vc_s = time.time() - t0
    from eval.asr import PocketSphinxASR
    from eval.speaker import ResemblyzerSpeaker

    sr, asr, spk = ctx.codec.sample_rate, PocketSphinxASR(), ResemblyzerSpeaker()
    results = {
        "tts": {"prompt": prompt.id, **score(load_audio(out_dir / "tts.wav", sr), sr, target.text, target.audio,
                                             asr, spk),
                "wall_seconds": round(tts_s, 2)},
        "vc": {"source": source.id, "prompt": prompt.id,
               **score(load_audio(out_dir / "vc.wav", sr), sr, source.text, target.audio, asr, spk),
               "wall_seconds": round(vc_s, 2)},
    }
    df = compare_runs([run_dir])
    state = json.loads((run_dir / "state.json").read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rounds": json.loads(df.to_json(orient="records")),
                                                    "inference": results, "loop_seconds": round(loop_seconds, 1),
                                                    "state": state}, indent=1) + "\n")
    md = ["# SpeechGPT-Gen tiny: both halves, alignment rounds, tts and vc", "",
          f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/speechgpt_gen_tiny.py "
          f"{' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}); "
          f"this invocation's loop took {loop_seconds / 60:.1f} min (0 if the run had finished before). "
          "WER: pocketsphinx corpus WER on the test split; SIM: resemblyzer cosine to a real recording of the "
          "target speaker; the flow model renders every round's RVQ-1 (rounds >= 1 align the AR half only).", "",
          to_markdown(df), "",
          "| command | input | WER | SIM | audio s | wall s | hypothesis |", "|---|---|---|---|---|---|---|",
          f"| tts | text of {target.id}, prompt {prompt.id} | {results['tts']['wer']} | {results['tts']['sim']} | "
          f"{results['tts']['seconds_audio']} | {results['tts']['wall_seconds']} | {results['tts']['hypothesis']} |",
          f"| vc | source {source.id}, prompt {prompt.id} | {results['vc']['wer']} | {results['vc']['sim']} | "
          f"{results['vc']['seconds_audio']} | {results['vc']['wall_seconds']} | {results['vc']['hypothesis']} |", "",
          "vc keeps the source's RVQ-1 (its words) and takes the prompt's voice: its WER is against the source's "
          "text, its SIM against the prompt speaker.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
