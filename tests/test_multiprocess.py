"""configs/ci.yaml (trained from scratch on a small budget, ``SHRINK``) on two CPU processes (gloo) against one: the
same base weights, samples, pairs and evaluations, and a run whose rank dies goes down and resumes.

Both runs are subprocesses of the CLI with one torch thread per process (``threads=1``), so the only
difference between them is the process count, and each keeps its own stage caches (the second would otherwise
read the first's samples and evaluations wherever their weights agree to the bit, and compare cached data).

What is compared is what the weights do, not their last digits: round 1's sampled codes and pairs (from the base
weights, equal to ~2e-6) and round 0's evaluation codes, transcripts and WER identical; SIM within 1e-6 (the speaker
encoder sees other batches); DPO loss within 1e-4 relative; round 1's policies on the same streams (their log-probs
within 5% of what the round changed; measured 1.7%: max 0.005 nats per token against a mean change of 0.30). The weights themselves differ because the all-reduced gradients sum in another order, by an amount
that differs between CPUs of one kind (8e-5 on one machine, 1.41e-4 on another after the same round), so their
bound comes from the optimiser's arithmetic instead: an Adam step moves a weight by at most
lr x max(1, (1 - beta1) / sqrt(1 - beta2)) (Kingma & Ba 2015, sec. 2.1), so two runs that start equal can drift
apart by at most twice the sum of that over the round's steps (``adam_drift_bound``). A real fault (a gradient
not averaged, a step skipped) moves most weights; reduction order moves a few of them by at most that bound, so
the mean difference must also stay a small share of the round's mean update.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "configs" / "ci.yaml"


# configs/ci.yaml trained from scratch on a small base budget (the data-parallel base stage is under test too), one
# round, and batches small enough that every stage deals at least two of them to the two ranks
SHRINK = ["policy.pretrained=null", "base.steps=12", "base.nar_steps=8", "rounds=1", "sample.prompts_per_round=8",
          "sample.batch_size=4", "eval.max_utterances=4", "eval.batch_size=2", "eval.gap_utterances=0",
          # a base of 12 steps babbles: the paper's pairs (one sample each) always exist, judged ones may not
          "pair.strategy=golden_vs_synthetic", "sample.n=1", "eval.defect_samples=2", "eval.probes=0"]


def _cmd(root: Path, name: str, nproc: int) -> list[str]:
    return [sys.executable, "-m", "align.cli", "run", str(CI), "--nproc", str(nproc), "--set", "threads=1",
            *[x for o in SHRINK for x in ("--set", o)],
            "--set", f"out_dir={root}", "--set", f"cache_dir={root / '_cache' / name}",
            "--set", f"data.corpus_dir={root / '_corpus'}", "--set", f"name={name}"]


def _run(root: Path, name: str, nproc: int, codec_from: str | None = None) -> Path:
    if codec_from is not None:  # the codec fitted once (its own cache, not the stages'): the fit is not under test
        shutil.copytree(root / "_cache" / codec_from / "codecs", root / "_cache" / name / "codecs")
    out = subprocess.run(_cmd(root, name, nproc), cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / name


def _round1_logprobs(one: Path, two: Path) -> dict:
    """Mean per-token log-probs [N] of round 1's samples (identical in both runs) under run one's round-0 policy
    (``zero``) and each run's round-1 policy."""
    from align.config import load_config
    from align.run import Context
    from eval.gap import completion_logprobs
    from models.codec_lm import Policy

    ctx = Context(load_config(one / "config.yaml"), None)
    by_id = {u.id: u for u in ctx.splits.train}
    rows = _rows(one / "round_001/samples/samples.jsonl")
    args = ([r["text"] for r in rows], [ctx.codes(by_id[r["prompt_id"]]) for r in rows], [r["codes"] for r in rows])
    return {name: completion_logprobs(Policy.load(d), *args) for name, d in
            (("zero", one / "round_000/policy"), ("one", one / "round_001/policy"), ("two", two / "round_001/policy"))}


