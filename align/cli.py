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


def cmd_align(args) -> None:
    from models.phones import align_manifest

    out = align_manifest(args.source, overwrite=args.overwrite)
    log = logging.getLogger("speechalign")
    log.info("phone alignments: %d written, %d of %d rows could not be aligned", out["aligned"], len(out["failed"]),
             out["utterances"])
    for f in out["failed"][:10]:
        log.warning("%s: %s", f["id"], f["reason"])


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """``accelerate launch`` of this CLI on ``nproc`` processes (``speechalign run --nproc N``): argv is the
    command line to run in each, without ``--nproc``; run it under ``launch_env``."""
    # (accelerate's own --cpu runs one process whatever --num_processes says: CPU ranks are launched like GPU
    # ones, torchrun under --multi_gpu, and ACCELERATE_USE_CPU makes each join a gloo group; align/dist.py)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "align.cli", *argv]


def launch_env(device: str) -> dict[str, str]:
    """The environment ``launch_command`` runs under: ACCELERATE_USE_CPU=true for a CPU run (device cpu, or auto
    on a machine without CUDA)."""
    import os

    import torch

    env = dict(os.environ)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_run(args) -> None:
    import os

    from align.config import load_config
    from align.loop import run_loop
    from eval.compare import compare_runs, to_markdown

    cfg = load_config(args.config, args.set)
    if args.dry_run:
        from align.dryrun import dry_run

        code, text = dry_run(cfg, gpus=args.gpus or (args.nproc if args.nproc > 1 else None), gpu_gb=args.gpu_gb)
        print(text)
        return code
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        import subprocess

        cmd = launch_command(args.nproc, _without_nproc(sys.argv[1:]))
        logging.getLogger("speechalign").info("launching %d processes: %s", args.nproc, " ".join(cmd))
        return subprocess.call(cmd, env=launch_env(cfg.device))
    root = run_loop(cfg, only_stage=args.only_stage)
    from align.dist import process_ranks

    if process_ranks().is_main:
        print(to_markdown(compare_runs([root])))


def cmd_study(args) -> None:
    from align.study import run_study

    out = run_study(args.study, jobs=args.jobs, print_commands=args.print_commands, final=args.final,
                    variants=args.variants, table_only=args.table_only, force=args.force)
    if out is not None:
        print(out.read_text())


def cmd_base(args) -> None:
    from align.config import load_config
    from align.loop import run_base

    overrides = list(args.set) + ([f"base.stage={args.stage}"] if args.stage else [])
    policy_dir = run_base(load_config(args.config, overrides))
    logging.getLogger("speechalign").info("round-0 policy ready: %s", policy_dir)


def cmd_chat(args) -> None:
    from pathlib import Path

    from models.audio import load_audio, save_audio
    from models.codec_lm import Policy
    from models.speechgpt import chat, load_extractor

    if (args.text is None) == (args.wav is None):
        raise ValueError("chat needs exactly one of --text or --wav")
    policy = Policy.load(args.policy, device=args.device)
    if policy.meta.get("format") != "speechgpt":
        raise ValueError(f"{args.policy} is a {policy.meta.get('format', 'codec_lm')!r} policy; chat needs a SpeechGPT "
                         "one (speechalign base --stage speechgpt CONFIG writes it to runs/<name>/round_000/policy)")
    units_dir = Path(args.policy) / "speechgpt_units"
    extractor = load_extractor(units_dir, codec=policy.codec) if units_dir.is_dir() else None
    wav = None
    if args.wav:
        wav = load_audio(args.wav, extractor.sample_rate if extractor else policy.codec.sample_rate)
    reply = chat(policy, text=args.text, wav=wav, instruction=args.instruction, extractor=extractor,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 max_new_tokens=args.max_new_tokens, seed=args.seed, speak=args.out is not None)
    if reply.transcript:
        print(f"Transcript: {reply.transcript}")
    print(f"Response: {reply.text}")
    if reply.units.numel():
        print(f"Speech: {reply.units.numel()} units")
    if args.out:
        if reply.wav is None or not len(reply.wav):
            logging.getLogger("speechalign").warning("the reply holds no speech; %s not written", args.out)
        else:
            save_audio(args.out, reply.wav, reply.sample_rate)
            print(f"Speech written to {args.out}")


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

    from eval.gate import GateConfig
    from models.configutil import apply_overrides, from_dict, load_yaml
    from eval.gate import run_gate, write_baseline

    if args.write_baseline:
        path = write_baseline([args.run_dir, *args.more_runs], args.write_baseline, args.round)
        print(f"gate baseline written: {path}")
        return 0
    if args.more_runs:
        raise ValueError("several runs go with --write-baseline (their per-utterance mean is the baseline)")
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
    from eval.scorers import EvalConfig

    ecfg = EvalConfig(asr=args.asr, asr_model=args.asr_model, speaker=args.speaker, speaker_model=args.speaker_model,
                      quality=args.quality, temperature=args.temperature, batch_size=args.batch_size)
    result = evaluate_manifest(args.policy, args.manifest, args.out, ecfg=ecfg, seed=args.seed, device=args.device,
                               max_seconds=args.max_seconds, save_audio=args.save_audio)
    print(f"WER {result['wer']:.4f}  SIM {result['sim']:.4f}  n={result['n']}  skipped={len(result['skipped'])}  "
          f"-> {args.out}")


