import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL_SPEECH = REPO.parent / "shared" / "data" / "real_speech"

# Two cores on CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def real_speech_dir() -> Path:
    """The 13 real recordings shipped in ../shared/data/real_speech (3 speakers, 16 and 22.05 kHz)."""
    if not (REAL_SPEECH / "manifest.jsonl").exists():
        pytest.skip(f"real recordings not found at {REAL_SPEECH}")
    return REAL_SPEECH


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("speechalign").setLevel(logging.INFO)
    yield


@pytest.fixture(scope="session")
def ci_overrides(tmp_path_factory):
    """Config overrides that keep CI runs, their corpus and caches in one session temp folder."""
    root = tmp_path_factory.mktemp("ci_runs")
    return [f"out_dir={root}", f"cache_dir={root / '_cache'}", f"data.corpus_dir={root / '_corpus'}"]


CI_CONFIG = REPO / "configs" / "ci.yaml"


@pytest.fixture(scope="session")
def ci_run(ci_overrides):
    """The CI loop (configs/ci.yaml) run once per session; tests read its run directory."""
    from align.config import load_config
    from align.loop import run_loop

    torch.set_num_threads(2)
    return run_loop(load_config(CI_CONFIG, ci_overrides))
