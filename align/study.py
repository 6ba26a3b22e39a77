"""``speechalign study STUDY.yaml``: which setting makes a policy better, and is the difference real?

A study file names a base config, the seeds and rounds, the variants (name -> ``--set`` overrides; one
is the reference) and the split settings are chosen on (dev). Every variant x seed is an ordinary run
directory (resumable; a finished run is read, not run again) whose every round is scored on dev by the
loop's own evaluation (``eval.split=dev``). Variants that change nothing of round 0 start from one
round-0 policy per seed (trained once, or a finished run's, ``round0``), so they differ only in their
rounds; the same policy scored again on the same items is read from the evaluation cache.

The table (Markdown + CSV + JSON + a plot per metric): per variant and round, WER and SIM pooled over the
seeds with bootstrap CIs; paired tests on (seed, utterance id) of every round vs round 0 and of every
variant vs the reference at each round; n and the test's name beside each p; Holm over every test of
the study. With >= 2 seeds the unit of those tests is the training seed (``eval.stats.seed_level_test``: a
t-test of the per-seed deltas, the exact sign-flip p over the seeds beside it, a two-stage bootstrap CI), since
the question is whether the method, not these runs, does better; with one seed the test is per utterance and the
table says that its p is about these two runs only. ``--final test --variants A B`` then scores the chosen
variants' round 0 and last round on the test split, once: every read is appended to the study's state
(<out_dir>/<name>.study.json, ``finals``) with the dev table it came after, and a second read is refused unless
``--force``, which the results then report.

    speechalign study configs/studies/efficacy.yaml                 # run what is missing, write the table
    speechalign study configs/studies/efficacy.yaml --jobs 2        # two runs at once
    speechalign study configs/studies/efficacy.yaml --print-commands   # one `speechalign run` line per run
    speechalign study configs/studies/efficacy.yaml --final test --variants judged_rpo
    speechalign study configs/studies/efficacy.yaml --final test --variants other --force   # a second read, marked
"""
from __future__ import annotations

import hashlib
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from models.configutil import from_dict, load_yaml

log = logging.getLogger("speechalign.study")

# Config sections a round-0 policy depends on: a variant that overrides one of them trains its own base.
ROUND0_KEYS = ("seed", "data", "corpus", "codec", "policy", "base", "speechgpt_gen")


@dataclass
class StudyConfig:
    """A study: variants of a base config, run on seeds, compared on the dev split."""

    name: str = field(metadata={"help": "the study's name: its runs are <out_dir>/<name>-<variant>-s<seed>"})
    base: str = field(metadata={"help": "the run config every variant starts from (a YAML path)"})
    variants: dict[str, list[str]] = field(metadata={
        "help": "variant name -> its `key.sub=value` overrides of the base config (an empty list: the base as is)"})
    reference: str = field(metadata={"help": "the variant every other one is compared with"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "run seeds; results pool over them"})
    rounds: int = field(default=3, metadata={"help": "alignment rounds of every run"})
    choose_on: str = field(default="dev", metadata={
        "help": "the split every round is scored on while choosing (dev); the test split is read once, with "
                "--final test"})
    metrics: list[str] = field(default_factory=lambda: ["wer", "sim"], metadata={"help": "metrics of the table"})
    set: list[str] = field(default_factory=list, metadata={"help": "overrides of every run of the study"})
    round0: dict[str, str] = field(default_factory=dict, metadata={
        "help": "seed -> a finished round-0 policy directory to start that seed's variants from (else each seed's "
                "is trained once, as run <name>-r0-s<seed>)"})
    out_dir: str = field(default="runs/studies", metadata={"help": "where the study's run directories go"})
    results: str = field(default="benchmarks/results", metadata={
        "help": "where <name>.md / .csv / .json and the plots go"})

    def __post_init__(self):
        self.variants = {str(k): [str(o) for o in (v or [])] for k, v in self.variants.items()}
        self.round0 = {str(k): str(v) for k, v in self.round0.items()}
        if self.reference not in self.variants:
            raise ValueError(f"study reference={self.reference!r} is not one of the variants {sorted(self.variants)}")
        if not self.seeds or self.rounds < 0:
            raise ValueError("a study needs at least one seed and rounds >= 0")
        if self.choose_on != "dev":
            raise ValueError(f"choose_on={self.choose_on!r}: settings are chosen on dev (the test split is read once, "
                             "with --final test)")
        from eval.stats import METRICS

        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"study metrics {bad} unknown; choose from {', '.join(METRICS)}")
        for name, overrides in self.variants.items():
            if not name or "/" in name or " " in name:
                raise ValueError(f"variant name {name!r} must be a non-empty word (it names run directories)")
            for o in overrides:
                if "=" not in o:
                    raise ValueError(f"variant {name}: override {o!r} is not key.sub=value")
                if o.split("=", 1)[0] in ("name", "out_dir", "rounds", "seed", "eval.split"):
                    raise ValueError(f"variant {name}: {o!r} is set by the study itself (name, out_dir, rounds, seed, "
                                     "eval.split); change the study's own field instead")


