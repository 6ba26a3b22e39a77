"""Do the alignment rounds improve the main job's policy? DPO rounds vs a continue-SFT control, on 3 seeds.

    python benchmarks/efficacy.py [--config configs/tiny.yaml] [--seeds 0 1 2] [--root runs/efficacy]
                                  [--base 0=runs/tiny/round_000/policy]

For each seed: the round-0 policy of the main job's config with ``seed=<s>`` (its base stage alone,
``rounds=0``; or, with ``--base SEED=DIR``, a round-0 policy that config already trained, e.g. the main
job's own), then two arms from that same policy (``policy.pretrained``), every test utterance evaluated
at rounds 0-3 (``eval.max_utterances=0``: 40 sentences x 4 voices = 160): the main job's DPO rounds, and
the control, ``train.method=sft_control``: the same steps on the golden tokens of the same sampled
prompts, no preference signal. Runs resume, so a killed benchmark picks up where it stopped, and
finished seeds cost nothing on a rerun.

Writes ``benchmarks/results/efficacy.{md,json}``: per seed and pooled over seeds, WER and SIM per
round with 95% bootstrap CIs (utterances resampled), and paired tests on utterance id (round 3 vs
round 0, DPO round 3 vs control round 3): the exact sign-flip test where it can enumerate, its seeded
Monte Carlo beyond (``eval.stats.sign_flip_test``; WER pairs the per-utterance edit errors), with n,
and Holm-adjusted p over every test in the file. Only the test split is read: nothing here chooses
a setting.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger("speechalign.bench")


def run_seed(config: str, seed: int, root: Path, extra: list[str], base: str | None) -> tuple[Path, Path]:
    """The DPO run and its control for one seed (run or resumed); returns their run directories."""
    from align.config import load_config
    from align.loop import run_loop

    common = [f"seed={seed}", f"out_dir={root}", *extra]
    if base is None:
        base_dir = run_loop(load_config(config, [f"name=base_s{seed}", *common, "rounds=0"]))
        base = str(base_dir / "round_000" / "policy")
    arms = [load_config(config, [f"name={name}_s{seed}", *common, "eval.max_utterances=0", f"policy.pretrained={base}",
                                 *more])
            for name, more in (("dpo", []), ("sft_control", ["train.method=sft_control"]))]
    return run_loop(arms[0]), run_loop(arms[1])


def keyed(table: pd.DataFrame, round_: int, seed: int) -> pd.DataFrame:
    """One round's rows, keyed by (seed, utterance id)."""
    rows = table[(table["round"] == round_) & (table["sample"] == 0)].copy()
    rows["key"] = [f"s{seed}:{i}" for i in rows["id"]]
    return rows.set_index("key").sort_index()


def estimates(rows: pd.DataFrame) -> dict:
    from eval.stats import bootstrap_ci

    wer = bootstrap_ci(rows["errors"].to_numpy(float), rows["ref_words"].to_numpy(float))
    sim = bootstrap_ci(rows["sim"].to_numpy(float))
    return {"wer": round(wer.value, 4), "wer_ci": [round(wer.lo, 4), round(wer.hi, 4)],
            "sim": round(sim.value, 4), "sim_ci": [round(sim.lo, 4), round(sim.hi, 4)], "n": len(rows)}


def test(a: pd.DataFrame, b: pd.DataFrame, metric: str, what: str, scope: str) -> dict:
    """B vs A paired on the keys both hold."""
    from eval.stats import paired_test

    keys = a.index.intersection(b.index)
    a, b = a.loc[keys], b.loc[keys]
    if metric == "wer":
        t = paired_test(a["errors"], a["ref_words"], b["errors"], b["ref_words"])
    else:
        ones = np.ones(len(keys))
        t = paired_test(a[metric], ones, b[metric], ones)
    return {"scope": scope, "comparison": what, "metric": metric, "delta": round(t.delta, 4),
            "ci": [round(t.lo, 4), round(t.hi, 4)], "p": t.p, "test": t.test, "n": t.n}


