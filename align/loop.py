"""The SpeechAlign loop, top to bottom.

    round 0:        base (train or copy the starting policy) -> evaluate
    round k >= 1:   sample -> pair -> train -> evaluate        (round k-1's policy is the reference)

The 'train' stage trains round k's policy with ``train.method`` (align/methods.py: dpo, sft_control,
reward_bon, grpo, coh). Older run directories, where it was called 'dpo', are renamed on resume.

After every finished round, ``metrics.jsonl`` is rebuilt from the rounds' own summary files, so it
never holds a duplicate row after a resume.

Under ``accelerate launch --num_processes N`` every rank walks the same plan: ``sample``, ``evaluate`` and
the pair stage's judging split their items across ranks and gather them to rank 0, ``train`` and ``base``
train data-parallel, and rank 0 alone writes ``state.json``, ``metrics.jsonl`` and every stage's folder,
with a barrier after every stage (align/dist.py). A rank that dies makes the launcher stop the others; the same command
resumes the run at its first unfinished stage.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from align import methods, stages
from align.base import run_base_stage
from align.config import RunConfig
from align.run import LEGACY_TRAIN_STAGE, Context, RunDir, seed_everything
from models.io import read_json, write_json, write_jsonl

log = logging.getLogger("speechalign")

ROUND_STAGES = ("sample", "pair", "train", "evaluate")
STAGE_FNS = {"sample": stages.sample, "pair": stages.pair, "train": methods.train, "evaluate": stages.evaluate}
# Stages whose work is one process's: the others wait at the barrier after them. (None today: the pair stage
# shares its judging out, as sample and evaluate share theirs.)
MAIN_ONLY_STAGES: frozenset[str] = frozenset()
# Each stage's seed offset, fixed per name: adding a stage moves no other stage's seed. (The values
# are the ones the earlier rule -- the index in the sorted stage names -- gave, so results match.)
STAGE_SEED_OFFSETS = {"train": 0, "evaluate": 1, "pair": 2, "sample": 3}


def stage_seed(seed: int, k: int, name: str) -> int:
    """The seed a stage runs under: a function of (run seed, round, stage) alone, so a resumed stage
    draws the same numbers. Round 0's base stage runs under the run seed itself."""
    if name not in STAGE_SEED_OFFSETS:
        return seed
    return seed * 7919 + k * 101 + STAGE_SEED_OFFSETS[name]


