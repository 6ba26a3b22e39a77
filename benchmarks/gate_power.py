"""How much can `speechalign gate` see? The CI loop's committed baseline against (a) the same config at other seeds
(what the gate must pass: false alarms) and (b) regressions made through config or code paths a change could break
(what it should fail). The table gives each run's worse-by and bootstrap CI per metric and which runs fail at
each candidate WER tolerance; the committed tolerances (``gate:`` in configs/ci.yaml) are chosen from it.

    python benchmarks/gate_power.py [--seeds 1 2 3 4 5] [--root runs/gate_power] [--write-baseline] [--base-regressions]

Seed 0 is the baseline's run (``--write-baseline`` writes configs/ci_baseline.json from it, on purpose). The
regressions run at seed 0 too, so only the regression differs from the baseline's run; those that change nothing
of round 0 start from its round-0 policy. Finished runs are read, not rerun.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from common import ROOT, arg_parser, machine, write_results

CI = ROOT / "configs" / "ci.yaml"
BASELINE = ROOT / "configs" / "ci_baseline.json"
TOLERANCES = [0.0, 0.02, 0.05, 0.1]


@contextlib.contextmanager
def swapped_pairs():
    """A code regression: every pair strategy returns its pairs with chosen and rejected swapped."""
    from align import stages

    saved = dict(stages.PAIR_STRATEGIES)

    def swap(fn):
        def wrapped(ctx, k, rows):
            out = fn(ctx, k, rows)
            for p in out:
                p["chosen_codes"], p["rejected_codes"] = p["rejected_codes"], p["chosen_codes"]
            return out
        return wrapped

    for name, fn in saved.items():
        stages.PAIR_STRATEGIES[name] = swap(fn)
    try:
        yield
    finally:
        stages.PAIR_STRATEGIES.update(saved)


def build_overrides() -> list[str]:
    """How configs/ci_round0/ was trained (its BUILD.json), less the run's name, folder and rounds."""
    import json

    build = json.loads((ROOT / "configs" / "ci_round0" / "BUILD.json").read_text())["overrides_of_configs_ci_yaml"]
    return [o for o in build if o.split("=", 1)[0] not in ("name", "out_dir", "rounds")]


def regressions(cfg, base: bool = False) -> dict[str, tuple[list[str], object, bool]]:
    """name -> (overrides, context manager factory, shares round 0 with the baseline's run). A regression of the base
    retrains round 0 the way scripts/build_ci_round0.py does, with the one setting changed (``base``: ~40 min on 2
    cores, so only with --base-regressions)."""
    none = contextlib.nullcontext
    build = build_overrides()
    steps = {o.split("=", 1)[0]: int(o.split("=", 1)[1]) for o in build if o.startswith("base.nar_steps=")}
    out = {
        "swapped_pairs": ([], swapped_pairs, True),
        "dpo_beta_tenth": ([f"dpo.beta={cfg.dpo.beta / 10:g}"], none, True),
        "dpo_lr_x10": ([f"dpo.learning_rate={cfg.dpo.learning_rate * 10:g}"], none, True),
        "eval_temperature_1.2": (["eval.temperature=1.2"], none, True),
    }
    if base:
        out["renderer_tenth_steps"] = (build + [f"base.nar_steps={steps['base.nar_steps'] // 10}"], none, False)
    return out


