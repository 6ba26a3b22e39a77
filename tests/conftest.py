import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# 13 real recordings vendored from the project's shared fixtures (sources and licences in its README).
REAL_SPEECH = REPO / "tests" / "data" / "real_speech"

# Two cores on CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def real_speech_dir() -> Path:
    """The 13 real recordings in tests/data/real_speech (3 speakers, 16 and 22.05 kHz).

    They are part of the repository, so a missing file is a broken checkout: fail, never skip.
    Session-scoped so module-scoped fixtures can use it too.
    """
    manifest = REAL_SPEECH / "manifest.jsonl"
    if not manifest.is_file():
        pytest.fail(f"{manifest} is missing: the real recordings are part of the repository; "
                    "restore them with `git checkout -- tests/data/real_speech`", pytrace=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    missing = [r["audio"] for r in rows if not (REAL_SPEECH / r["audio"]).is_file()]
    if len(rows) != 13 or missing:
        pytest.fail(f"{REAL_SPEECH}: expected 13 recordings, manifest lists {len(rows)}, missing {missing}; "
                    "restore them with `git checkout -- tests/data/real_speech`", pytrace=False)
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
