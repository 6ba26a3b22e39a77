"""The stages of one alignment round, each a plain function over the run directory.

    sample(ctx, k)    round k-1's policy speaks training texts       -> round_k/samples/samples.jsonl
    pair(ctx, k)      preference pairs (strategies in align/pairs.py) -> round_k/pairs/pairs.jsonl
    train(ctx, k)     train.method (align/methods.py: DPO by default)  -> round_k/train/, round_k/policy/
    evaluate(ctx, k)  WER / SIM of round k's policy on the test split -> round_k/eval/

Each reads only files of earlier stages and writes its folder through a temp name, so any stage
can be re-run alone (``--only-stage``) and a killed stage leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from align.pairs import PAIR_STRATEGIES
from models.io import BatchStore, atomic_dir, read_jsonl, write_jsonl

if TYPE_CHECKING:
    import torch

    from align.run import Context

log = logging.getLogger("speechalign.stages")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def round_subset(items: list, n: int, seed: int) -> list:
    """A seeded subset of ``n`` utterances sorted by id (all of them when n is 0 or >= len)."""
    if n == 0 or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    return sorted(rng.sample(items, n), key=lambda u: u.id)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def sample(ctx: "Context", k: int) -> dict:
    """Round k-1's policy speaks a seeded subset of the training texts, N samples each.

    Batches of ``sample.batch_size`` are cut from the subset and dealt to the ranks; batch [start, stop)
    draws under ``seed + start``, so the samples are the same for any number of processes."""
    from tqdm import tqdm

    from align.config import config_to_dict
    from models.codec_lm import Policy

    cfg, scfg = ctx.cfg, ctx.cfg.sample
    train = ctx.splits.train
    subset = round_subset(train, scfg.prompts_per_round, cfg.seed * 1000 + k)
    prompts = [ctx.prompt_for(u, train, salt=k) for u in subset]
    policy = Policy.load(ctx.run.policy_dir(k - 1), device=ctx.device)
    texts = [u.text for u in subset]
    seed = cfg.seed * 1000 + k
    # finished batches survive a crash, and the same policy sampled with the same settings is read
    # (the texts and the prompts' codes, not only their ids: ids repeat across corpus seeds and manifests)
    store = ctx.store("samples", ctx.run.policy_dir(k - 1), {
        "sample": config_to_dict(ctx.cfg)["sample"], "seed": seed,
        "prompts": [(u.id, u.text, p.id) for u, p in zip(subset, prompts)], "prompt_codes": ctx.prompt_digest(prompts),
        "max_seconds": cfg.data.max_seconds})
    t0 = time.time()
    mine = []  # (start, samples of the batch's utterances) for this rank's batches
    spoken = 0  # tokens this rank generated (not read from the cache): the throughput figure's
    for start, stop in tqdm(ctx.ranks.batches(len(subset), scfg.batch_size), desc="sampling", leave=False):
        done = store.get(f"{start}-{stop}")
        if done is not None:
            mine.append((start, done))
            continue
        batch_prompts = [ctx.codes(p) for p in prompts[start:stop]]  # this rank's batches' prompts only
        kw = dict(top_k=scfg.top_k, batch_size=stop - start)
        if scfg.varied:  # one generate() per sample index, each with its own (temperature, top_p)
            outs = [[] for _ in range(start, stop)]
            for j in range(scfg.n):
                temperature, top_p = scfg.settings(j)
                one = policy.generate(texts[start:stop], batch_prompts, n=1, temperature=temperature,
                                      top_p=top_p, seed=seed + 7919 * j + start, **kw)
                for o, s in zip(outs, one):
                    o.extend(s)
        else:
            outs = policy.generate(texts[start:stop], batch_prompts, n=scfg.n, temperature=scfg.temperature,
                                   top_p=scfg.top_p, seed=seed + start, **kw)
        mine.append((start, [[c.tolist() for c in o] for o in outs]))
        store.put(f"{start}-{stop}", mine[-1][1])
        spoken += sum(len(c) for o in mine[-1][1] for c in o)
    seconds = ctx.ranks.gather([(time.time() - t0, spoken)])
    rows = []
    for start, outs in sorted(ctx.ranks.gather(mine), key=lambda part: part[0]):
        for u, p, samples in zip(subset[start:], prompts[start:], outs):
            for j, codes in enumerate(samples):
                temperature, top_p = scfg.settings(j)
                rows.append({"id": u.id, "prompt_id": p.id, "text": u.text, "speaker": u.speaker, "sample": j,
                             "temperature": temperature, "top_p": top_p, "codes": codes})
    n_tokens = sum(len(r["codes"]) for r in rows)
    generated = sum(n for _, n in seconds)
    stats = {"prompts": len(subset), "samples": len(rows), "tokens": n_tokens,
             # over the slowest rank's clock; None when every batch was read from the cache
             "tokens_per_second": generated / max(max(t for t, _ in seconds), 1e-9) if generated else None,
             "cached_tokens": n_tokens - generated,
             "empty": sum(1 for r in rows if not r["codes"]), "processes": ctx.ranks.world}
    if ctx.ranks.is_main:
        with atomic_dir(ctx.run.samples_dir(k)) as tmp:
            write_jsonl(tmp / "samples.jsonl", rows)
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("round %d sample: %d samples, %s", k, len(rows), "read from the cache" if not generated else
             f"{stats['tokens_per_second']:.0f} tokens/s")
    return stats


def pair(ctx: "Context", k: int) -> dict:
    """Samples -> preference pairs (recorded with scores; filtered pairs kept with keep=false). Every rank runs it
    (the judging of ranked samples is shared out); rank 0 writes the folder."""
    from models.codec_lm import conditioning, read_meta
    from models.layout import format_for

    cfg = ctx.cfg
    meta = read_meta(ctx.run.policy_dir(k - 1))  # the policy being aligned: its layout, prompt length, hint
    fmt = format_for(meta)
    rows = read_jsonl(ctx.run.samples_dir(k) / "samples.jsonl")
    pairs = PAIR_STRATEGIES[cfg.pair.strategy](ctx, k, rows)
    # prompts of every split: human pairs are of evaluated (test) clips, the others of training texts
    by_id = {u.id: u for split in (ctx.splits.train, ctx.splits.dev, ctx.splits.test) for u in split}
    kept = [p for p in pairs if p["keep"]]
    if cfg.pair.max_pairs and len(kept) > cfg.pair.max_pairs:
        keep_ids = {id(p) for p in random.Random(cfg.seed + k).sample(kept, cfg.pair.max_pairs)}
        for p in kept:
            p["keep"] = id(p) in keep_ids
        kept = [p for p in pairs if p["keep"]]
    for p in pairs:
        p["round"] = k
        p["prompt"] = conditioning(meta, prompt_codes_of(ctx, p, by_id), p["text"], ctx.codec.frame_rate)
        p["chosen"] = fmt.completion_str(p["chosen_codes"])
        p["rejected"] = fmt.completion_str(p["rejected_codes"])
    if not kept and cfg.pair.allow_empty:
        log.warning("round %d pair: every pair was filtered out; the round keeps round %d's policy "
                    "(pair.allow_empty)", k, k - 1)
    elif not kept:
        raise ValueError(f"round {k}: every pair was filtered out (pair.min_distance={cfg.pair.min_distance}, "
                         f"pair.min_gap={cfg.pair.min_gap}, pair.max_chosen_wer={cfg.pair.max_chosen_wer}); "
                         "loosen them or sample with more diversity (sample.temperatures)")
    drops: dict[str, int] = {}
    for p in pairs:
        if not p["keep"]:
            drops[p.get("drop", "max_pairs")] = drops.get(p.get("drop", "max_pairs"), 0) + 1
    new_kept = len(kept)
    if cfg.pair.data == "accumulate":  # earlier rounds' own kept pairs (not what they accumulated)
        first = 1 if cfg.pair.accumulate_rounds == 0 else max(1, k - cfg.pair.accumulate_rounds)
        for j in range(first, k):
            for p in read_jsonl(ctx.run.pairs_dir(j) / "pairs.jsonl"):
                if p["keep"] and p.get("round", j) == j:
                    pairs.append(p)
                    kept.append(p)
    stats = {"pairs": len(kept), "new_pairs": new_kept, "accumulated": len(kept) - new_kept,
             "dropped": len(pairs) - len(kept), "drop_reasons": drops,
             "mean_token_distance": float(np.mean([p["scores"]["token_distance"] for p in kept])) if kept else None,
             "mean_length_ratio": float(np.mean([p["scores"]["length_ratio"] for p in kept])) if kept else None,
             "test_split_pairs": sum(bool(p["scores"].get("test_split")) for p in kept)}
    gaps = [p["scores"]["gap"] for p in kept if "gap" in p["scores"]]
    if gaps:
        stats["mean_score_gap"] = float(np.mean(gaps))
    if ctx.ranks.is_main:  # every rank judged its share of the samples (pairs.score_samples); rank 0 writes
        with atomic_dir(ctx.run.pairs_dir(k)) as tmp:
            write_jsonl(tmp / "pairs.jsonl", pairs)
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("round %d pair: %d pairs kept, %d dropped", k, stats["pairs"], stats["dropped"])
    return stats


def prompt_codes_of(ctx: "Context", p: dict, by_id: dict) -> "torch.Tensor":
    """A pair's voice prompt codes [n_q, Tp]: its ``prompt_id`` in this run's data, else (human pairs judged in
    another run) the recording at its ``prompt_audio``, encoded with this run's codec; else a ValueError."""
    if p["prompt_id"] in by_id:
        return ctx.codes(by_id[p["prompt_id"]])
    audio = p.get("prompt_audio")
    if audio and Path(audio).is_file():
        from models.audio import load_audio

        return ctx.codec.encode(load_audio(audio, ctx.codec.sample_rate, ctx.cfg.data.max_seconds))
    raise ValueError(f"pair of {p['id']} ({p.get('source', '?')}): its voice prompt {p['prompt_id']!r} is not an "
                     f"utterance of this run's data and its recording ({audio or 'none given'}) is not on this "
                     "machine; judge clips of this run (or of a run over the same data), or drop these pairs")


