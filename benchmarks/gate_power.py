"""What the CI loop's tiers catch: clean seeds (false alarms) against planted faults (tests/mutations.py).

    python benchmarks/gate_power.py [--clean-seeds 3 4 5 6 7] [--baseline-seeds 0 1 2] [--mutations ...]
                                    [--root runs/gate_power] [--write-baseline]

The CI loop (configs/ci.yaml: the positive control at CI size, its round-0 policy pausing in some of its samples)
runs at each clean seed and once per mutation (seed 0, the CI's own seed, from the same committed round-0 policy).
Every run is read by five tiers:

    run           the CI run itself stops with an error (the NaN guard, a refused config): CI fails, a catch
    fingerprint   the deterministic tier: ``speechalign fingerprint`` under the same fault (fixed pairs, fixed seed;
                  configs/ci_fingerprint.json); a clean seed cannot move it (it samples nothing), so its false
                  alarms are zero by construction and its column is about faults alone
    defect        the run's own defect rate must fall from round 0 by gate.defect_drop (CI of the paired change)
    probes        the final round must prefer gate.min_probe_accuracy of the pause probes more than round 0 did
    wer/sim       the final round against configs/ci_baseline.json (the mean of the baseline seeds' final rounds)
                  beyond the CI plus gate.wer_tolerance / gate.sim_tolerance

A tier "catches" a run when its check fails. The baseline's seeds are not among the clean seeds whose false alarms
are counted. ``--write-baseline`` (re)writes configs/ci_baseline.json from the baseline seeds, on purpose.
Finished runs are read, not rerun.
"""
from __future__ import annotations

import time
from pathlib import Path

from common import ROOT, arg_parser, machine, write_results

CI = ROOT / "configs" / "ci.yaml"
BASELINE = ROOT / "configs" / "ci_baseline.json"
FINGERPRINT = ROOT / "configs" / "ci_fingerprint.json"
TIERS = ("run", "fingerprint", "defect", "probes", "wer/sim")


def tiers(run_dir: Path, gate_cfg, fingerprint: dict) -> dict:
    """Each tier's verdict on one finished run: {tier: {"caught": bool, "detail": str}}; ``fingerprint`` is that
    tier's verdict, found apart (``fingerprint_tier``)."""
    import dataclasses

    from eval.gate import run_gate

    out = {"run": {"caught": False, "detail": "finished"},
           "fingerprint": fingerprint}
    only = lambda **kw: dataclasses.replace(gate_cfg, **kw)  # noqa: E731
    res = run_gate(run_dir, BASELINE, only(min_probe_accuracy=None))
    drop = next(c for c in res.checks if c["metric"] == "defect_drop")
    out["defect"] = {"caught": drop["failed"], "detail": drop["message"], "round0": drop["round0"],
                     "final": drop["final"], "ci": [drop["ci_lo"], drop["ci_hi"]]}
    res = run_gate(run_dir, BASELINE, only(defect_drop=None))
    probe = next(c for c in res.checks if c["metric"] == "probe_accuracy_pause")
    out["probes"] = {"caught": probe["failed"], "detail": probe["message"], "value": probe["value"]}
    base = {c["metric"]: c for c in res.checks if c["metric"] in ("wer", "sim")}
    out["wer/sim"] = {"caught": any(c["failed"] for c in base.values()),
                      **{m: {"worse_by": c["worse_by"], "ci": [c["ci_lo"], c["ci_hi"]]} for m, c in base.items()}}
    return out