def main() -> None:
    from eval.stats import adjust_p
    from eval.table import load_table

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=str(ROOT / "runs" / "efficacy"))
    parser.add_argument("--set", action="append", default=[], help="extra key=value config overrides")
    parser.add_argument("--base", action="append", default=[], metavar="SEED=DIR",
                        help="start this seed's arms from a round-0 policy the config (with that seed) trained")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "efficacy"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    t0 = time.time()
    per_seed, rounds_all = {}, {}
    bases = dict(b.split("=", 1) for b in args.base)
    for seed in args.seeds:
        dpo_dir, control_dir = run_seed(args.config, seed, root, args.set, bases.get(str(seed)))
        dpo, control = load_table(dpo_dir), load_table(control_dir)
        rounds = sorted(set(dpo["round"]) & set(control["round"]))
        per_seed[seed] = {"dpo": {k: keyed(dpo, k, seed) for k in rounds},
                          "sft_control": {k: keyed(control, k, seed) for k in rounds}}
        rounds_all[seed] = rounds
    rounds = sorted(set.intersection(*(set(r) for r in rounds_all.values())))
    last = rounds[-1]
    scopes = {f"seed {s}": {arm: d for arm, d in per_seed[s].items()} for s in args.seeds}
    scopes["pooled"] = {arm: {k: pd.concat([per_seed[s][arm][k] for s in args.seeds]) for k in rounds}
                        for arm in ("dpo", "sft_control")}
    table, tests = [], []
    for scope, arms in scopes.items():
        for arm, by_round in arms.items():
            for k in rounds:
                table.append({"scope": scope, "arm": arm, "round": k, **estimates(by_round[k])})
        for metric in ("wer", "sim"):
            tests.append(test(arms["dpo"][0], arms["dpo"][last], metric, f"DPO round {last} vs round 0", scope))
            tests.append(test(arms["sft_control"][0], arms["sft_control"][last], metric,
                              f"control round {last} vs round 0", scope))
            tests.append(test(arms["sft_control"][last], arms["dpo"][last], metric,
                              f"DPO round {last} vs control round {last}", scope))
    for t, p in zip(tests, adjust_p([t["p"] for t in tests], "holm")):
        t["p_holm"] = float(p)
    meta = {"config": os.path.relpath(args.config, ROOT), "seeds": args.seeds, "overrides": args.set, "bases": bases,
            "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rounds": table, "tests": tests}, indent=1) + "\n")

    def fmt_ci(v, ci):
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    md = ["# Efficacy: DPO rounds vs a continue-SFT control", "",
          f"`python benchmarks/efficacy.py --seeds {' '.join(map(str, args.seeds))}`"
          f"{''.join(f' --set {s}' for s in args.set)}{''.join(f' --base {b}' for b in args.base)} "
          f"({meta['seconds'] / 60:.0f} min of this invocation on "
          f"{meta['machine']}; finished runs are read, not rerun). Config `{meta['config']}`; every test "
          "utterance evaluated at every round; both arms start from the same round-0 policy, the control trains the "
          "same steps on the golden tokens of the same prompts. 95% bootstrap CIs over utterances.", "",
          "| scope | arm | round | WER [95% CI] | SIM [95% CI] | n |", "|---|---|---|---|---|---|"]
    for r in table:
        md.append(f"| {r['scope']} | {r['arm']} | {r['round']} | {fmt_ci(r['wer'], r['wer_ci'])} | "
                  f"{fmt_ci(r['sim'], r['sim_ci'])} | {r['n']} |")
    md += ["", "Paired tests on utterance id (B minus A; WER pairs per-utterance edit errors). p: two-sided "
           "sign-flip test (exact where 2^n patterns can be enumerated, else seeded Monte Carlo); p_holm: Holm "
           f"over all {len(tests)} tests below.", "",
           "| scope | comparison | metric | delta [95% CI] | p | p_holm | n | test |",
           "|---|---|---|---|---|---|---|---|"]
    for t in tests:
        md.append(f"| {t['scope']} | {t['comparison']} | {t['metric']} | {fmt_ci(t['delta'], t['ci'])} | "
                  f"{t['p']:.3g} | {t['p_holm']:.3g} | {t['n']} | {t['test']} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
