"""SIGKILL, then resume: `python -m align.cli run configs/ci.yaml` killed at seeded random moments and
twice in the middle of round 1's DPO (the moment a trainer checkpoint folder appears, i.e. mid-save;
and once a checkpoint is complete), re-run after every kill until it finishes, must end with the
uninterrupted run's metrics (timings aside) and bit-identical policies in every round.

The uninterrupted run is the session's ``ci_run`` (shared with tests/test_loop.py), and the corpus is shared with
it (not the stage caches: the killed run computes and keeps its own batches), so only the loop itself is repeated:
the killed run's five attempts took 5 min on 2 cores shared with other jobs (load 3-4), where an idle
machine runs ci.yaml through in about a minute; plus ``ci_run`` when no earlier test has made it.
"""
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import CI_CONFIG, REPO

# One kill per attempt: (what must appear first, then how many more seconds, seeded where random).
# Events, not wall-clock offsets from the start, so the kills land in the same stages on a busy machine
# (a CI run of several minutes) and an idle one (under a minute):
#   config.yaml          the run directory was just set up: the kill lands in round 0's base stage
#   checkpoint           a round-1 trainer checkpoint folder, killed the moment it appears (mid-DPO, and
#                        as likely as not mid-save: transformers writes the folder in place)
#   checkpoint_complete  one with its trainer_state.json (written last): the resume goes on from it
#   round_002            the second round started (its sampling, pairs, DPO or evaluation)
RNG = random.Random(15)
SCHEDULE = [("config.yaml", RNG.uniform(1.0, 6.0)), ("checkpoint", 0.0), ("checkpoint_complete", 0.05),
            ("round_002", RNG.uniform(0.5, 4.0))]
MAX_ATTEMPTS = 8


def _timing_key(key: str) -> bool:
    return key == "seconds" or "seconds" in key or "per_second" in key or key.startswith("sec_")


def _strip_timing(x):
    """metrics.jsonl row(s) without wall-clock fields, numbers kept exactly as written."""
    if isinstance(x, dict):
        return {k: _strip_timing(v) for k, v in x.items() if not _timing_key(k)}
    if isinstance(x, list):
        return [_strip_timing(v) for v in x]
    return x


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trainer_checkpoints(run_dir: Path) -> list[Path]:
    # the training stage's work folder is round_k/train/ (round_k/dpo/ in older code)
    return sorted(run_dir.glob("round_001/*/trainer/checkpoint-*"))


def _start(cmd, env, log):
    # a session of its own: the kill takes any worker processes with it
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow  # ~100 s with its own stage caches: in `python -m pytest -m slow`, which CI (.ci/run) runs; the fast
# suite keeps the in-process kill tests (tests/test_loop.py, tests/test_batch_resume.py)
def test_sigkilled_run_resumes_to_identical_metrics_and_weights(ci_run, ci_overrides, tmp_path):
    # the same thread count as this process (which ran ci_run), set the same way (torch.set_num_threads, which
    # conftest calls; OMP_NUM_THREADS alone gave the interleaved AR other float reductions): sums then add up alike
    threads = str(torch.get_num_threads())
    # its own cache folder: with ci_run's, its sampling, judging and evaluations are read from ci_run's cached batches
    # and round 1 can end before the first kill lands (the CI failure "the DPO kills did not land"); the corpus is
    # still shared (data.corpus_dir)
    overrides = [o for o in ci_overrides if not o.startswith("cache_dir=")] + [
        f"cache_dir={tmp_path / 'cache'}", "name=ci_killed", f"threads={threads}"]
    cmd = [sys.executable, "-m", "align.cli", "run", str(CI_CONFIG)] + [x for o in overrides for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    run_dir = Path(next(o.split("=", 1)[1] for o in ci_overrides if o.startswith("out_dir="))) / "ci_killed"
    assert not run_dir.exists()

    def appeared(what: str) -> bool:
        if what == "checkpoint":
            return bool(_trainer_checkpoints(run_dir))
        if what == "checkpoint_complete":  # transformers writes trainer_state.json last
            return any((c / "trainer_state.json").exists() for c in _trainer_checkpoints(run_dir))
        return (run_dir / what).exists()

    kills, dpo_kills, t_all = [], [], time.time()
    for attempt in range(MAX_ATTEMPTS):
        what, delay = SCHEDULE[attempt] if attempt < len(SCHEDULE) else (None, None)
        with open(tmp_path / f"attempt_{attempt}.log", "w") as log:
            proc = _start(cmd, env, log)
            t0, seen = time.time(), None
            while proc.poll() is None and what is not None:
                if seen is None and appeared(what):
                    seen = time.time()
                if seen is not None and time.time() - seen >= delay:
                    break
                time.sleep(0.02)
            if proc.poll() is None and what is not None:  # still running: this is the moment
                _kill(proc)
                kills.append((attempt, what, round(time.time() - t0, 1)))
                if what.startswith("checkpoint"):
                    dpo_kills.append(sorted(p.name for p in _trainer_checkpoints(run_dir)))
                continue
            proc.wait()
        tail = (tmp_path / f"attempt_{attempt}.log").read_text()[-3000:]
        assert proc.returncode == 0, f"attempt {attempt} (kill after {what}) exited {proc.returncode}:\n{tail}"
        break  # finished
    else:
        pytest.fail(f"the run did not finish in {MAX_ATTEMPTS} attempts; kills: {kills}")
    wall = time.time() - t_all

    # both DPO kills landed inside the training stage, each with a trainer checkpoint folder on disk
    assert len(dpo_kills) == 2 and all(dpo_kills), f"the DPO kills did not land: kills {kills}"
    assert len(kills) >= 3, kills

    want, got = _rows(ci_run), _rows(run_dir)
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2]
    for a, b in zip(_strip_timing(want), _strip_timing(got)):
        assert a == b, (a, b)
        assert all(math.isfinite(v) for v in a.values() if isinstance(v, float))
    for k in range(3):
        name = f"round_{k:03d}/policy/model.safetensors"
        assert _sha(run_dir / name) == _sha(ci_run / name), name
    # nothing of the killed trainers is left behind
    assert not _trainer_checkpoints(run_dir)
    print(f"kills {kills}, DPO killed with {dpo_kills} on disk; {wall:.0f} s for all attempts")
