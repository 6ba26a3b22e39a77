"""A study's statistics with the training seed as the unit, and its test split read once: synthetic tables and
state files built in code, no model trained.

Seeds: a p that pools (seed, utterance) pairs says "these runs differ"; with >= 2 seeds the table's p is a t-test of
the per-seed deltas (exact sign-flip over the seeds beside it) and its CI a two-stage bootstrap. Reads: every
``--final`` is appended to the study state, a second one is refused unless forced, and the results list them all.
"""
import json

import numpy as np
import pandas as pd
import pytest

from align.study import (ONE_SEED_NOTE, StudyConfig, final_evaluation, final_reads, markdown, plan, record_final_read,
                         state_path_of, study_tables, write_results)
from eval import stats

# within each seed every utterance moves the same way, but seed 2 moves the other way: per-seed WER deltas
# -0.5, -0.5, +0.1 (5 utterances of 10 words per seed)
FLIP = [[-5] * 5, [-5] * 5, [1] * 5]
# every seed agrees: per-seed deltas -0.30, -0.32, -0.28
AGREE = [[-3] * 5, [-3, -3, -3, -3, -4], [-3, -3, -3, -3, -2]]


def _table(diffs_by_seed: list[list[int]], *, with_round0: bool = False) -> pd.DataFrame:
    """Variant A and B at round 1 (and, with_round0, their shared round 0 = A's round 1): per seed s and utterance i,
    B has ``diffs_by_seed[s][i]`` more edit errors than A's 8 of 10 words, and 0.01 x that less SIM."""
    rows = []
    for s, diffs in enumerate(diffs_by_seed):
        for i, d in enumerate(diffs):
            key = dict(seed=s, id=f"s{s}:u{i}", sample=0, ref_words=10, dnsmos=np.nan)
            rows += [dict(key, run="A", round=1, errors=8, sim=0.5),
                     dict(key, run="B", round=1, errors=8 + d, sim=0.5 - 0.01 * d)]
            if with_round0:
                rows += [dict(key, run=v, round=0, errors=8, sim=0.5) for v in ("A", "B")]
    return pd.DataFrame(rows)


def _t_p_df2(deltas) -> float:
    """Two-sided one-sample t p with df = 2 by hand: t = mean / (sd / sqrt 3), p = 1 - |t| / sqrt(t^2 + 2)."""
    d = np.asarray(deltas, dtype=float)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    return float(1 - abs(t) / np.sqrt(t * t + 2))


def _wer(tests: pd.DataFrame) -> pd.Series:
    return tests.set_index("metric").loc["wer"]


def test_seeds_that_flip_are_no_evidence_though_every_utterance_moved():
    table = _table(FLIP)
    pooled = _wer(stats.run_tests(table.drop(columns="seed"), ["A", "B"], ["wer"]))  # as before: no seed column
    by_seed = _wer(stats.run_tests(table, ["A", "B"], ["wer"]))
    assert pooled["p"] < 0.005 and pooled["test"] == "sign-flip exact, 2^15 patterns"
    assert by_seed["test"] == "seed-level t (S=3, df=2)" and by_seed["seeds"] == 3 and by_seed["n"] == 15
    assert by_seed["p"] == pytest.approx(_t_p_df2([-0.5, -0.5, 0.1])) and by_seed["p"] > 0.2
    assert by_seed["p_seed_signflip"] == pytest.approx(0.5)  # |sum| 0.9 reached by 4 of the 8 sign patterns
    assert by_seed["p_within"] == pooled["p"]                  # the utterance-level p, kept for information
    assert by_seed["delta"] == pytest.approx(pooled["delta"]) == pytest.approx(-0.3)
    # the cluster bootstrap carries the between-seed spread: wider, and here across 0
    assert by_seed["delta_hi"] - by_seed["delta_lo"] > 2 * (pooled["delta_hi"] - pooled["delta_lo"])
    assert by_seed["delta_lo"] < 0 < by_seed["delta_hi"] and pooled["delta_hi"] < 0
    assert by_seed["better"] is None