def eval_items(ctx: "Context", test=None, n: int | None = None, seed: int | None = None):
    """The fixed evaluation set: test utterances (or ``test``, e.g. dev) with voice prompts from the same pool,
    ``n`` of them (default ``eval.max_utterances``) drawn under ``seed`` (default the run's): the same every round."""
    from eval.evaluate import EvalItem

    if test is None:
        test = ctx.splits.dev if ctx.cfg.eval.split == "dev" else ctx.splits.test
        if not test:
            raise ValueError(f"eval.split={ctx.cfg.eval.split}: that split is empty")
    items = round_subset(test, ctx.cfg.eval.max_utterances if n is None else n, ctx.cfg.seed if seed is None else seed)
    out = []
    for u in items:
        p = ctx.prompt_for(u, test, min_seconds=ctx.cfg.eval.prompt_min_seconds)
        out.append(EvalItem(u.id, u.text, u.speaker, u.audio, p.audio, prompt_codes=ctx.codes(p), prompt_id=p.id))
    return out


def eval_store(ctx: "Context", policy_dir: Path, items: list) -> BatchStore:
    """``Context.store`` of an evaluation: the items (texts, reference recordings' bytes, prompt codes), the ``eval:``
    section, the seed, the data's length cap (and, through ``Context.store``, the policy's files and the code)."""
    from align.config import config_to_dict
    from models.digest import dir_digest, file_key

    # save_audio is not part of the key: a hit renders the clips it lacks from the stored codes (evaluate_policy);
    # the gap analysis, extra sets and probes are computed outside the stored batches
    ecfg = dict(config_to_dict(ctx.cfg)["eval"], gap_utterances=None, save_audio=None, extra_sets=None, probes=None)
    prompts = hashlib.sha1(b"".join((it.prompt_audio.encode() if it.prompt_codes is None else
                                     it.prompt_codes.numpy().astype(np.int64).tobytes()) + b"|" for it in items))
    return ctx.store("evals", policy_dir, {
        "eval": ecfg, "seed": ctx.cfg.seed, "max_seconds": ctx.cfg.data.max_seconds,
        # the reference recording's bytes (SIM is scored against it) and the prompt codes the policy hears
        "items": [(it.id, it.text, it.audio, file_key(it.audio), it.prompt_id) for it in items],
        "prompt_codes": prompts.hexdigest(),
        # the second ear's files: an ear retrained under the same path hears otherwise
        "ear": dir_digest(ctx.cfg.eval.ear) if ctx.cfg.eval.ear else None})


