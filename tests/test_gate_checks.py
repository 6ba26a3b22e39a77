"""The gate's checks of a run against itself (eval/gate.py) and the test under its defect check
(eval.stats.stratified_rate_test): each must see the fault it is there for and stay quiet on a working run.

The counts below are the CI loop's own (benchmarks/gate_power.py, clean seed 6, configs/ci.yaml: 12 test texts x 10
samples judged by the pause detector, round 0 and round 2): the run whose defect drop a bootstrap over texts called
noise (CI up to +0.033) while every text's samples said otherwise.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eval import stats
from eval.gate import GateConfig, _within_run_checks, first_step_violations, probe_movement

SEED6_ROUND0 = [2, 4, 1, 3, 1, 0, 5, 5, 4, 0, 5, 8]   # samples with a pause of 10, per text
SEED6_ROUND2 = [1, 1, 0, 3, 1, 0, 2, 3, 1, 1, 3, 1]


def test_a_halved_rate_on_fixed_texts_is_shown_where_a_bootstrap_over_texts_calls_it_noise():
    n = np.full(12, 10)
    k0, k2 = np.array(SEED6_ROUND0), np.array(SEED6_ROUND2)
    t = stats.stratified_rate_test(k0, n, k2, n)
    assert t.delta == pytest.approx((k2.sum() - k0.sum()) / 120)
    assert t.hi < 0 and t.p < 0.01 and t.n == 12 and t.samples == 240
    # the texts as the unit (what the gate did): their spread at round 0 (0 to 8 of 10) swamps the change
    old = stats.paired_test(k0 / 10, np.ones(12), k2 / 10, np.ones(12))
    assert old.delta == pytest.approx(t.delta) and old.hi > t.hi


def test_the_stratified_test_holds_its_level_when_nothing_changed():
    """200 null runs: 12 texts whose own rates differ (0 to 0.8), both rounds drawn from them. A 5% test may reject
    about 10; more than 20 (binomial tail p < 0.002 at a true 5%) would be a broken null."""
    rng = np.random.default_rng(1)
    rates = np.linspace(0, 0.8, 12)
    n = np.full(12, 10)
    rejects = sum(stats.stratified_rate_test(rng.binomial(n, rates), n, rng.binomial(n, rates), n, n_boot=200,
                                             n_resamples=2000, seed=i).p < 0.05 for i in range(200))
    assert rejects <= 20


def test_identical_counts_give_no_change_and_bad_counts_are_refused():
    t = stats.stratified_rate_test([3, 0, 10], [10, 10, 10], [3, 0, 10], [10, 10, 10])
    assert t.delta == 0 and t.p == 1.0
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.stratified_rate_test([11], [10], [0], [10])
    with pytest.raises(ValueError, match="equally long"):
        stats.stratified_rate_test([1, 2], [10, 10], [1], [10])


def _history(margin: float, logps: float = -300.0) -> list[dict]:
    return [{"step": 1, "loss": math.log1p(math.exp(-margin)), "rewards/chosen": margin / 2,
             "rewards/rejected": -margin / 2, "rewards/margins": margin, "logps/chosen": logps,
             "logps/rejected": logps},
            {"step": 2, "loss": 0.3, "rewards/chosen": 1.0, "rewards/rejected": -1.0, "rewards/margins": 2.0,
             "logps/chosen": logps, "logps/rejected": logps}]


def test_step_one_must_start_at_the_reference():
    assert first_step_violations(_history(0.0), sft_weight=0.0) == []
    # rounding of summed log-probs (1e-6 of 600 nats) is not a violation; a round's learning (1 nat x beta) is
    assert first_step_violations(_history(6e-4), sft_weight=0.0) == []
    bad = first_step_violations(_history(-1.22), sft_weight=0.0)
    assert any("rewards/margins = -1.22" in b for b in bad) and any("not ln 2" in b for b in bad)
    # with an SFT term the loss is not ln 2, but the rewards still are 0
    assert first_step_violations([dict(_history(0.0)[0], loss=2.0)], sft_weight=0.1) == []
    # later steps move, whatever they read; logs without rewards (GRPO, SFT) are not checked
    assert first_step_violations([{"step": 1, "loss": 3.0}], sft_weight=None) == []


def test_probe_movement_is_the_median_absolute_change_and_skips_unsayable_probes():
    assert probe_movement([0, 0, 0, 0], [1, -2, 30, -4]) == pytest.approx(3.0)
    assert probe_movement([0, float("-inf"), 0], [5, 1, -5]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="same probes"):
        probe_movement([0, 0], [1])


def _fake_run(root, k0, k2, margins0, margins2, reward_step1):
    """A run directory holding what the own-run checks read: rows.jsonl (defect shares over 1 + 9 samples),
    probes.json and round 2's training log."""
    for k, (counts, margins) in enumerate([(k0, margins0), (None, None), (k2, margins2)]):
        ev = root / f"round_{k:03d}" / "eval"
        ev.mkdir(parents=True)
        if counts is not None:
            ev.joinpath("rows.jsonl").write_text("".join(
                json.dumps({"id": f"u{i}", "sample": 0, "defect": c / 10, "pauses": [0.0] * 9}) + "\n"
                for i, c in enumerate(counts)))
            ev.joinpath("probes.json").write_text(json.dumps({"margins": margins, "ids": []}))
        tr = root / f"round_{k:03d}" / "train"
        tr.mkdir(parents=True)
        if k:
            tr.joinpath("metrics.json").write_text(json.dumps({"history": _history(reward_step1 if k == 2 else 0.0)}))
    return root


def test_the_own_run_checks_pass_a_working_run_and_name_each_fault(tmp_path):
    cfg = GateConfig(defect_drop=0.0, min_probe_movement=7.0)
    moved = list(np.linspace(-40, 40, 36))
    good = _fake_run(tmp_path / "good", SEED6_ROUND0, SEED6_ROUND2, [0.0] * 36, moved, 0.0)
    checks = {c["metric"]: c for c in _within_run_checks(good, 2, cfg)}
    assert not any(c["failed"] for c in checks.values()), checks
    assert checks["defect_drop"]["samples"] == 240 and "texts held fixed" in checks["defect_drop"]["message"]
    # a trainer that moved the policy a tenth as far; a round 2 trained against round 0; a rate that did not fall
    still = _fake_run(tmp_path / "still", SEED6_ROUND0, SEED6_ROUND0, [0.0] * 36, [m / 20 for m in moved], -1.22)
    failed = {c["metric"] for c in _within_run_checks(still, 2, cfg) if c["failed"]}
    assert failed == {"defect_drop", "probe_movement", "first_step"}


def test_a_defect_share_that_is_no_count_of_its_samples_is_refused(tmp_path):
    run = _fake_run(tmp_path / "r", SEED6_ROUND0, SEED6_ROUND2, [0.0] * 36, [0.0] * 36, 0.0)
    rows = run / "round_002" / "eval" / "rows.jsonl"
    rows.write_text(rows.read_text().replace('"defect": 0.1,', '"defect": 0.15,', 1))
    with pytest.raises(ValueError, match="not a share of its 10 samples"):
        _within_run_checks(run, 2, GateConfig(defect_drop=0.0))