def _base(ctx: Context, k: int) -> dict:
    assert k == 0
    out = ctx.run.policy_dir(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = run_base_stage(ctx, out)
    if ctx.ranks.is_main:
        write_json(ctx.run.base_json(), stats)
    return stats


ROUND0_STAGES = {"base": _base, "evaluate": stages.evaluate}


def run_loop(cfg: RunConfig, only_stage: str | None = None, stop_after: str | None = None) -> Path:
    """Run (or resume) a whole run; returns its directory.

    only_stage: re-run just this stage of every round that reaches it (its output is replaced).
    stop_after: "k:stage" — stop once that stage is done (used by tests to simulate a crash).
    """
    if only_stage == LEGACY_TRAIN_STAGE:
        only_stage = "train"
    methods.check_loss_type(cfg.dpo.loss_type)
    run = RunDir(cfg)
    ctx = Context(cfg, run)
    log.info("run %s: %d rounds, device %s", run.root, cfg.rounds, ctx.device)
    _prepare_on_main(ctx)
    plan = [(0, name, fn) for name, fn in ROUND0_STAGES.items()]
    plan += [(k, name, STAGE_FNS[name]) for k in range(1, cfg.rounds + 1) for name in ROUND_STAGES]
    for k, name, fn in plan:
        if only_stage is not None and name != only_stage:
            continue
        if run.done(k, name) and only_stage is None:
            continue
        reads = run.policy_dir(k if name in ("base", "evaluate") else k - 1)
        if name != "base" and (reads / "speechalign.json").is_file():
            ctx.check_codec(reads)  # its tokens and the run's golden tokens must index one codebook
        seed_everything(stage_seed(cfg.seed, k, name))
        log.info("round %d: %s", k, name)
        t0 = time.time()
        if name not in MAIN_ONLY_STAGES or run.ranks.is_main:
            fn(ctx, k)
        run.mark_done(k, name, time.time() - t0)
        if name == "evaluate" and run.ranks.is_main:
            write_metrics(run)
        if stop_after == f"{k}:{name}":
            log.info("stopping after %s as asked", stop_after)
            return run.root
    if run.ranks.is_main:
        write_metrics(run)
    return run.root


def _prepare_on_main(ctx: Context) -> None:
    """With several processes, rank 0 builds the corpus and fits the codec (cached) before the others
    load them, so N processes do not synthesise or fit the same files side by side."""
    if ctx.ranks.world == 1:
        return
    if ctx.ranks.is_main:
        ctx.splits, ctx.codec  # noqa: B018 (built and cached on first access)
    ctx.ranks.barrier()


def round_row(run: RunDir, k: int) -> dict | None:
    """One metrics row: eval summary + DPO/pair/sample stats + wall time per stage."""
    summary_path = run.eval_dir(k) / "summary.json"
    if not summary_path.exists():
        return None
    summary = read_json(summary_path)
    row = {"round": k, "wer": summary["wer"], "sim": summary["sim"], "n_eval": summary["n"],
           "empty_outputs": summary.get("empty_outputs", 0), "mean_duration": summary.get("mean_duration"),
           "defect_rate": summary.get("defect_rate"), "defect_n": summary.get("defect_n")}
    for key in ("dnsmos", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "utmos", "gap_auc", "gap_logp_margin",
                "gap_logp_golden", "gap_logp_synthetic", "probe_accuracy", "probe_margin", "probe_accuracy_pause",
                "probe_margin_pause", "probe_n", "per", "ear_nll"):
        if key in summary:  # optional: quality where scored, the gap where eval.gap_utterances > 0
            row[key] = summary[key]
    if summary.get("extra"):  # eval.extra_sets: {set name: {wer, sim, dnsmos, utmos, n}} per round
        row["extra"] = summary["extra"]
    train_path = run.train_dir(k) / "metrics.json"
    if train_path.exists():
        d = read_json(train_path)["summary"]
        row.update({"method": d.get("method", "dpo"), "dpo_loss": d["loss"], "reward_accuracy": d["reward_accuracy"],
                    "reward_margin": d["reward_margin"], "pairs": d["pairs"]})
        for key in ("rm_accuracy", "grpo_reward", "chosen_step", "dev_wer"):
            if d.get(key) is not None:
                row[key] = d[key]
    for part, folder in (("samples", run.samples_dir(k)), ("pairs", run.pairs_dir(k))):
        p = folder / "stats.json"
        if p.exists():
            stats = read_json(p)
            if part == "pairs":
                row["mean_token_distance"] = stats["mean_token_distance"]
            else:
                row["sample_tokens_per_second"] = stats["tokens_per_second"]
    row["seconds"] = run.stage_seconds(k)
    return row


def write_metrics(run: RunDir) -> None:
    rows = [row for row in (round_row(run, k) for k in run.rounds()) if row is not None]
    write_jsonl(run.root / "metrics.jsonl", rows)
    if rows:
        from eval.table import write_table

        write_table(run.root)  # utterances.parquet: every round's per-utterance rows, rebuilt like metrics.jsonl


def run_base(cfg: RunConfig) -> Path:
    """Only round 0's base stage (``speechalign base``); a later ``run`` of the same config goes on from it.

    Returns the round-0 policy directory.
    """
    run = RunDir(cfg)
    ctx = Context(cfg, run)
    _prepare_on_main(ctx)
    if run.done(0, "base"):
        log.info("round 0: base already done (%s)", run.policy_dir(0))
    else:
        seed_everything(cfg.seed)
        t0 = time.time()
        _base(ctx, 0)
        run.mark_done(0, "base", time.time() - t0)
    return run.policy_dir(0)