def fingerprint_tier(overrides: list[str] | None = None) -> dict:
    """The fingerprint's verdict under ``overrides`` (and whatever mutation is active): a fault that stops its
    trainer is caught by stopping it."""
    from align.fingerprint import check_fingerprint

    try:
        fp = check_fingerprint(str(CI), FINGERPRINT, overrides)
    except Exception as e:  # noqa: BLE001
        return {"caught": True, "detail": f"stopped: {type(e).__name__}: {e}"}
    return {"caught": not fp.passed, "detail": fp.message}


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--clean-seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    p.add_argument("--baseline-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mutations", nargs="+", default=None, help="default: all of tests/mutations.py")
    p.add_argument("--root", default=str(ROOT / "runs" / "gate_power"))
    p.add_argument("--write-baseline", action="store_true")
    args = p.parse_args()

    from align.config import load_config
    from align.loop import run_loop
    from eval.gate import write_baseline
    from tests.mutations import MUTATIONS

    t0 = time.time()
    common = [f"out_dir={args.root}"]
    base_cfg = load_config(CI, common)
    seconds = {}

    def run(name: str, overrides: list[str]) -> Path:
        t = time.time()
        out = run_loop(load_config(CI, common + [f"name={name}", *overrides]))
        seconds[name] = round(time.time() - t, 1)
        return out

    baseline_runs = [run(f"seed{s}", [f"seed={s}"]) for s in args.baseline_seeds]
    if args.write_baseline:
        write_baseline(baseline_runs, BASELINE)
    clean_fp = fingerprint_tier()
    rows = []
    for s in args.clean_seeds:
        d = run(f"seed{s}", [f"seed={s}"])
        rows.append({"kind": "clean seed", "run": f"seed {s}", "dir": d.name, "tiers": tiers(d, base_cfg.gate, clean_fp)})
    for name in args.mutations or list(MUTATIONS):
        m = MUTATIONS[name]
        overrides = m.overrides(base_cfg)
        row = {"kind": "mutation", "run": name, "what": m.description, "overrides": overrides, "dir": f"mut-{name}"}
        with m.active():
            fp = fingerprint_tier(overrides)
            try:
                d = run(f"mut-{name}", overrides)
            except Exception as e:  # noqa: BLE001 - CI fails when its run stops: that is a catch, said as one
                seconds[f"mut-{name}"] = None
                row["tiers"] = {"run": {"caught": True, "detail": f"stopped: {type(e).__name__}: {e}"},
                                "fingerprint": fp, "defect": None, "probes": None, "wer/sim": None}
                rows.append(row)
                continue
        row["tiers"] = tiers(d, base_cfg.gate, fp)
        rows.append(row)
    g = base_cfg.gate
    md = ["# Gate power: what the CI loop's tiers catch", "",
          f"`python benchmarks/gate_power.py --clean-seeds {' '.join(map(str, args.clean_seeds))} --baseline-seeds "
          f"{' '.join(map(str, args.baseline_seeds))}` ({(time.time() - t0) / 60:.0f} min of this invocation on "
          f"{machine()}; finished runs are read; a CI run took {min(v for v in seconds.values() if v):.0f}-{max(v for v in seconds.values() if v):.0f} "
          "s where it ran here). configs/ci.yaml: the positive control at CI size (its round-0 policy pauses in some "
          "samples; each round's pairs are judged by the pause detector). Tiers: **run** (the CI run stops with an "
          "error, so CI fails: the NaN guard, a refused config), **fingerprint** (configs/"
          "ci_fingerprint.json, fixed pairs and seed: clean seeds cannot move it), **defect** (the run's defect rate "
          f"must fall from round 0 by {g.defect_drop:g}: the {g.confidence:.0%} CI of the paired change below "
          f"-{g.defect_drop:g}), **probes** (the final round prefers at least {g.min_probe_accuracy:g} of the pause "
          f"probes more than round 0), **wer/sim** (against configs/ci_baseline.json, the mean of seeds "
          f"{args.baseline_seeds}: CI lower end above tolerance {g.wer_tolerance:g} / {g.sim_tolerance:g}). "
          "Mutations run at seed 0 from the committed round-0 policy.", "",
          "| kind | run | defect rate r0 -> final [CI of change] | pause probes preferred | WER worse-by [CI] | "
          "SIM worse-by [CI] | " + " | ".join(f"{t} caught" for t in TIERS) + " |",
          "|" + "---|" * (6 + len(TIERS))]
    for r in rows:
        t = r["tiers"]
        if t["defect"] is None:  # the run stopped: no figures, the behavioural tiers never read it
            md.append(f"| {r['kind']} | {r['run']} | {t['run']['detail'][:160]} | | | | "
                      + " | ".join("**yes**" if t[x] and t[x]["caught"] else "-" if t[x] else "n/a" for x in TIERS)
                      + " |")
            continue
        wer, sim = t["wer/sim"].get("wer", {}), t["wer/sim"].get("sim", {})
        md.append(f"| {r['kind']} | {r['run']} | {t['defect']['round0']:.3f} -> {t['defect']['final']:.3f} "
                  f"[{t['defect']['ci'][0]:+.3f}, {t['defect']['ci'][1]:+.3f}] | {t['probes']['value']:.3f} | "
                  f"{wer.get('worse_by', float('nan')):+.3f} [{wer.get('ci', [float('nan')] * 2)[0]:+.3f}, "
                  f"{wer.get('ci', [float('nan')] * 2)[1]:+.3f}] | {sim.get('worse_by', float('nan')):+.3f} "
                  f"[{sim.get('ci', [float('nan')] * 2)[0]:+.3f}, {sim.get('ci', [float('nan')] * 2)[1]:+.3f}] | "
                  + " | ".join("**yes**" if t[x]["caught"] else "-" for x in TIERS) + " |")
    clean = [r for r in rows if r["kind"] == "clean seed"]
    muts = [r for r in rows if r["kind"] == "mutation"]
    caught = lambda r, x: bool(r["tiers"][x] and r["tiers"][x]["caught"])  # noqa: E731
    md += ["", "| tier | false alarms (clean seeds) | mutations caught |", "|---|---|---|"]
    for x in TIERS:
        md.append(f"| {x} | {sum(caught(r, x) for r in clean)} of {len(clean)} | "
                  f"{sum(caught(r, x) for r in muts)} of {len(muts)}: "
                  f"{', '.join(r['run'] for r in muts if caught(r, x)) or '-'} |")
    behaviour = ("defect", "probes", "wer/sim")
    missed = [r["run"] for r in muts if not any(caught(r, x) for x in TIERS)]
    md += ["", f"Caught by some tier: {len(muts) - len(missed)} of {len(muts)} mutations"
           + (f"; missed: {', '.join(missed)}" if missed else "") + ". Caught by a behavioural tier (defect, probes or "
           f"wer/sim) on its own: {', '.join(r['run'] for r in muts if any(caught(r, x) for x in behaviour)) or '-'}."
           f" False alarms of any tier: {sum(any(caught(r, x) for x in TIERS) for r in clean)} of "
           f"{len(clean)} clean seeds.", "",
           "What each mutation is: " + "; ".join(f"`{r['run']}` {r['what']}" for r in muts) + "."]
    out = write_results("gate_power", "\n".join(md), {"machine": machine(), "seconds": round(time.time() - t0, 1),
                                                      "run_seconds": seconds, "gate": g.__dict__, "rows": rows})
    print(out.read_text())


if __name__ == "__main__":
    main()