def cmd_tts(args) -> None:
    from models.inference import synthesize_tts

    r = synthesize_tts(args.policy, args.text, args.prompt, args.out, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, device=args.device)
    print(f"wrote {r['out']}: {r['seconds']:.2f} s from {r['frames']} RVQ-1 frames")


def cmd_vc(args) -> None:
    from models.inference import convert_voice

    r = convert_voice(args.policy, args.source, args.prompt, args.out, device=args.device)
    print(f"wrote {r['out']}: {r['seconds']:.2f} s from {r['frames']} source RVQ-1 frames")


def cmd_fingerprint(args) -> int:
    from align.fingerprint import check_fingerprint, record_fingerprint

    if args.record:
        record_fingerprint(args.config, args.reference, why=args.why or "", overrides=args.set)
        return 0
    if args.why:
        raise ValueError("--why goes with --record")
    result = check_fingerprint(args.config, args.reference, args.set)
    print(result.message)
    return 0 if result.passed else 1


def cmd_cache(args) -> None:
    from align.cache import describe, prune

    if args.prune:
        gone = prune(args.cache_dir, older_than_days=args.older_than, everything=args.all, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(gone)} entries ({sum(e.bytes for e in gone) / 1e6:.1f} MB) from {args.cache_dir}")
    elif args.older_than is not None or args.all or args.dry_run:
        raise ValueError("--older-than, --all and --dry-run go with --prune")
    print(describe(args.cache_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="speechalign", description="SpeechAlign: iterative preference alignment of codec language models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the embedded corpus and fit the codec for a config")
    p.add_argument("config", nargs="?", default="configs/tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("align", help="phone alignments (pocketsphinx, offline) beside a manifest's recordings, for "
                                     "policy.layout=interleaved on your own data")
    p.add_argument("source", help="a JSONL/CSV manifest or a LibriSpeech/LibriTTS/VCTK folder")
    p.add_argument("--overwrite", action="store_true", help="redo alignments that exist")
    p.set_defaults(fn=cmd_align)

    p = sub.add_parser("run", help="run or resume the alignment loop of a config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. dpo.beta=0.2")
    p.add_argument("--only-stage", choices=["base", "sample", "pair", "train", "dpo", "evaluate"],
                   help="re-run only this stage in every round (replaces its output); dpo: the old name of train")
    p.add_argument("--dry-run", action="store_true",
                   help="check paths, sizes, memory per stage and tokens per round without loading weights; "
                        "exit 0 if runnable (warnings allowed), 2 if something is missing or does not fit")
    p.add_argument("--nproc", type=int, default=1,
                   help="run on N processes: launches `accelerate launch --num_processes N` of this command (GPUs, "
                        "or CPU processes over gloo when there is no GPU); the same as launching it yourself")
    p.add_argument("--gpus", type=int, default=None, help="--dry-run: GPUs the run will use (default --nproc, "
                                                          "$WORLD_SIZE or 1)")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="--dry-run: memory per GPU in GB (default: the visible GPU, else 80)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("study", help="variants x seeds as runs, scored on dev every round; one table with CIs, paired "
                                     "tests and Holm (configs/studies/)")
    p.add_argument("study", help="study YAML (align/study.py documents its keys)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes)")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `speechalign run` line per run (for a cluster's scheduler) and stop")
    p.add_argument("--final", choices=["test"], default=None,
                   help="score the --variants chosen on dev on the test split, once, and report them")
    p.add_argument("--variants", nargs="+", default=None, help="with --final: the chosen variants")
    p.add_argument("--force", action="store_true",
                   help="with --final: read the final split again although it was read before (appended to the "
                        "study's reads and reported as forced; refused without it)")
    p.add_argument("--table-only", action="store_true",
                   help="write the table of what is evaluated so far, running nothing (a study still under way)")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("base", help="train only the base stage (round 0) of a config, e.g. --stage speechgpt")
    p.add_argument("config")
    p.add_argument("--stage", help="base stage to use (sets base.stage), e.g. speechgpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_base)

    p = sub.add_parser("chat", help="talk to a SpeechGPT policy in text or speech")
    p.add_argument("--policy", required=True, help="a SpeechGPT policy directory")
    p.add_argument("--text", help="the message (or the input, with --instruction)")
    p.add_argument("--wav", help="a spoken message (audio file)")
    p.add_argument("--instruction", help="instruction before 'This is input:' (default for --wav: answer in speech)")
    p.add_argument("--out", help="write the spoken part of the reply to this WAV")
    # published decoding defaults
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_chat)

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
    p.add_argument("more_runs", nargs="*", help="with --write-baseline: more runs of the config (other seeds); the "
                                                 "baseline is their per-utterance mean")
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
    p.add_argument("--asr-model", help="whisper: hub id (cached) or local folder; pocketsphinx: model folder")
    p.add_argument("--speaker", default="resemblyzer", help="resemblyzer, ecapa or wavlm")
    p.add_argument("--speaker-model", help="ecapa/wavlm: local folder (or cached hub id for wavlm)")
    p.add_argument("--quality", default="dnsmos_p808", help="dnsmos_p808, dnsmos or none")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="prompt and reference recordings longer than this are skipped (recorded in the output)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-audio", metavar="DIR",
                   help="keep every scored clip as DIR/<id>.wav (each output row records its path)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("tts", help="zero-shot TTS with a policy: text + voice prompt WAV -> WAV")
    p.add_argument("--policy", required=True, help="policy directory, e.g. runs/<name>/round_001/policy")
    p.add_argument("--text", required=True)
    p.add_argument("--prompt", required=True, help="WAV of the target voice")
    p.add_argument("--out", required=True)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_tts)

    p = sub.add_parser("vc", help="voice conversion: source WAV's RVQ-1 tokens + target voice prompt -> WAV")
    p.add_argument("--policy", required=True, help="policy directory (a flow renderer is what SpeechGPT-Gen uses)")
    p.add_argument("--source", required=True, help="WAV whose words are kept")
    p.add_argument("--prompt", required=True, help="WAV of the target voice")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_vc)

    p = sub.add_parser("fingerprint", help="the CI loop's deterministic tier: train the committed round-0 policy on "
                                           "the reference's fixed pairs and compare the per-step log with it")
    p.add_argument("config", nargs="?", default="configs/ci.yaml")
    p.add_argument("--reference", default="configs/ci_fingerprint.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--record", action="store_true", help="re-record the reference (deliberately: needs --why)")
    p.add_argument("--why", help="with --record: why the reference changes (kept in the file)")
    p.set_defaults(fn=cmd_fingerprint)

    p = sub.add_parser("cache", help="list the stage caches (samples, judgments, evaluations); prune what no current "
                                     "code can read")
    p.add_argument("--cache-dir", default="runs/_cache", help="the runs' cache_dir (default runs/_cache)")
    p.add_argument("--prune", action="store_true", help="remove entries made by other code (never read again)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="with --prune: also entries older than DAYS")
    p.add_argument("--all", action="store_true", help="with --prune: every stage-cache entry")
    p.add_argument("--dry-run", action="store_true", help="with --prune: list what would go, remove nothing")
    p.set_defaults(fn=cmd_cache)

    from eval.listen_app import add_subparser  # `speechalign listen`: Flask is imported when it runs

    add_subparser(sub)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code = args.fn(args)
        if code:
            return code
    except (ValueError, FloatingPointError) as e:
        # Bad input or config: one clear line, no traceback (use -v for it).
        if args.verbose:
            raise
        logging.getLogger("speechalign").error("%s", e)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