def gap_items(ctx: "Context") -> list[tuple]:
    """The fixed gap-analysis set: a seeded subset of dev + test utterances with their prompts."""
    pools = [ctx.splits.dev, ctx.splits.test]
    pairs = [(u, pool) for pool in pools for u in pool]
    chosen = round_subset([u for u, _ in pairs], ctx.cfg.eval.gap_utterances, ctx.cfg.seed + 11)
    pool_of = {u.id: pool for u, pool in pairs}
    return [(u, ctx.prompt_for(u, pool_of[u.id])) for u in chosen]


def probe_stage(ctx: "Context", k: int, policy, out: Path) -> dict:
    """The probe set's margins under round k's policy -> ``out/probes.json``; from round 1 on, the summary's
    ``probe_*`` keys against round 0's margins (align/probes.py). The probes are built once per run (``probes.jsonl``
    in the run directory) from a seeded subset of dev + test utterances."""
    from align.probes import build_probes, probe_margins, probe_summary

    path = ctx.run.root / "probes.jsonl"
    if path.is_file():
        probes = read_jsonl(path)
    else:
        utts = round_subset([u for pool in (ctx.splits.dev, ctx.splits.test) for u in pool], ctx.cfg.eval.probes,
                            ctx.cfg.seed + 29)
        probes = build_probes(ctx, policy.format, utts, frontend=policy.text_frontend,
                              max_frames=policy.emit_rule.max_frames, seed=ctx.cfg.seed)
        write_jsonl(path, probes)
    margins = probe_margins(policy, probes)
    (out / "probes.json").write_text(json.dumps({"margins": margins.tolist(),
                                                 "ids": [(p["id"], p["kind"]) for p in probes]}))
    if k == 0:
        return {}
    first = json.loads((ctx.run.eval_dir(0) / "probes.json").read_text())["margins"]
    return probe_summary(probes, margins, np.asarray(first))