def load_study(path: str | Path) -> StudyConfig:
    return from_dict(StudyConfig, load_yaml(path))


@dataclass
class RunSpec:
    """One run of a study: its name, the config and overrides to run it with, and the runs it waits for."""

    name: str
    variant: str | None  # None: a seed's shared round-0 run
    seed: int
    config: str
    overrides: list[str]
    after: list[str] = field(default_factory=list)

    def command(self) -> str:
        """The `speechalign run` line that runs (or resumes) it."""
        return " ".join(["speechalign", "run", shlex.quote(self.config)] +
                        [f"--set {shlex.quote(o)}" for o in self.overrides])

    def run_dir(self, out_dir: str) -> Path:
        return Path(out_dir) / self.name


def touches_round0(overrides: list[str]) -> bool:
    return any(o.split("=", 1)[0].split(".")[0] in ROUND0_KEYS for o in overrides)


def plan(study: StudyConfig) -> list[RunSpec]:
    """The study's runs in an order that runs each after what it needs (shared round-0 runs first)."""
    specs = []
    for seed in study.seeds:
        common = [*study.set, f"seed={seed}", f"out_dir={study.out_dir}", f"eval.split={study.choose_on}"]
        shared = study.round0.get(str(seed))
        base_run = None
        if shared is None and any(not touches_round0(v) for v in study.variants.values()):
            base_run = RunSpec(f"{study.name}-r0-s{seed}", None, seed, study.base,
                               [*common, f"name={study.name}-r0-s{seed}", "rounds=0"])
            specs.append(base_run)
            shared = str(base_run.run_dir(study.out_dir) / "round_000" / "policy")
        for variant, overrides in study.variants.items():
            name = f"{study.name}-{variant}-s{seed}"
            own_base = touches_round0(overrides)
            specs.append(RunSpec(name, variant, seed, study.base,
                                 [*common, *overrides, f"name={name}", f"rounds={study.rounds}",
                                  *([] if own_base else [f"policy.pretrained={shared}"])],
                                 after=[] if own_base or base_run is None else [base_run.name]))
    return specs


def run_spec(spec: RunSpec) -> Path:
    """Run (or resume, or read if finished) one run in this process."""
    from align.config import load_config
    from align.loop import run_loop

    return run_loop(load_config(spec.config, spec.overrides))


