"""The deterministic tier of the CI loop: a training fingerprint against a committed reference.

Two rounds of the loop's trainer (``align.methods.train``, the config's ``train:``/``dpo:`` sections) train the
CI round-0 policy on a fixed set of pairs stored in the reference file (golden streams of clean training recordings
chosen, the same streams with a planted pause rejected; half of them per round, round 2 against round 1 as its
reference), at a fixed seed, and their per-step log is the fingerprint: loss, grad norm, chosen/rejected log-probs
and implicit rewards. No sampling, no judge, no corpus: nothing discrete can branch, so
two machines of one kind differ only by float rounding, and a changed trainer (another beta, learning rate,
reference, loss, scoring, accumulation) moves it far beyond that. As TRL's invariant tests and torchtune's recipe
tests, a fingerprint is compared by the max and the mean of its per-step differences, each within tolerances
recorded from repeated runs (thread counts 1 and 2, and weights perturbed by float32 rounding's size: what
another CPU's arithmetic could leave) and an arithmetic floor.

    rows = run_fingerprint(cfg, policy_dir, pairs)                # [{step, loss, grad_norm, ...}]
    result = compare_fingerprint(rows, reference)                 # .passed, .message
    record_fingerprint(config, out, why="...")                    # the deliberate re-recording (CLI below)

    speechalign fingerprint configs/ci.yaml                        # check against configs/ci_fingerprint.json
    speechalign fingerprint configs/ci.yaml --record --why "..."   # re-record, saying why, into the file

Step 1's policy is its reference, so its implicit rewards are exactly 0 and (with no SFT term) its DPO loss is
ln 2: checked on every run, whatever the reference file says.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.digest import dir_digest, library_versions, machine

log = logging.getLogger("speechalign.fingerprint")

KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")
# The floor of every tolerance: float32 sums over a few thousand terms differ between CPUs by about 1e-6 relative; a
# fingerprint value v is allowed FLOOR_REL x (1 + |v|) whatever the recorded runs showed (they may agree to the bit).
FLOOR_REL = 2e-5


def fingerprint_pairs(ctx, k_policy: Path, n: int, seed: int) -> list[dict]:
    """``n`` pairs from the training split's clean recordings: golden stream chosen, the same with a planted pause
    rejected (align/probes.py), as prompt/chosen/rejected strings of the policy at ``k_policy``."""
    import random

    from align.probes import corrupt, silence_code, word_final_units
    from models.codec_lm import conditioning, read_meta
    from models.layout import format_for

    meta = read_meta(k_policy)
    fmt = format_for(meta)
    defects = set()
    corpus = Path(ctx.splits.train[0].audio).parents[2] / "defects.jsonl"
    if corpus.is_file():
        defects = {json.loads(line)["id"] for line in corpus.read_text().splitlines() if line.strip()}
    clean = [u for u in sorted(ctx.splits.train, key=lambda u: u.id) if u.id not in defects]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(clean, min(n, len(clean))), key=lambda u: u.id)
    silence = silence_code(ctx.codec)
    out = []
    for u in chosen:
        golden = ctx.golden_stream(u, fmt).tolist()
        bad = corrupt(golden, "pause", rng=random.Random(f"fp-{seed}-{u.id}"),
                      word_ends=word_final_units(u.text, meta.get("text_frontend", "chars")), silence=silence,
                      frame_rate=ctx.codec.frame_rate, max_frames=meta.get("max_frames_per_unit"))
        prompt = ctx.prompt_for(u, ctx.splits.train)
        out.append({"id": u.id, "prompt_id": prompt.id, "text": u.text, "keep": True,
                    "prompt": conditioning(meta, ctx.codes(prompt), u.text, ctx.codec.frame_rate),
                    "chosen": fmt.completion_str(golden), "rejected": fmt.completion_str(bad),
                    "scores": {"token_distance": 0.0, "length_ratio": 1.0}})
    return out


def run_fingerprint(cfg, policy_dir: str | Path, pairs: list[dict], work: str | Path | None = None,
                    rounds: int = 2) -> list[dict]:
    """``rounds`` rounds of ``cfg``'s training method from ``policy_dir``, round k on the k-th of ``rounds`` equal
    parts of ``pairs``, in a scratch run directory; returns the trainers' per-step logs (``round``, ``step`` and
    ``KEYS``)."""
    import dataclasses

    from align.loop import stage_seed
    from align.methods import train
    from align.run import Context, RunDir, seed_everything
    from models.io import read_json, write_jsonl

    scratch = Path(work or tempfile.mkdtemp(prefix="fingerprint-"))
    cfg = dataclasses.replace(cfg, out_dir=str(scratch), name="fingerprint", cache_dir=str(scratch / "cache"),
                              rounds=rounds)
    run = RunDir(cfg)
    shutil.copytree(policy_dir, run.policy_dir(0), dirs_exist_ok=True)
    ctx = Context(cfg, run)
    per = len(pairs) // rounds
    out = []
    try:
        for k in range(1, rounds + 1):
            run.pairs_dir(k).mkdir(parents=True, exist_ok=True)
            write_jsonl(run.pairs_dir(k) / "pairs.jsonl", [dict(p, round=k) for p in pairs[(k - 1) * per: k * per]])
            seed_everything(stage_seed(cfg.seed, k, "train"))
            train(ctx, k)
            out += [{"round": k, "step": int(h["step"]), **{key: float(h[key]) for key in KEYS if key in h}}
                    for h in read_json(run.train_dir(k) / "metrics.json")["history"]]
    finally:
        if work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


@dataclass
class FingerprintResult:
    passed: bool
    message: str
    checks: list[dict]


def first_step_checks(rows: list[dict], sft_weight: float) -> list[str]:
    """What step 1 must read whatever was recorded: the policy is its own reference, so the implicit rewards are 0
    and, without an SFT term, the DPO loss is ln 2. Returns the violations."""
    bad = []
    for first in (r for r in rows if r["step"] == 1):  # every round starts from its reference
        k = first.get("round", 1)
        bad += [f"round {k} step 1 {key} = {first[key]:.3g}, not 0 (the policy is its reference at step 1)"
                for key in ("rewards/chosen", "rewards/rejected", "rewards/margins") if abs(first.get(key, 0.0)) > 1e-6]
        if sft_weight == 0 and abs(first["loss"] - math.log(2)) > 1e-5:
            bad.append(f"round {k} step 1 loss = {first['loss']:.6f}, not ln 2 = {math.log(2):.6f} (sigmoid DPO at "
                       "margin 0)")
    return bad


def compare_fingerprint(rows: list[dict], reference: dict, sft_weight: float = 0.0) -> FingerprintResult:
    """Per key: the max |difference| over steps and |mean difference| against the reference's rows, each within its
    recorded tolerance; the steps must be the same; step 1 as ``first_step_checks``."""
    ref = reference["rows"]
    problems = first_step_checks(rows, sft_weight)
    if [(r["round"], r["step"]) for r in rows] != [(r["round"], r["step"]) for r in ref]:
        problems.append(f"(round, step) {[(r['round'], r['step']) for r in rows]} differ from the reference's "
                        f"{[(r['round'], r['step']) for r in ref]}")
        return FingerprintResult(False, "fingerprint FAIL: " + "; ".join(problems), [])
    checks = []
    for key in KEYS:
        if key not in ref[0]:
            continue
        diffs = [r[key] - q[key] for r, q in zip(rows, ref)]
        tol = reference["tolerance"][key]
        worst = max(abs(d) for d in diffs)
        mean = abs(sum(diffs) / len(diffs))
        failed = worst > tol["max"] or mean > tol["mean"]
        checks.append({"key": key, "max_diff": worst, "mean_diff": mean, "tol_max": tol["max"], "tol_mean": tol["mean"],
                       "failed": failed})
        if failed:
            problems.append(f"{key}: max |diff| {worst:.3g} (tol {tol['max']:.3g}), |mean diff| {mean:.3g} "
                            f"(tol {tol['mean']:.3g})")
    if problems:
        return FingerprintResult(False, "fingerprint FAIL: " + "; ".join(problems), checks)
    worst = max(checks, key=lambda c: c["max_diff"] / c["tol_max"])
    return FingerprintResult(True, f"fingerprint PASS: {len(rows)} steps x {len(checks)} keys within tolerance "
                                   f"(closest: {worst['key']} {worst['max_diff']:.3g} of {worst['tol_max']:.3g})",
                             checks)


def tolerances(runs: list[list[dict]]) -> dict:
    """Per key: max and mean tolerances from repeated runs' spread against the first (2x what they showed) and the
    arithmetic floor."""
    out = {}
    first = runs[0]
    for key in KEYS:
        if key not in first[0]:
            continue
        scale = max(abs(r[key]) for r in first)
        floor = FLOOR_REL * (1 + scale)
        spread_max = max((abs(a[key] - b[key]) for run in runs[1:] for a, b in zip(run, first)), default=0.0)
        spread_mean = max((abs(sum(a[key] - b[key] for a, b in zip(run, first)) / len(first)) for run in runs[1:]),
                          default=0.0)
        out[key] = {"max": max(2 * spread_max, floor), "mean": max(2 * spread_mean, floor / 2),
                    "measured_max": spread_max, "measured_mean": spread_mean}
    return out


def perturbed_copy(policy_dir: str | Path, out: Path, seed: int, rel: float = 2.0 ** -23) -> Path:
    """A copy of a policy directory whose LM weights are multiplied by (1 + rel x N(0, 1)): float32 rounding's
    size, as another CPU's arithmetic would leave them after any computation."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(policy_dir, out, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    path = out / "model.safetensors"
    state = {k: v.float() * (1 + rel * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in load_file(str(path)).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return out


def record_fingerprint(config: str, out: str | Path, *, why: str, overrides: list[str] | None = None,
                       n_pairs: int = 16, threads: tuple[int, ...] = (2, 1), perturbations: int = 2) -> dict:
    """Re-record the reference of ``config``: its pairs (from the corpus), the fingerprint at each thread count in
    ``threads`` and from ``perturbations`` copies of the policy with rounding-sized noise in its weights (the spread
    of all of them sets the tolerances: what a CPU whose arithmetic rounds otherwise could move), and ``why`` it was
    re-recorded, into ``out`` (atomically)."""
    import torch

    from align.config import load_config
    from align.run import Context
    from models.io import write_json

    if not why or not why.strip():
        raise ValueError("re-recording the fingerprint needs --why: the reason goes into the file beside the values")
    cfg = load_config(config, overrides or [])
    if not cfg.policy.pretrained:
        raise ValueError(f"{config}: the fingerprint trains from policy.pretrained (the committed round-0 policy)")
    ctx = Context(cfg, None)
    pairs = fingerprint_pairs(ctx, Path(cfg.policy.pretrained), n_pairs, cfg.seed)
    before = torch.get_num_threads()
    runs = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            runs.append(run_fingerprint(cfg, cfg.policy.pretrained, pairs))
    finally:
        torch.set_num_threads(before)
    with tempfile.TemporaryDirectory(prefix="fingerprint-noise-") as tmp:
        for i in range(perturbations):
            runs.append(run_fingerprint(cfg, perturbed_copy(cfg.policy.pretrained, Path(tmp) / f"p{i}", seed=i), pairs))
    bad = first_step_checks(runs[0], cfg.dpo.sft_weight)
    if bad:
        raise ValueError("refusing to record a fingerprint that breaks the step-1 invariants: " + "; ".join(bad))
    reference = {
        "why": why.strip(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "command": f"speechalign fingerprint {config} --record --why ...", "config": config,
        "overrides": list(overrides or []), "threads": list(threads), "perturbations": perturbations,
        "libraries": library_versions(),
        "policy": str(cfg.policy.pretrained), "policy_digest": dir_digest(cfg.policy.pretrained),
        "rows": runs[0], "tolerance": tolerances(runs), "pairs": pairs}
    write_json(out, reference)
    log.info("fingerprint recorded in %s (%d steps, %d pairs): %s", out, len(runs[0]), len(pairs), why)
    return reference


def check_fingerprint(config: str, reference: str | Path, overrides: list[str] | None = None) -> FingerprintResult:
    """Run the fingerprint of ``config`` on the reference's pairs and compare (``compare_fingerprint``)."""
    from align.config import load_config
    from models.io import read_json

    ref = read_json(reference)
    cfg = load_config(config, overrides or [])
    if dir_digest(cfg.policy.pretrained) != ref["policy_digest"]:
        return FingerprintResult(False, f"fingerprint FAIL: {cfg.policy.pretrained} is not the policy {reference} was "
                                        "recorded from; re-record it (speechalign fingerprint --record --why ...)", [])
    rows = run_fingerprint(cfg, cfg.policy.pretrained, ref["pairs"])
    return compare_fingerprint(rows, ref, cfg.dpo.sft_weight)