def test_seeds_that_agree_give_a_small_t_p_and_the_exact_sign_flip_floor():
    t = _wer(stats.run_tests(_table(AGREE), ["A", "B"], ["wer", "sim"]))
    assert t["test"] == "seed-level t (S=3, df=2)"
    assert t["p"] == pytest.approx(_t_p_df2([-0.30, -0.32, -0.28])) and t["p"] < 0.01
    assert t["p_seed_signflip"] == 0.25  # all 3 one way: 2 of the 2^3 patterns, the smallest 3 seeds can give
    st = stats.seed_level_test(*stats.metric_arrays(_table(AGREE).query("run == 'A'"), "wer"),
                               *stats.metric_arrays(_table(AGREE).query("run == 'B'"), "wer"),
                               _table(AGREE).query("run == 'A'")["seed"].to_numpy())
    assert st.seed_deltas == pytest.approx([-0.30, -0.32, -0.28]) and st.df == 2 and st.n_seeds == 3
    assert st.lo <= -0.30 <= st.hi and st.hi < 0


def test_one_seed_keeps_the_utterance_level_test_and_seedless_tables_are_unchanged():
    one = _table([FLIP[0] + [-1, 0]])
    with_col = stats.run_tests(one, ["A", "B"], ["wer", "sim"])
    without = stats.run_tests(one.drop(columns="seed"), ["A", "B"], ["wer", "sim"])
    assert list(without.columns) == stats.TEST_COLUMNS
    pd.testing.assert_frame_equal(with_col, without)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.seed_level_test(np.ones(3), np.ones(3), np.zeros(3), np.ones(3), np.zeros(3))


def test_seed_deltas_that_do_not_vary_fall_back_to_the_sign_flip_p():
    t = _wer(stats.round_tests(_table(FLIP, with_round0=True).query("run == 'A'"), ["wer"]))  # A r1 = A r0
    assert t["p"] == 1.0 and "t undefined" in t["test"] and t["delta"] == 0


def test_cluster_bootstrap_is_seeded_and_pairs_a_and_b_on_the_same_draws():
    rng = np.random.default_rng(0)
    g = np.repeat([0, 1, 2, 3], 20)
    a = rng.integers(0, 5, 80).astype(float)
    den = np.full(80, 10.0)
    e = stats.cluster_bootstrap_delta(a, den, a, den, g, seed=3)
    assert (e.value, e.lo, e.hi, e.n) == (0.0, 0.0, 0.0, 80)  # B = A: every replicate's delta is exactly 0
    b = a + rng.normal(0.5, 1.0, 80)
    assert stats.cluster_bootstrap_delta(a, den, b, den, g, seed=3) == stats.cluster_bootstrap_delta(a, den, b, den, g,
                                                                                                   seed=3)


def _study(tmp_path, seeds=(0, 1, 2)) -> StudyConfig:
    return StudyConfig(name="syn", base=str(tmp_path / "base.yaml"), variants={"A": [], "B": ["train.method=sft"]},
                       reference="A", seeds=list(seeds), rounds=1, out_dir=str(tmp_path / "runs"),
                       results=str(tmp_path / "results"))


def test_study_markdown_names_the_seed_level_test_and_what_n_counts(tmp_path):
    est, tests = study_tables(_table(AGREE, with_round0=True), ["wer", "sim"], "A")
    md = markdown(_study(tmp_path), est, tests, "dev", "## Chosen on dev")
    assert "seed-level t (S=3, df=2)" in md and "n = seeds x utterances" in md and "S = seeds" in md
    assert "random seed intercept" in md and ONE_SEED_NOTE not in md
    assert "| B | A | metric | S | n |" in md
    assert (tests["p_holm"] >= tests["p"]).all() and set(tests["seeds"]) == {3}

    est1, tests1 = study_tables(_table([AGREE[0]], with_round0=True), ["wer", "sim"], "A")
    md1 = markdown(_study(tmp_path, seeds=[0]), est1, tests1, "dev", "## Chosen on dev")
    assert ONE_SEED_NOTE in md1 and "seed-level" not in md1 and "seeds" not in tests1.columns


def _state(tmp_path, **extra):
    path = tmp_path / "syn.study.json"
    path.write_text(json.dumps({"dev_digest": "d1", **extra}))
    return path