def main() -> None:
    args_p = arg_parser(__doc__)
    args_p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args_p.add_argument("--root", default=str(ROOT / "runs" / "gate_power"))
    args_p.add_argument("--write-baseline", action="store_true", help="(re)write configs/ci_baseline.json from seed 0")
    args_p.add_argument("--base-regressions", action="store_true", help="also regressions that retrain round 0")
    args = args_p.parse_args()

    from align.config import load_config
    from align.loop import run_loop
    from eval.gate import GateConfig, run_gate, write_baseline

    t0 = time.time()
    common = [f"out_dir={args.root}"]
    base_cfg = load_config(CI, common + ["name=seed0"])
    base_run = run_loop(base_cfg)
    if args.write_baseline:
        write_baseline(base_run, BASELINE)
    runs: list[tuple[str, str, Path]] = []  # (kind, name, run dir)
    for s in args.seeds:
        runs.append(("seed", f"seed {s}", run_loop(load_config(CI, common + [f"name=seed{s}", f"seed={s}"]))))
    round0 = base_run / "round_000" / "policy"
    for name, (overrides, ctx_factory, shares) in regressions(base_cfg, args.base_regressions).items():
        extra = [f"policy.pretrained={round0}"] if shares else []
        with ctx_factory():
            runs.append(("regression", name, run_loop(load_config(CI, common + [f"name={name}", *overrides, *extra]))))
    gate_cfg = base_cfg.gate
    rows = []
    for kind, name, run_dir in runs:
        res = run_gate(run_dir, BASELINE, GateConfig(**{**gate_cfg.__dict__, "wer_tolerance": 0.0,
                                                        "sim_tolerance": 0.0}))
        checks = {c["metric"]: c for c in res.checks}
        row = {"kind": kind, "run": name, "dir": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT)
               else str(run_dir)}
        for m, c in checks.items():
            row.update({f"{m}_worse_by": c["worse_by"], f"{m}_ci": [c["ci_lo"], c["ci_hi"]], "n": c["n"]})
        row["fails_at"] = {f"{t:g}": bool(checks["wer"]["ci_lo"] > t or checks["sim"]["ci_lo"] > gate_cfg.sim_tolerance)
                           for t in TOLERANCES}
        row["fails_with_committed_gate"] = not run_gate(run_dir, BASELINE, gate_cfg).passed
        rows.append(row)
    seeds = [r for r in rows if r["kind"] == "seed"]
    regs = [r for r in rows if r["kind"] == "regression"]
    md = ["# Gate power: what `speechalign gate` catches on the CI loop", "",
          f"`python benchmarks/gate_power.py --seeds {' '.join(map(str, args.seeds))}` ({(time.time() - t0) / 60:.0f} "
          f"min of this invocation on {machine()}; finished runs are read). Baseline `configs/ci_baseline.json` "
          f"(configs/ci.yaml at seed 0, final round). Every run's final round is paired with it on utterance id; "
          f"worse-by is oriented so that positive is worse (WER up, SIM down), with its {gate_cfg.confidence:.0%} "
          f"bootstrap CI ({gate_cfg.n_boot} resamples). A run fails when the CI's lower end is above the tolerance "
          f"(SIM tolerance {gate_cfg.sim_tolerance:g} throughout).", "",
          "| kind | run | n | WER worse-by [CI] | SIM worse-by [CI] | " +
          " | ".join(f"fails at WER tol {t:g}" for t in TOLERANCES) + " | fails (committed gate) |",
          "|" + "---|" * (5 + len(TOLERANCES) + 1)]
    for r in rows:
        md.append(f"| {r['kind']} | {r['run']} | {r['n']} | {r['wer_worse_by']:+.3f} [{r['wer_ci'][0]:+.3f}, "
                  f"{r['wer_ci'][1]:+.3f}] | {r['sim_worse_by']:+.3f} [{r['sim_ci'][0]:+.3f}, {r['sim_ci'][1]:+.3f}] | "
                  + " | ".join("**fail**" if r["fails_at"][f"{t:g}"] else "pass" for t in TOLERANCES)
                  + f" | {'**fail**' if r['fails_with_committed_gate'] else 'pass'} |")
    md += ["", "Per tolerance: false alarms over the seeds, regressions caught.", "",
           "| WER tolerance | false alarms | regressions caught |", "|---|---|---|"]
    for t in TOLERANCES:
        fa = sum(r["fails_at"][f"{t:g}"] for r in seeds)
        caught = [r["run"] for r in regs if r["fails_at"][f"{t:g}"]]
        md.append(f"| {t:g} | {fa} of {len(seeds)} | {len(caught)} of {len(regs)}: {', '.join(caught) or '-'} |")
    md += ["", f"Committed gate (configs/ci.yaml `gate:`): WER tolerance {gate_cfg.wer_tolerance:g}, SIM tolerance "
           f"{gate_cfg.sim_tolerance:g}: {sum(r['fails_with_committed_gate'] for r in seeds)} false alarms of "
           f"{len(seeds)} seeds, {sum(r['fails_with_committed_gate'] for r in regs)} of {len(regs)} regressions "
           "caught."]
    out = write_results("gate_power", "\n".join(md), {"machine": machine(), "seconds": round(time.time() - t0, 1),
                                                      "gate": gate_cfg.__dict__, "rows": rows})
    print(out.read_text())


if __name__ == "__main__":
    main()
