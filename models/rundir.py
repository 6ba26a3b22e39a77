"""The layout of a run directory: every path a stage reads or writes, and nothing else.

    runs/<name>/config.yaml state.json metrics.jsonl log.txt skipped.jsonl
    runs/<name>/round_000/policy/ eval/ base.json
    runs/<name>/round_001/samples/ pairs/ train/ eval/ policy/

``align.run.RunDir`` adds the config, ``state.json`` and the log on top; evaluators' tools
(``eval/``) read run directories through this class alone, so they need no training code.
"""
from __future__ import annotations

from pathlib import Path


class RunLayout:
    """Paths of the run directory at ``root`` (nothing is created or read)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def round_dir(self, k: int) -> Path:
        return self.root / f"round_{k:03d}"

    def policy_dir(self, k: int) -> Path:
        """Round k's policy (round 0: the base stage's); what round k+1 samples from."""
        return self.round_dir(k) / "policy"

    def base_json(self) -> Path:
        return self.round_dir(0) / "base.json"

    def samples_dir(self, k: int) -> Path:
        return self.round_dir(k) / "samples"

    def pairs_dir(self, k: int) -> Path:
        return self.round_dir(k) / "pairs"

    def train_dir(self, k: int) -> Path:
        """The training stage's work folder: metrics.json, and a trainer checkpoint while it runs."""
        return self.round_dir(k) / "train"

    def eval_dir(self, k: int) -> Path:
        return self.round_dir(k) / "eval"

    def rounds(self) -> list[int]:
        """Rounds that have a folder, in order (contiguous from 0)."""
        out = []
        while self.round_dir(len(out)).exists():
            out.append(len(out))
        return out
