"""The set-up every benchmark script shares: the repository on sys.path, logging, the machine's description,
and writing a results pair (Markdown + JSON) into benchmarks/results/.

    from common import ROOT, arg_parser, machine, write_results   # (benchmarks/ is the script's own folder)
    args = arg_parser(__doc__).parse_args()
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose help is the script's docstring; logging set up as the CLI's; the working directory
    the repository's root, which the configs' relative paths (runs/, configs/ci_round0) are relative to."""
    os.chdir(ROOT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "datasets", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def machine() -> str:
    """The CPU model (lscpu) and core count: every time a benchmark reports goes with it (``models.digest.machine``)."""
    from models.digest import machine as _machine

    return _machine()


def write_results(name: str, markdown: str, data: dict) -> Path:
    """benchmarks/results/<name>.md and .json (atomically); returns the Markdown's path."""
    from models.io import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(data, indent=1, default=str) + "\n")
    atomic_write_text(RESULTS / f"{name}.md", markdown.rstrip() + "\n")
    return RESULTS / f"{name}.md"