def evaluate(ctx: "Context", k: int) -> dict:
    """Score round k's policy on the test split; rows to eval/rows.jsonl, means to eval/summary.json.

    Also the golden-vs-synthetic gap (eval/gap.py) on held-out texts -> eval/gap.json and gap_* keys
    of the summary (so metrics.jsonl carries them per round). With several processes the utterances are
    shared out in batches (``evaluate_policy``'s ``batches``/``gather``); rank 0 writes the folder and runs
    the gap analysis, and returns the summary ({} on the other ranks).
    """
    from eval.evaluate import evaluate_policy
    from models.codec_lm import Policy
    from models.data import load_any

    ecfg = ctx.cfg.eval
    policy = Policy.load(ctx.run.policy_dir(k), device=ctx.device)
    scorers = ctx.scorers
    ranks = ctx.ranks
    # a folder keeps its whole name (VCTK-Corpus-0.92), a manifest loses its suffix
    sets = [("", None)] + [(Path(p).name if Path(p).is_dir() else Path(p).stem, p) for p in ecfg.extra_sets]
    # the other ranks write nothing: tmp is None there
    with atomic_dir(ctx.run.eval_dir(k)) if ranks.is_main else contextlib.nullcontext() as tmp:
        for name, src in sets:
            out = None if tmp is None else (tmp / name if name else tmp)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
            items = eval_items(ctx, None if src is None else load_any(src)[0])
            set_summary, rows = evaluate_policy(
                policy, items, scorers=scorers,
                temperature=ecfg.temperature, top_k=ecfg.top_k, top_p=ecfg.top_p, seed=ctx.cfg.seed + 7,
                batch_size=ecfg.batch_size, save_audio_dir=None if out is None else out / "audio",
                save_n=ecfg.save_audio, max_seconds=ctx.cfg.data.max_seconds,
                batches=ranks.batches(len(items), ecfg.batch_size), gather=ranks.gather,
                store=eval_store(ctx, ctx.run.policy_dir(k), items), defect=ecfg.defect,
                defect_samples=ecfg.defect_samples)
            if out is None:
                continue
            # The item set is fixed, so the same first save_audio ids have audio every round (an empty
            # output has none); the paths let the report play the golden and prompt recordings beside it.
            for i, (r, it) in enumerate(zip(rows, items)):
                r.update({"round": k, "item": i, "sample": 0, "audio": it.audio, "prompt_audio": it.prompt_audio,
                          "saved_audio": f"audio/{it.id}.wav" if (out / "audio" / f"{it.id}.wav").exists() else None})
            write_jsonl(out / "rows.jsonl", rows)
            (out / "summary.json").write_text(json.dumps(set_summary, indent=2))
            if not name:
                summary = set_summary
            else:
                summary.setdefault("extra", {})[name] = {key: set_summary.get(key) for key in
                                                         ("wer", "sim", "dnsmos", "utmos", "defect_rate", "n")}
        if tmp is None:  # the gap analysis and the files are rank 0's
            return {}
        if ecfg.gap_utterances:
            from eval.gap import gap_analysis

            chosen = gap_items(ctx)
            t0 = time.time()
            gap_summary, detail = gap_analysis(
                policy, [u.text for u, _ in chosen], [ctx.codes(p) for _, p in chosen],
                [ctx.golden_stream(u, policy.format) for u, _ in chosen], [u.id for u, _ in chosen],
                temperature=ecfg.temperature, top_k=ecfg.top_k, top_p=ecfg.top_p, seed=ctx.cfg.seed + 13,
                batch_size=ecfg.batch_size)
            summary.update(gap_summary)
            summary["seconds"]["gap"] = round(time.time() - t0, 2)
            (tmp / "gap.json").write_text(json.dumps(detail))
        if ecfg.probes and policy.format.units is not None:
            t0 = time.time()
            summary.update(probe_stage(ctx, k, policy, tmp))
            summary["seconds"]["probes"] = round(time.time() - t0, 2)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("round %d eval: WER %.3f SIM %.3f pauses %.3f %s(n=%d)%s", k, summary["wer"], summary["sim"],
             summary["defect_rate"],
             "".join(f"{q} {summary[q]:.3f} " for q in ("dnsmos", "utmos") if summary.get(q) is not None), summary["n"],
             f"; gap AUC {summary['gap_auc']:.3f} log-p margin "
             f"{float('nan') if summary['gap_logp_margin'] is None else summary['gap_logp_margin']:+.3f}"
             if summary.get("gap_auc") is not None else "")
    return summary
