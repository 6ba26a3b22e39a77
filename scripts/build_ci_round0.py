"""Build the CI loop's round-0 policy, ``configs/ci_round0/``: configs/ci.yaml's voices, codec and model shapes, trained
on a larger corpus of the same sentence generator long enough to speak, its weights stored in float16 so that the
committed folder stays a few MB. configs/ci.yaml starts from it (``policy.pretrained``), so the CI loop's rounds
align a policy that speaks, in minutes.

    python scripts/build_ci_round0.py        # trains (resumable: runs/ci_round0_build), evaluates, exports

The CI test and dev sentences are the generator's first ones whatever ``corpus.n_sentences`` is, so the policy never
trained on the sentences the CI loop evaluates. ``configs/ci_round0/BUILD.json`` records the command, the round-0
WER/SIM on the CI test split, the seconds and the machine. Rebuild it when the sequence layout or a model's code
changes (Policy.load then refuses the old one and says why).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402  (the CPU model and cores, as every benchmark reports them)

OUT = ROOT / "configs" / "ci_round0"
# What the build trains beyond configs/ci.yaml: a tenfold corpus and a base budget that makes it speak.
BUILD = ["name=ci_round0_build", "out_dir=runs", "rounds=0", "policy.pretrained=null", "corpus.n_sentences=600",
         "base.steps=1200", "base.batch_size=16", "base.warmup_steps=100", "base.nar_steps=2000",
         "base.nar_batch_size=16", "base.log_every=200", "eval.max_utterances=0", "eval.save_audio=0"]


def to_half(folder: Path) -> None:
    """Every float32 tensor of the folder's safetensors files as float16 (loading casts them back)."""
    import torch
    from safetensors.torch import load_file, save_file

    for f in folder.rglob("*.safetensors"):
        if "codec" in f.parts:  # the codec's codebooks define its identity: kept exact
            continue
        state = load_file(str(f))
        save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}, str(f),
                  metadata={"format": "pt"})


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from align.config import load_config
    from align.loop import run_loop
    from models.io import atomic_dir, read_json

    t0 = time.time()
    cfg = load_config(ROOT / "configs" / "ci.yaml", BUILD)
    run = run_loop(cfg)
    summary = read_json(run / "round_000" / "eval" / "summary.json")
    with atomic_dir(OUT) as tmp:
        shutil.copytree(run / "round_000" / "policy", tmp, dirs_exist_ok=True)
        to_half(tmp)
        (tmp / "BUILD.json").write_text(json.dumps({
            "command": "python scripts/build_ci_round0.py", "overrides_of_configs_ci_yaml": BUILD,
            "test_wer": round(summary["wer"], 4), "test_sim": round(summary["sim"], 4), "test_n": summary["n"],
            "seconds": round(time.time() - t0, 1), "machine": machine(),
        }, indent=1) + "\n")
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {size / 1e6:.1f} MB; round-0 test WER {summary['wer']:.3f} SIM {summary['sim']:.3f} (n={summary['n']})")


if __name__ == "__main__":
    main()
