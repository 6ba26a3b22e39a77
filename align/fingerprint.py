"""The deterministic tier of the CI loop: a training fingerprint against a committed reference.

Two rounds of the loop's trainer (``align.methods.train``, the config's ``train:``/``dpo:`` sections) train the
CI round-0 policy on a fixed set of pairs stored in the reference file (golden streams of clean training recordings
chosen, the same streams with a planted pause rejected; half of them per round, round 2 against round 1 as its
reference), at a fixed seed, and their per-step log is the fingerprint: loss, grad norm, chosen/rejected log-probs
and implicit rewards. No sampling, no judge, no corpus: nothing discrete can branch, so
two machines of one kind differ only by float rounding, and a changed trainer (another beta, learning rate,
reference, loss, scoring, accumulation) moves it far beyond that. Beside it, the sampling fingerprint
(``run_sampling``): the same policy speaks the pairs' texts at the run's decodings, and the mean log-prob of what it
drew (minus its entropy) is compared within the spread of seeds, so a hotter or otherwise changed sampler is seen. As TRL's invariant tests and torchtune's recipe
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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from eval.gate import first_step_violations
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
                    "prompt_codes": ctx.codes(prompt).tolist(),
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


# The sampling fingerprint: the committed round-0 policy speaks the fingerprint's texts at the run's own decodings (the
# pair stage's sample.* and the evaluation's eval.*), SAMPLES_PER_TEXT each, and each sample is scored under the
# policy's temperature-1 emit rule (the distribution it learnt). Its mean per-token log-prob is minus the entropy of
# what was drawn: a hotter temperature, a top-k or top-p dropped or misapplied, another sampler all move it. Unlike
# the training rows, a draw is discrete, so rounding can flip one token on another CPU and the rest of that sample
# with it; the recorded tolerance is therefore the spread of the statistic over seeds (another CPU's rounding is at
# worst another seed's draws), SAMPLING_SDS standard deviations of it.
SAMPLES_PER_TEXT = 2
SAMPLING_SEEDS = 6
SAMPLING_SDS = 4.0
SAMPLING_KEYS = ("logp", "frames")


def decodings(cfg) -> dict[str, list[tuple[float, int, float]]]:
    """Per part of the loop that samples ("sample": the pair stage, "eval": the evaluation), the (temperature,
    top_k, top_p) of each of its ``SAMPLES_PER_TEXT`` samples, as the stages read them from ``cfg``."""
    sample = [cfg.sample.settings(j) for j in range(SAMPLES_PER_TEXT)]  # (temperature, top_p) of sample j
    return {"sample": [(t, cfg.sample.top_k, p) for t, p in sample],
            "eval": [(cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p)] * SAMPLES_PER_TEXT}


def run_sampling(cfg, policy_dir: str | Path, pairs: list[dict], seed: int = 0) -> dict[str, dict[str, float]]:
    """The sampling fingerprint of ``cfg``'s decodings from the policy at ``policy_dir`` on the texts and prompts of
    ``pairs``: per part (``decodings``), ``logp`` (mean over samples of the per-token log-prob under the policy's
    temperature-1 emit rule) and ``frames`` (mean codes per sample)."""
    import numpy as np
    import torch

    from eval.gap import completion_logprobs
    from models.codec_lm import Policy

    policy = Policy.load(policy_dir)
    texts = [p["text"] for p in pairs]
    prompts = [torch.as_tensor(p["prompt_codes"], dtype=torch.long) for p in pairs]
    out = {}
    # One thread: the draws then do not depend on the caller's thread count (a reference recorded anywhere on this
    # machine kind is met to the bit on it), and a tiny model's token-by-token decoding gains nothing from a second
    # thread but its barriers' stalls on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for part, settings in decodings(cfg).items():
            samples, lp = [], []
            for j, (temperature, top_k, top_p) in enumerate(settings):
                drawn = [s[0] for s in policy.generate(texts, prompts, n=1, temperature=temperature, top_k=top_k,
                                                       top_p=top_p, seed=seed * 7919 + j, batch_size=len(texts))]
                samples += drawn
                lp.append(completion_logprobs(policy, texts, prompts, drawn, batch_size=len(texts)))
            lp = np.concatenate(lp)
            out[part] = {"logp": float(np.mean(lp[np.isfinite(lp)])),
                         "frames": float(np.mean([len(policy.format.frames(s)) for s in samples]))}
    finally:
        torch.set_num_threads(before)
    return out


def sampling_tolerances(runs: list[dict]) -> dict:
    """Per part and key: ``SAMPLING_SDS`` x the standard deviation over the seeds' runs (ddof 1)."""
    import numpy as np

    return {part: {key: float(SAMPLING_SDS * np.std([r[part][key] for r in runs], ddof=1)) for key in SAMPLING_KEYS}
            for part in runs[0]}


def compare_sampling(values: dict, reference: dict) -> list[str]:
    """The parts and keys of a sampling fingerprint further from the reference's (its seed-0 run) than their
    tolerance; empty when all are within."""
    bad = []
    for part, ref in reference["values"].items():
        for key in SAMPLING_KEYS:
            diff, tol = values[part][key] - ref[key], reference["tolerance"][part][key]
            if not abs(diff) <= tol:
                bad.append(f"sampling {part} {key} {values[part][key]:.4g} vs {ref[key]:.4g} (|diff| {abs(diff):.3g} > "
                           f"tol {tol:.3g}, {SAMPLING_SDS:g} sd of {len(reference['runs'])} seeds)")
    return bad


@dataclass
class FingerprintResult:
    passed: bool
    message: str
    checks: list[dict]


def compare_fingerprint(rows: list[dict], reference: dict, sft_weight: float = 0.0) -> FingerprintResult:
    """Per key: the max |difference| over steps and |mean difference| against the reference's rows, each within its
    recorded tolerance; the steps must be the same; step 1 as ``eval.gate.first_step_violations``."""
    ref = reference["rows"]
    problems = first_step_violations(rows, sft_weight)
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
    sampling = [run_sampling(cfg, cfg.policy.pretrained, pairs, seed=s) for s in range(SAMPLING_SEEDS)]
    bad = first_step_violations(runs[0], cfg.dpo.sft_weight)
    if bad:
        raise ValueError("refusing to record a fingerprint that breaks the step-1 invariants: " + "; ".join(bad))
    reference = {
        "why": why.strip(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "command": f"speechalign fingerprint {config} --record --why ...", "config": config,
        "overrides": list(overrides or []), "threads": list(threads), "perturbations": perturbations,
        "libraries": library_versions(),
        "policy": str(cfg.policy.pretrained), "policy_digest": dir_digest(cfg.policy.pretrained),
        "rows": runs[0], "tolerance": tolerances(runs),
        "sampling": {"decodings": decodings(cfg), "samples_per_text": SAMPLES_PER_TEXT, "values": sampling[0],
                     "runs": sampling, "tolerance": sampling_tolerances(sampling)},
        "pairs": pairs}
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
    result = compare_fingerprint(rows, ref, cfg.dpo.sft_weight)
    if "sampling" not in ref:
        return result
    bad = compare_sampling(run_sampling(cfg, cfg.policy.pretrained, ref["pairs"]), ref["sampling"])
    if bad:
        head = result.message if not result.passed else "fingerprint FAIL"
        return FingerprintResult(False, f"{head}{': ' if result.passed else '; '}{'; '.join(bad)}", result.checks)
    return FingerprintResult(result.passed, result.message + ("; sampling within tolerance" if result.passed else ""),
                             result.checks)
