"""``speechalign``: thin entry points; each parses and calls one function that does the work."""
from __future__ import annotations

import argparse
import logging
import sys


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "datasets", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_prepare(args) -> None:
    from align.config import load_config
    from align.run import Context

    cfg = load_config(args.config, args.set)
    ctx = Context(cfg, None)
    splits = ctx.splits
    logging.getLogger("speechalign").info("corpus ready: %d train, %d dev, %d test utterances; codec %s",
                                          len(splits.train), len(splits.dev), len(splits.test), ctx.codec.identity)


def cmd_run(args) -> None:
    from align.config import load_config
    from align.loop import run_loop
    from eval.compare import compare_runs, to_markdown

    cfg = load_config(args.config, args.set)
    root = run_loop(cfg, only_stage=args.only_stage)
    print(to_markdown(compare_runs([root])))


def cmd_compare(args) -> None:
    from eval.compare import build_comparison, to_markdown, write_outputs

    rounds = [int(r) for r in args.rounds.split(",")] if args.rounds else None
    cmp = build_comparison(args.run_dirs, rounds, n_boot=args.n_boot, seed=args.seed)
    print(to_markdown(cmp.table))
    print()
    print(to_markdown(cmp.tests))
    prefix = args.out or f"{args.run_dirs[0].rstrip('/')}/compare"
    paths = write_outputs(cmp, prefix)
    logging.getLogger("speechalign").info("wrote %s", ", ".join(str(p) for p in paths.values()))


def cmd_table(args) -> None:
    from eval.table import write_table

    path = write_table(args.run_dir, args.out)
    logging.getLogger("speechalign").info("wrote %s", path)


def cmd_report(args) -> None:
    from eval.report import build_report
    from eval.table import write_table

    write_table(args.run_dir)
    index = build_report(args.run_dir, args.out, n_listen=args.listen, n_boot=args.n_boot)
    print(f"report: {index}")


def cmd_gate(args) -> int:
    from pathlib import Path

    from align.config import GateConfig
    from align.configutil import apply_overrides, from_dict, load_yaml
    from eval.gate import run_gate, write_baseline

    if args.write_baseline:
        path = write_baseline(args.run_dir, args.write_baseline, args.round)
        print(f"gate baseline written: {path}")
        return 0
    if not args.baseline:
        raise ValueError("gate needs --baseline FILE (or --write-baseline FILE to create one)")
    bad = [o for o in args.set if not o.startswith("gate.")]
    if bad:
        raise ValueError(f"gate --set takes gate.* keys only, got {bad}")
    # Only the gate section is read: the gate must not fail on a run config from another code version.
    saved = Path(args.run_dir) / "config.yaml"
    path = args.config or (saved if saved.is_file() else None)
    data = apply_overrides(load_yaml(path) if path else {}, args.set)
    result = run_gate(args.run_dir, args.baseline, from_dict(GateConfig, data.get("gate"), prefix="gate."), args.round)
    print(result.message)
    return 0 if result.passed else 1

def cmd_eval(args) -> None:
    from eval.evaluate import evaluate_manifest

    result = evaluate_manifest(args.policy, args.manifest, args.out, asr_name=args.asr, speaker_name=args.speaker,
                               temperature=args.temperature, seed=args.seed, device=args.device)
    print(f"WER {result['wer']:.4f}  SIM {result['sim']:.4f}  n={result['n']}  -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechalign", description="SpeechAlign: iterative preference alignment of codec language models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the embedded corpus and fit the codec for a config")
    p.add_argument("config", nargs="?", default="configs/tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("run", help="run or resume the alignment loop of a config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. dpo.beta=0.2")
    p.add_argument("--only-stage", choices=["base", "sample", "pair", "dpo", "evaluate"],
                   help="re-run only this stage in every round (replaces its output)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("compare", help="rounds and runs side by side with bootstrap CIs, paired tests, plots "
                                       "(CSV + Markdown + PNG)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--rounds", help="comma-separated rounds to keep, e.g. 0,3")
    p.add_argument("--out", help="output prefix (default <first run>/compare)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("table", help="per-utterance results of every round as one table (parquet or .csv)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output file (default <run>/utterances.parquet; .csv for CSV)")
    p.set_defaults(fn=cmd_table)

    p = sub.add_parser("report", help="static HTML report of a run (tables, figures, audio players)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default <run>/report)")
    p.add_argument("--listen", type=int, default=8, help="utterances in the listening table")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("gate", help="exit 1 when a run's final round is worse than a baseline beyond its CI")
    p.add_argument("run_dir")
    p.add_argument("--baseline", help="baseline: a `gate --write-baseline` JSON, eval rows.jsonl or results table")
    p.add_argument("--write-baseline", metavar="FILE", help="write the run's final-round rows as a baseline and exit")
    p.add_argument("--round", type=int, help="gate this round instead of the last evaluated one")
    p.add_argument("--config", help="config for the gate.* tolerances (default: the run's config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. gate.wer_tolerance=0.02")
    p.set_defaults(fn=cmd_gate)

    p = sub.add_parser("eval", help="evaluate any policy directory on any manifest")
    p.add_argument("--policy", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--asr", default="pocketsphinx")
    p.add_argument("--speaker", default="resemblyzer")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_eval)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code = args.fn(args)
    except (ValueError, FloatingPointError) as e:
        # Bad input or config: one clear line, no traceback (use -v for it).
        if args.verbose:
            raise
        logging.getLogger("speechalign").error("%s", e)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
