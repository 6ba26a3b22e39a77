"""The CI loop's deterministic tier (align/fingerprint.py) and a fast subset of the planted faults it must catch
(tests/mutations.py; benchmarks/gate_power.py runs them all through every tier)."""
from __future__ import annotations

import json
import math

import pytest

from .conftest import CI_CONFIG, REPO
from .mutations import MUTATIONS

REFERENCE = REPO / "configs" / "ci_fingerprint.json"


def test_the_training_fingerprint_matches_its_committed_reference():
    """configs/ci.yaml's trainer on the reference's fixed pairs, from the committed round-0 policy: every step's loss,
    grad norm, log-probs and rewards within the recorded tolerances, step 1's rewards 0 in both rounds."""
    from align.fingerprint import check_fingerprint

    ref = json.loads(REFERENCE.read_text())
    assert ref["why"].strip() and ref["rows"] and ref["pairs"]  # a reference says why it was recorded
    result = check_fingerprint(str(CI_CONFIG), REFERENCE)
    assert result.passed, result.message


@pytest.fixture(scope="module")
def small():
    """A fingerprint at a quarter of the size (2 rounds x 2 steps on 4 + 4 of the reference's pairs): the clean one."""
    from align.config import load_config
    from align.fingerprint import run_fingerprint

    ref = json.loads(REFERENCE.read_text())
    overrides = ["dpo.steps=2", "dpo.save_steps=100"]
    cfg = load_config(CI_CONFIG, overrides)
    pairs = ref["pairs"][:4] + ref["pairs"][len(ref["pairs"]) // 2:][:4]
    return cfg, overrides, pairs, run_fingerprint(cfg, cfg.policy.pretrained, pairs)


def test_a_fingerprint_of_the_same_code_is_the_same_and_starts_at_the_reference(small):
    from align.fingerprint import compare_fingerprint, run_fingerprint
    from eval.gate import first_step_violations

    cfg, _, pairs, clean = small
    assert not first_step_violations(clean, cfg.dpo.sft_weight)
    again = run_fingerprint(cfg, cfg.policy.pretrained, pairs)
    floor = {k: {"max": 1e-5 * (1 + max(abs(r[k]) for r in clean)), "mean": 1e-5 * (1 + max(abs(r[k]) for r in clean))}
             for k in clean[0] if k not in ("round", "step")}
    assert compare_fingerprint(again, {"rows": clean, "tolerance": floor}, cfg.dpo.sft_weight).passed


def test_sigmoid_dpo_starts_at_ln_2_where_the_policy_is_its_reference(small):
    from align.config import load_config
    from align.fingerprint import run_fingerprint

    _, overrides, pairs, _ = small
    cfg = load_config(CI_CONFIG, overrides + ["dpo.sft_weight=0", "dpo.steps=1"])
    rows = run_fingerprint(cfg, cfg.policy.pretrained, pairs[:4], rounds=1)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["rewards/margins"] == 0


@pytest.mark.parametrize("name", ["swapped_pairs", "reference_round0", "sft_weight_ignored"])
def test_a_planted_fault_moves_the_fingerprint(small, name):
    from align.config import load_config
    from align.fingerprint import compare_fingerprint, run_fingerprint, tolerances

    cfg, overrides, pairs, clean = small
    m = MUTATIONS[name]
    with m.active():
        bad_cfg = load_config(CI_CONFIG, overrides + m.overrides(cfg))
        rows = run_fingerprint(bad_cfg, bad_cfg.policy.pretrained, pairs)
    # the tolerance a recorded reference would carry for runs that agree to the bit: its arithmetic floor alone
    result = compare_fingerprint(rows, {"rows": clean, "tolerance": tolerances([clean])}, cfg.dpo.sft_weight)
    assert not result.passed, f"{name} went unnoticed: {result.message}"


def test_a_hotter_sampler_moves_the_sampling_fingerprint():
    """The temperature fault every other tier missed (benchmarks/results/gate_power.md): the committed round-0 policy
    drawing at 1.2 instead of the run's decodings moves the mean log-prob of what it drew beyond 4 sd of the recorded
    seeds, for the pair stage's sampling and the evaluation's alike."""
    from align.config import load_config
    from align.fingerprint import compare_sampling, run_sampling

    ref = json.loads(REFERENCE.read_text())
    base = load_config(CI_CONFIG)
    hot = load_config(CI_CONFIG, MUTATIONS["temperature_1.2"].overrides(base))
    bad = compare_sampling(run_sampling(hot, hot.policy.pretrained, ref["pairs"]), ref["sampling"])
    assert any(b.startswith("sampling sample logp") for b in bad) and any(b.startswith("sampling eval logp")
                                                                         for b in bad), bad