def run_all(specs: list[RunSpec], jobs: int = 1) -> None:
    """Every run of ``specs``: in this process one after another, or ``jobs`` `speechalign run` processes at once,
    each started once the runs it waits for are done. A failed run stops the study (its error is raised)."""
    if jobs <= 1:
        for spec in specs:
            log.info("study: run %s", spec.name)
            run_spec(spec)
        return
    import subprocess
    import sys

    pending, running, done = list(specs), {}, set()
    while pending or running:
        for spec in list(pending):
            if len(running) < jobs and all(a in done for a in spec.after):
                argv = [sys.executable, "-m", "align.cli", "run", spec.config,
                        *[x for o in spec.overrides for x in ("--set", o)]]
                log.info("study: starting %s", spec.name)
                running[spec.name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
                pending.remove(spec)
        time.sleep(1.0)
        for name, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[name]
            if code != 0:
                for p in running.values():
                    p.terminate()
                raise RuntimeError(f"study run {name} failed (exit {code}); its log: <out_dir>/{name}/log.txt. "
                                   "Rerun the study: finished runs are read, the failed one resumes")
            done.add(name)


# -------------------------------------------------------------------------------------------------
# Tables
# -------------------------------------------------------------------------------------------------
def variant_table(study: StudyConfig, specs: list[RunSpec], split: str = "dev", variants: list[str] | None = None
                  ) -> pd.DataFrame:
    """Every variant's evaluated rounds pooled over seeds: one row per (variant, round, seed, utterance); ``run`` is
    the variant, ``seed`` the run's training seed (the unit of the seed-level tests) and ``id`` is
    ``s<seed>:<utterance id>`` so that even a test blind to ``seed`` pairs within a seed."""
    from eval.table import load_table, read_jsonl, rows_frame

    frames = []
    for spec in specs:
        if spec.variant is None or (variants is not None and spec.variant not in variants):
            continue
        root = spec.run_dir(study.out_dir)
        if split == study.choose_on:
            try:
                t = load_table(root)
            except ValueError:  # not evaluated yet (--table-only on a study still running)
                log.warning("study %s: %s has no evaluated round yet; left out of the table", study.name, spec.name)
                continue
        else:
            parts = [rows_frame(read_jsonl(f), round_=int(f.parent.name.split("_")[1]))
                     for f in sorted((root / "final" / split).glob("round_*/rows.jsonl"))]
            if not parts:
                raise ValueError(f"{root}: no {split} evaluation; run the study with --final {split} --variants ...")
            t = pd.concat(parts, ignore_index=True)
        t = t[t["round"] <= study.rounds].copy()
        t["run"] = spec.variant
        t["seed"] = spec.seed
        t["id"] = [f"s{spec.seed}:{i}" for i in t["id"]]
        frames.append(t)
    if not frames:
        raise ValueError("the study has no evaluated runs yet")
    return pd.concat(frames, ignore_index=True)


def study_tables(table: pd.DataFrame, metrics: list[str], reference: str, *, n_boot: int = 2000, seed: int = 0
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(estimates per variant and round, tests): every round vs round 0 within a variant, every variant vs the
    reference at each round; Holm over all of them together.

    table: ``variant_table``'s rows. Its ``seed`` column makes a comparison whose paired rows span >= 2 seeds a
    seed-level test (``eval.stats.seed_level_test``: p and CI with the seed as the unit, ``p_within`` the
    utterance-level p beside it); with one seed the tests are per utterance (``eval.stats.paired_test``)."""
    from eval.stats import correct_tests, round_estimates, round_tests, run_tests

    est = round_estimates(table, metrics, n_boot=n_boot, seed=seed)
    rounds = sorted(int(k) for k in table["round"].unique())
    vs_r0 = round_tests(table, metrics, n_boot=n_boot, seed=seed)
    vs_r0 = vs_r0[vs_r0["vs_round"] == 0]
    runs = [reference] + sorted(v for v in table["run"].unique() if v != reference)
    # variants that share round 0 differ from the reference from round 1 on; a study of round 0 alone compares there
    later = [k for k in rounds if k > 0]
    vs_ref = run_tests(table, runs, metrics, rounds=later or [0], n_boot=n_boot, seed=seed)
    return est, correct_tests(pd.concat([vs_r0, vs_ref], ignore_index=True), "holm")


def _fmt_p(p: float) -> str:
    return "-" if pd.isna(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


ONE_SEED_NOTE = ("One training seed: p says these two runs differ on these utterances; it does not include the "
                 "variance between training seeds, so it is not a test of the method.")


def _seed_level(tests: pd.DataFrame) -> pd.Series:
    """Per test row: whether it was tested with the seed as the unit."""
    return tests["seeds"].notna() if "seeds" in tests.columns else pd.Series(False, index=tests.index)


def markdown(study: StudyConfig, est: pd.DataFrame, tests: pd.DataFrame, split: str, header: str) -> str:
    """The table as Markdown: estimates, then every test with n, its name and Holm; the header says which test
    (seed-level with >= 2 seeds, else per utterance, with what a one-seed p means) and what n counts."""
    several = "seeds" in est.columns and bool((est["seeds"] >= 2).any())
    ci = ("two-stage bootstrap (seeds with replacement, then utterances within each drawn seed; 2000 resamples, "
          "seeded)" if several else "percentile bootstrap over utterances (2000 resamples, seeded)")
    lines = [header, "", f"Per variant and round, on the {split} split, pooled over seeds {study.seeds} "
             f"({int(est['n'].max())} utterance-seed pairs per round at most). CI: 95% {ci}.", ""]
    cols = ["variant", "round", "n"] + [c for m in study.metrics for c in (m, f"{m} 95% CI")]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in est.sort_values(["run", "round"]).iterrows():
        cells = [str(r["run"]), str(int(r["round"])), str(int(r["n"]))]
        for m in study.metrics:
            cells += [f"{r[m]:.4f}", f"[{r[f'{m}_lo']:.4f}, {r[f'{m}_hi']:.4f}]"] if m in r and pd.notna(r[m]) else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    by_seed = _seed_level(tests)
    lines += ["", "Paired tests: B - A on the same utterances of the same seed (WER pairs per-utterance edit errors); "
              f"Holm over every test below ({len(tests)})."]
    if by_seed.any():
        s = sorted({int(x) for x in tests.loc[by_seed, "seeds"]})
        lines += ["", f"Seed-level tests ({' / '.join(map(str, s))} seeds): the unit is the training seed, so p is "
                  "about the method, not these runs. Per seed, delta_s = metric(B) - metric(A) on that seed's paired "
                  "utterances; p: two-sided one-sample t-test of the S seed deltas (df = S - 1; what a mixed model "
                  "with a random seed intercept reduces to for this balanced design; where the seed deltas do not "
                  "vary at all t is undefined and p is the sign-flip one, as the test column says); "
                  "`sign-flip (seeds)`: the "
                  "exact sign-flip p over the 2^S sign patterns of the seed deltas (never below 2/2^S), beside it; "
                  "`p within`: the utterance-level sign-flip p pooling (seed, utterance) pairs, for information "
                  "only (it leaves the variance between seeds out). 95% CI: two-stage bootstrap (seeds with "
                  "replacement, then utterances within each drawn seed; 2000 resamples, seeded). "
                  "n = seeds x utterances paired; S = seeds."]
    if not by_seed.all():
        which = "Rows with S = 1 are utterance-level" if by_seed.any() else "Utterance-level tests"
        lines += ["", f"{which}: p: two-sided sign-flip test on the "
                  "paired per-utterance differences (exact up to 16 differing pairs, else seeded Monte Carlo); 95% CI: "
                  "percentile bootstrap over utterances; n = utterances paired. " + ONE_SEED_NOTE]
    if by_seed.any():
        head = ["B", "A", "metric", "S", "n", "delta", "95% CI", "p", "test", "sign-flip (seeds)", "p within",
                "p (Holm)"]
    else:
        head = ["B", "A", "metric", "n", "delta", "95% CI", "p", "test", "p (Holm)"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in tests.iterrows():
        cells = [f"{t['run']} r{int(t['round'])}", f"{t['vs_run']} r{int(t['vs_round'])}", str(t["metric"])]
        if by_seed.any():
            cells.append(str(int(t["seeds"])) if by_seed[i] else "1")
        cells += [str(int(t["n"])), f"{t['delta']:+.4f}", f"[{t['delta_lo']:+.4f}, {t['delta_hi']:+.4f}]",
                  _fmt_p(t["p"]), str(t["test"])]
        if by_seed.any():
            cells += [_fmt_p(t["p_seed_signflip"]), _fmt_p(t["p_within"])]
        cells.append(_fmt_p(t["p_holm"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(study: StudyConfig, specs: list[RunSpec]) -> str:
    """Per run and round: the method, the pairs it trained on, its last-steps loss, and with train.validate_every the
    dev-best step the round kept (step 0: the round left the policy as it was) and its WER on the validation subset
    of dev (each round's train/metrics.json)."""
    from models.io import read_json
    from models.rundir import RunLayout

    lines = ["Training, per run and round (`kept step`: the dev-best checkpoint the round kept, 0 = round k-1's policy "
             "unchanged; `val. WER`: its WER on the validation subset of dev).", "",
             "| run | round | method | pairs | loss | kept step | val. WER |", "|---|---|---|---|---|---|---|"]
    for spec in specs:
        layout = RunLayout(spec.run_dir(study.out_dir))
        for k in range(1, study.rounds + 1):
            path = layout.train_dir(k) / "metrics.json"
            if spec.variant is None or not path.is_file():
                continue
            r = read_json(path)["summary"]

            def cell(key, fmt="{}"):
                return "-" if r.get(key) is None else fmt.format(r[key])
            lines.append(f"| {spec.name} | {k} | {cell('method')} | {cell('pairs')} | {cell('loss', '{:.3f}')} | "
                         f"{cell('chosen_step')} | {cell('dev_wer', '{:.3f}')} |")
    return "\n".join(lines)


def _finished(spec: RunSpec, study: StudyConfig) -> bool:
    from models.rundir import RunLayout

    return (RunLayout(spec.run_dir(study.out_dir)).eval_dir(study.rounds) / "rows.jsonl").is_file()


def _digest(df: pd.DataFrame) -> str:
    return hashlib.sha1(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:12]


def state_path_of(study: StudyConfig) -> Path:
    """The study's state file: the dev table's digest and every read of the final split."""
    return Path(study.out_dir) / f"{study.name}.study.json"


def final_reads(state: dict) -> list[dict]:
    """The reads of the final split recorded in a study state, oldest first: dicts with split, variants, at, after
    (the dev table's digest) and forced. A state written before reads were a list (one ``final`` record, which
    overwrote its predecessor) reads as a one-element list."""
    if "finals" in state:
        return [dict(r) for r in state["finals"]]
    if state.get("final"):
        return [dict({"forced": False}, **state["final"])]
    return []


def record_final_read(state_path: str | Path, split: str, variants: list[str], dev_digest: str, *,
                      force: bool = False) -> dict:
    """Append a read of ``split`` for ``variants`` to the study state at ``state_path`` (atomically) and return it.

    The final split is read once, after the choice: once its numbers are seen, another read (other variants, say)
    is a choice made on it. So a study that already has a read is refused with a ``ValueError`` naming that read,
    unless ``force``; a forced read is appended with ``forced: True`` (never replacing the earlier ones), and the
    results report it as such. Called before any evaluation: a read that starts is a read, even if it crashes.
    """
    from models.io import read_json, write_json

    state_path = Path(state_path)
    state = read_json(state_path) if state_path.exists() else {}
    reads = final_reads(state)
    if reads and not force:
        earlier = "; ".join(f"read {i} on {r['at']}: {r['split']} for {', '.join(r['variants'])}"
                            + (" (forced)" if r.get("forced") else "") for i, r in enumerate(reads, 1))
        raise ValueError(f"the {split} split of this study was already read ({earlier}; recorded in {state_path}). "
                         "It is read once, after the choice: report that read. To read it again anyway (e.g. that "
                         "read crashed before it finished; finished evaluations are cached), pass --force: the read "
                         "is appended and the results say it was forced")
    read = {"split": split, "variants": list(variants), "at": time.strftime("%Y-%m-%d %H:%M:%S"), "after": dev_digest,
            "forced": bool(reads)}  # forced: it came after an earlier read (--force on a first read changes nothing)
    state.pop("final", None)  # migrated into the list: one record of the reads, not two
    state["finals"] = reads + [read]
    write_json(state_path, state)
    return read


def write_results(study: StudyConfig, specs: list[RunSpec], study_path: str) -> Path:
    """The dev table (and, after it, one table per read of the final split, in order, forced reads marked) as
    <results>/<name>.md/.csv/.json."""
    from eval.plots import metric_vs_round
    from models.io import atomic_write_text, read_json, write_json

    out = Path(study.results)
    out.mkdir(parents=True, exist_ok=True)
    table = variant_table(study, specs, split=study.choose_on)
    est, tests = study_tables(table, study.metrics, study.reference)
    state_path = state_path_of(study)
    state = read_json(state_path) if state_path.exists() else {}
    digest = _digest(table[["run", "round", "id", "errors", "ref_words", "sim"]])
    if state.get("dev_digest") != digest:
        state.update(dev_digest=digest, dev_written=time.strftime("%Y-%m-%d %H:%M:%S"))
        write_json(state_path, state)
    cmd = f"speechalign study {study_path}"
    md = [f"# Study `{study.name}`", "",
          f"Regenerate: `{cmd}` (finished runs are read, not rerun). Runs: `{study.out_dir}/{study.name}-*`; base "
          f"config `{study.base}`; reference variant `{study.reference}`; {study.rounds} rounds.", "",
          "| variant | overrides |", "|---|---|"]
    md += [f"| {v} | {' '.join(f'`{o}`' for o in o_) or '(the base config)'} |" for v, o_ in study.variants.items()]
    unfinished = [spec.name for spec in specs if spec.variant is not None and not _finished(spec, study)]
    if unfinished:
        md += ["", f"**Unfinished**: {', '.join(unfinished)} (not every round evaluated yet; the table holds what is)."]
    md += ["", markdown(study, est, tests, study.choose_on, f"## Chosen on {study.choose_on} (table {digest})")]
    md += ["", training_table(study, specs)]
    figs = {}
    for m in study.metrics:
        if m in est:
            path = out / f"{study.name}_{m}.png"
            metric_vs_round(est, m, path)
            figs[m] = path.name
            md += ["", f"![{m} per round]({path.name})"]
    result = {"study": study.name, "command": cmd, "split": study.choose_on, "dev_digest": digest,
              "estimates": est.to_dict(orient="records"), "tests": tests.to_dict(orient="records")}
    reads = final_reads(state)
    result["finals"] = []
    for i, read in enumerate(reads, 1):
        ftable = variant_table(study, specs, split=read["split"], variants=read["variants"])
        fref = study.reference if study.reference in read["variants"] else read["variants"][0]
        fest, ftests = study_tables(ftable, study.metrics, fref)
        forced = " --force" if read.get("forced") else ""
        md += ["", markdown(study, fest, ftests, read["split"],
                            f"## Reported on {read['split']}, read {i} of {len(reads)}"
                            f"{' (forced)' if forced else ''}: {', '.join(read['variants'])}"),
               "", f"Evaluated on {read['split']} on {read['at']}, after the {study.choose_on} table {read['after']} "
               + (f"(written {state.get('dev_written')}) " if read["after"] == digest else
                  f"(the {study.choose_on} table has changed since: now {digest}) ")
               + f"they were chosen on: `{cmd} --final {read['split']} --variants "
               f"{' '.join(read['variants'])}{forced}`."]
        if forced:
            md += ["", f"**Forced read**: made with `--force` after {'read 1' if i == 2 else f'reads 1-{i - 1}'} of "
                   f"the {read['split']} split, whose numbers had been seen; its variants may have been chosen on "
                   f"{read['split']}, so its p-values are not those of a single look."]
        result["finals"].append(dict(read, estimates=fest.to_dict(orient="records"),
                                     tests=ftests.to_dict(orient="records")))
    atomic_write_text(out / f"{study.name}.md", "\n".join(md) + "\n")
    tests.to_csv(out / f"{study.name}.csv", index=False)
    write_json(out / f"{study.name}.json", result)
    return out / f"{study.name}.md"


def final_evaluation(study: StudyConfig, specs: list[RunSpec], variants: list[str], split: str = "test", *,
                     force: bool = False) -> None:
    """Score round 0 and the last round of the chosen variants' runs on ``split`` (finished evaluations are cached;
    round 0 is one policy per seed) into <run>/final/<split>/round_k/, after recording the read in the study's state
    with the dev table it came after (``record_final_read``: a second read is refused unless ``force``)."""
    from align.config import load_config
    from align.run import Context, RunDir
    from align.stages import eval_items, eval_store
    from eval.evaluate import evaluate_policy
    from models.codec_lm import Policy
    from models.io import read_json, write_json, write_jsonl

    unknown = [v for v in variants if v not in study.variants]
    if unknown:
        raise ValueError(f"--variants {unknown} are not variants of study {study.name}: {sorted(study.variants)}")
    state_path = state_path_of(study)
    state = read_json(state_path) if state_path.exists() else {}
    if "dev_digest" not in state:
        raise ValueError(f"study {study.name} has no {study.choose_on} table yet: run it without --final first, "
                         "and choose on that")
    record_final_read(state_path, split, variants, state["dev_digest"], force=force)
    for spec in specs:
        if spec.variant not in variants:
            continue
        cfg = load_config(spec.config, spec.overrides)
        run = RunDir(cfg)
        ctx = Context(cfg, run)
        items = eval_items(ctx, ctx.splits.test if split == "test" else ctx.splits.dev)
        ecfg = cfg.eval
        for k in sorted({0, study.rounds}):  # the comparisons reported: the last round vs round 0 and vs the others
            out = run.root / "final" / split / f"round_{k:03d}"
            if (out / "rows.jsonl").exists():
                continue
            policy = Policy.load(run.policy_dir(k), device=ctx.device)
            summary, rows = evaluate_policy(policy, items, scorers=ctx.scorers, temperature=ecfg.temperature,
                                            top_k=ecfg.top_k, top_p=ecfg.top_p, seed=cfg.seed + 7,
                                            batch_size=ecfg.batch_size, max_seconds=cfg.data.max_seconds,
                                            store=eval_store(ctx, run.policy_dir(k), items), defect=ecfg.defect,
                                            defect_samples=ecfg.defect_samples)
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / "rows.jsonl", [dict(r, round=k) for r in rows])
            write_json(out / "summary.json", summary)
            log.info("study %s: %s round %d on %s: WER %.3f SIM %.3f (n=%d)", study.name, spec.name, k, split,
                     summary["wer"], summary["sim"], summary["n"])


def run_study(path: str, *, jobs: int = 1, print_commands: bool = False, final: str | None = None,
              variants: list[str] | None = None, table_only: bool = False, force: bool = False) -> Path | None:
    """The CLI's `speechalign study`: print the commands, or run what is missing and write the results (with
    ``table_only``, the table of what has been evaluated so far, running nothing; with ``final``, the chosen
    variants' finished runs on the final split, training nothing, refused if that split was read before unless
    ``force``)."""
    if force and final is None:
        raise ValueError("--force only applies to --final (a second read of the final split)")
    study = load_study(path)
    specs = plan(study)
    if print_commands:
        for spec in specs:
            print(spec.command())
        return None
    if final is not None:
        # the test split is read after the choice, for the chosen variants' finished runs: nothing is trained here
        if not variants:
            raise ValueError("--final needs --variants: the variants chosen on the dev table")
        unfinished = [s.name for s in specs if s.variant in variants and not _finished(s, study)]
        if unfinished:
            raise ValueError(f"--final {final}: {', '.join(unfinished)} not finished; run the study first")
        write_results(study, specs, path)  # the dev table first: the choice it records precedes the test scores
        final_evaluation(study, specs, variants, final, force=force)
    elif not table_only:
        run_all(specs, jobs)
    out = write_results(study, specs, path)
    log.info("study %s: %s", study.name, out)
    return out