def test_a_second_read_of_the_test_split_is_refused_unless_forced_and_then_appended(tmp_path):
    path = _state(tmp_path)
    first = record_final_read(path, "test", ["B"], "d1")
    assert first["forced"] is False and first["after"] == "d1" and first["variants"] == ["B"]
    assert json.loads(path.read_text())["finals"] == [first]

    with pytest.raises(ValueError, match="already read") as e:
        record_final_read(path, "test", ["A"], "d1")
    assert first["at"] in str(e.value) and "for B" in str(e.value) and "--force" in str(e.value)
    assert json.loads(path.read_text())["finals"] == [first]  # the refused read left no trace

    second = record_final_read(path, "test", ["A"], "d1", force=True)
    state = json.loads(path.read_text())
    assert state["finals"] == [first, second] and second["forced"] is True and state["dev_digest"] == "d1"


def test_an_old_single_final_record_reads_as_the_first_read(tmp_path):
    old = {"split": "test", "variants": ["B"], "at": "2026-01-02 03:04:05", "after": "d0"}
    path = _state(tmp_path, final=old)
    assert final_reads(json.loads(path.read_text())) == [dict(old, forced=False)]
    with pytest.raises(ValueError, match="2026-01-02 03:04:05: test for B"):
        record_final_read(path, "test", ["A"], "d1")
    record_final_read(path, "test", ["A"], "d1", force=True)
    state = json.loads(path.read_text())
    assert "final" not in state and [r["variants"] for r in state["finals"]] == [["B"], ["A"]]
    assert [r["forced"] for r in state["finals"]] == [False, True]


def test_final_evaluation_refuses_a_second_read_before_evaluating_anything(tmp_path):
    study = _study(tmp_path)
    path = state_path_of(study)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"dev_digest": "d1"}))
    record_final_read(path, "test", ["B"], "d1")
    # the base config does not exist: reaching any run's evaluation would fail otherwise
    with pytest.raises(ValueError, match="already read"):
        final_evaluation(study, plan(study), ["A"])
    assert len(json.loads(path.read_text())["finals"]) == 1


def _fake_runs(study: StudyConfig) -> None:
    """Eval rows as a finished study's runs leave them: dev every round, test for round 0 and the last."""
    for spec in plan(study):
        if spec.variant is None:
            continue
        root = spec.run_dir(study.out_dir)
        for k in (0, 1):
            better = 1 if spec.variant == "B" and k == 1 else 0
            # B's round 1 gains a word on 3 of the 6 utterances with seed 0, on 4 with seed 1: seed deltas differ
            rows = [{"id": f"u{i}", "text": "one two three four", "wer": 0.5 - 0.25 * better * (i < 3 + spec.seed),
                     "sim": 0.5 + 0.01 * i * better} for i in range(6)]
            for d in (root / f"round_{k:03d}" / "eval", root / "final" / "test" / f"round_{k:03d}"):
                d.mkdir(parents=True)
                (d / "rows.jsonl").write_text("".join(json.dumps(dict(r, round=k)) + "\n" for r in rows))


def test_results_report_every_read_in_order_and_say_which_was_forced(tmp_path):
    study = _study(tmp_path, seeds=[0, 1])
    _fake_runs(study)
    specs = plan(study)
    write_results(study, specs, "syn.yaml")
    path = state_path_of(study)
    digest = json.loads(path.read_text())["dev_digest"]
    record_final_read(path, "test", ["B"], digest)
    record_final_read(path, "test", ["A", "B"], digest, force=True)
    md_path = write_results(study, specs, "syn.yaml")
    md = md_path.read_text()
    assert "seed-level t (S=2, df=1)" in md
    first = md.index("## Reported on test, read 1 of 2: B")
    second = md.index("## Reported on test, read 2 of 2 (forced): A, B")
    assert first < second and md.index("**Forced read**") > second
    assert "--variants A B --force`" in md and "--variants B`" in md
    finals = json.loads((tmp_path / "results" / "syn.json").read_text())["finals"]
    assert [(r["variants"], r["forced"], r["after"]) for r in finals] == [(["B"], False, digest),
                                                                          (["A", "B"], True, digest)]
    assert {e["n"] for e in finals[1]["estimates"]} == {12}  # 6 test utterances x 2 seeds