def adam_drift_bound(lrs: list[float], betas: tuple[float, float]) -> float:
    """The most two Adam runs that start from the same weights can differ by in any one weight after steps at
    learning rates ``lrs`` (no weight decay): each step moves a weight by at most lr x max(1, (1 - b1)/sqrt(1 - b2))."""
    b1, b2 = betas
    return 2 * sum(lrs) * max(1.0, (1 - b1) / (1 - b2) ** 0.5)


def _cosine_lrs(lr: float, steps: int, warmup: int) -> list[float]:
    """transformers' linear warm-up + cosine schedule, as the DPO round trains with it."""
    import math

    return [lr * (t / max(1, warmup) if t < warmup else
                  0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))) for t in range(steps)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    one = _run(root, "one", 1)  # first: builds the corpus and fits the codec
    two = _run(root, "two", 2, codec_from="one")
    return root, one, two


@pytest.mark.slow  # two CI-config runs from scratch (~130 s on 2 cores): CI runs it with -m slow
def test_two_processes_give_the_one_process_run(runs):
    _, one, two = runs
    assert json.loads((two / "round_001" / "samples" / "stats.json").read_text())["processes"] == 2
    for k in (1,):
        a, b = _rows(one / f"round_{k:03d}/samples/samples.jsonl"), _rows(two / f"round_{k:03d}/samples/samples.jsonl")
        assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 8
        assert [r["codes"] for r in a] == [r["codes"] for r in b], f"round {k}: samples differ"
        a, b = _rows(one / f"round_{k:03d}/pairs/pairs.jsonl"), _rows(two / f"round_{k:03d}/pairs/pairs.jsonl")
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in a] == \
               [(p["prompt"], p["chosen"], p["rejected"]) for p in b], f"round {k}: pairs differ"
    # nothing of run two was read from a cache: it computed what it is compared on
    assert json.loads((two / "round_001" / "samples" / "stats.json").read_text())["cached_tokens"] == 0
    for k in (0, 1):
        assert json.loads((two / f"round_{k:03d}/eval/summary.json").read_text())["cached_batches"] == 0
    # round 0 (base weights within ~2e-6): the same evaluation, token for token
    a, b = _rows(one / "round_000/eval/rows.jsonl"), _rows(two / "round_000/eval/rows.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["codes"] for r in a] == [r["codes"] for r in b], "round 0: evaluated codes differ"
    assert [r["hypothesis"] for r in a] == [r["hypothesis"] for r in b]
    assert max(abs(x["sim"] - y["sim"]) for x, y in zip(a, b)) < 1e-6
    # round 1: its two policies differ by Adam's reduction-order drift (below), and a policy that differs at all can
    # flip a sampled token where two are near-tied; so what they do is compared on the same streams: the per-token
    # log-probs each gives round 1's samples differ by a small share of what the round itself changed
    lp = _round1_logprobs(one, two)
    moved = float(np.abs(lp["one"] - lp["zero"]).mean())
    assert float(np.abs(lp["one"] - lp["two"]).max()) <= 0.05 * moved, (lp, moved)
    # round 1's weights: within what DPO's optimiser can drift in its steps, and the round's update on average
    from align.config import load_config

    cfg = load_config(CI, SHRINK)
    dcfg = cfg.dpo
    lrs = _cosine_lrs(dcfg.learning_rate, dcfg.steps, int(dcfg.warmup_ratio * dcfg.steps))
    w0 = {k: load_file(str(r / "round_000/policy/model.safetensors")) for k, r in (("one", one), ("two", two))}
    wa = load_file(str(one / "round_001/policy/model.safetensors"))
    wb = load_file(str(two / "round_001/policy/model.safetensors"))
    start = max(float((w0["one"][n] - w0["two"][n]).abs().max()) for n in wa)  # the base stages' own difference
    drift = max(float((wa[n] - wb[n]).abs().max()) for n in wa)
    assert drift <= start + adam_drift_bound(lrs, (0.9, 0.999)), f"round 1 weights differ by {drift}"
    total = sum(x.numel() for x in wa.values())
    mean_diff = sum(float((wa[n] - wb[n]).abs().sum()) for n in wa) / total
    mean_update = sum(float((wa[n] - w0["one"][n]).abs().sum()) for n in wa) / total
    assert mean_diff <= 0.05 * mean_update, (mean_diff, mean_update)
    ma, mb = _rows(one / "metrics.jsonl"), _rows(two / "metrics.jsonl")
    assert [m["round"] for m in ma] == [m["round"] for m in mb] == [0, 1]
    assert ma[0]["wer"] == mb[0]["wer"] and abs(ma[0]["sim"] - mb[0]["sim"]) < 1e-6
    # round 1's training on the same pairs from (nearly) the same weights: its loss to 1% (measured 0.03%)
    assert abs(ma[1]["dpo_loss"] - mb[1]["dpo_loss"]) <= 1e-2 * abs(ma[1]["dpo_loss"])
    # rank 0 alone wrote the run's files: one log, no stray temp folders
    assert not list(two.rglob("*.tmp[0-9]*"))
    assert (two / "log.txt").read_text().count("round 1: evaluate") == 1


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "align.cli" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow  # a third and fourth two-process run (~35 s): CI runs it with -m slow
def test_a_killed_rank_takes_the_run_down_and_the_same_command_resumes(runs):
    root, _, two = runs
    name = "killed"
    from align.config import load_config

    cmd = _cmd(root, name, 2)
    shutil.copytree(root / "_cache" / "one" / "codecs", root / "_cache" / name / "codecs")
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = root / name / "state.json"
    deadline = time.time() + 900
    try:  # wait until round 1 is under way (its samples are written), then kill rank 1 mid-round
        while time.time() < deadline and launcher.poll() is None:
            if state.is_file() and "sample" in json.loads(state.read_text())["done"].get("1", {}):
                break
            time.sleep(0.2)
        assert launcher.poll() is None, "the run finished before it could be killed"
        pid = _rank_pid(launcher, 1)
        assert pid is not None, "rank 1 not found among the launcher's children"
        os.kill(pid, signal.SIGKILL)
        rc = launcher.wait(timeout=300)  # the launcher stops rank 0 too: nobody waits forever at a barrier
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert rc != 0
    done = json.loads(state.read_text())["done"]
    assert "evaluate" not in done.get("1", {}), "the run was not cut off"

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    ma, mb = _rows(two / "metrics.jsonl"), _rows(root / name / "metrics.jsonl")
    assert [m["round"] for m in mb] == [0, 1]
    assert ma[0]["wer"] == mb[0]["wer"] and abs(ma[0]["sim"] - mb[0]["sim"]) < 1e-6
    for k in (1,):
        a = _rows(two / f"round_{k:03d}/pairs/pairs.jsonl")
        b = _rows(root / name / f"round_{k:03d}/pairs/pairs.jsonl")
        assert [(p["chosen"], p["rejected"]) for p in a] == [(p["chosen"], p["rejected"]) for p in b]
    wa = load_file(str(two / "round_001/policy/model.safetensors"))
    wb = load_file(str(root / name / "round_001/policy/model.safetensors"))
    cfg = load_config(CI, SHRINK)
    lrs = _cosine_lrs(cfg.dpo.learning_rate, cfg.dpo.steps, int(cfg.dpo.warmup_ratio * cfg.dpo.steps))
    assert max(float((wa[n] - wb[n]).abs().max()) for n in wa) <= adam_drift_bound(lrs, (0.9, 0.999))


def test_batches_are_cut_before_they_are_dealt():
    from align.dist import Ranks

    one = Ranks().batches(10, 3)
    assert one == [(0, 3), (3, 6), (6, 9), (9, 10)]
    dealt = [Ranks(rank=r, world=3).batches(10, 3) for r in range(3)]
    assert dealt == [[(0, 3), (9, 10)], [(3, 6)], [(6, 9)]]
    assert sorted(b for part in dealt for b in part) == one  # every batch once, the same cuts as one process
    assert Ranks(rank=1, world=2, local_rank=1).device("cuda") == "cuda:1" and Ranks().device("cuda") == "cuda"
