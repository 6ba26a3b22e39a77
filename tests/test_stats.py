"""eval.stats at small n: the exact sign-flip test and the multiple-testing corrections, against
numbers computed by hand."""
import itertools

import numpy as np
import pandas as pd
import pytest

from eval import stats
from eval.table import rows_frame


def _by_hand(d) -> float:
    """Two-sided sign-flip p by listing every pattern with itertools (independent of the vectorised one)."""
    d = [x for x in d if x != 0]
    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_six_pairs_all_one_way_give_exactly_2_over_64():
    for d in (np.ones(6), np.arange(1.0, 7.0), -np.array([0.3, 0.01, 2.0, 0.5, 0.2, 0.7])):
        t = stats.sign_flip_test(d)
        assert t.p == 2 / 64 and t.n == 6 and t.n_nonzero == 6 and "exact" in t.test


def test_exact_p_by_hand_with_ties_and_zeros():
    # 5 pairs, 1 zero: 4 flip. +1 +1 +1 -1 -> |sum| 2; of the 16 patterns |sum| >= 2: the 4 with three
    # of one sign (sum +-2), times 2 signs, plus the 2 all-one-way (+-4): 10/16
    t = stats.sign_flip_test([1.0, 1.0, 1.0, -1.0, 0.0])
    assert t.p == pytest.approx(10 / 16) and t.n == 5 and t.n_nonzero == 4 and t.test == "sign-flip exact, 2^4 patterns"
    rng = np.random.default_rng(3)
    for n in (3, 7, 10):
        d = np.round(rng.normal(0.2, 1.0, n), 2)
        assert stats.sign_flip_test(d).p == pytest.approx(_by_hand(d))
    assert stats.sign_flip_test([0.0, 0.0, 0.0]).p == 1.0  # nothing moved
    assert stats.sign_flip_test([0.5]).p == 1.0          # one pair: + and - are the only patterns


def test_p_is_never_below_2_over_2_to_the_n_exact_or_monte_carlo():
    rng = np.random.default_rng(0)
    for n in (2, 4, 6, 9, 16, 17, 20):
        for d in (np.full(n, 0.4), rng.normal(0.5, 0.1, n)):
            t = stats.sign_flip_test(d, n_resamples=999)
            assert t.p >= 2 / 2 ** n - 1e-15
            assert ("exact" in t.test) == (n <= stats.EXACT_MAX_N)


def test_monte_carlo_is_seeded_and_agrees_with_exact():
    d = np.round(np.random.default_rng(1).normal(0.3, 1.0, 14), 2)
    exact = stats.sign_flip_test(d)
    mc = stats.sign_flip_test(d, exact_max_n=4, n_resamples=20_000, seed=7)
    assert "Monte Carlo" in mc.test and mc == stats.sign_flip_test(d, exact_max_n=4, n_resamples=20_000, seed=7)
    assert mc.p == pytest.approx(exact.p, abs=0.01)


def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.20]
    # Holm: sorted 0.01 0.03 0.04 0.20 x 4 3 2 1 = 0.04 0.09 0.08 0.20, running max 0.04 0.09 0.09 0.20
    assert stats.adjust_p(p, "holm") == pytest.approx([0.04, 0.09, 0.09, 0.20])
    # BH: x m/rank = 0.04 0.06 0.0533 0.20, running min from the top: 0.04 0.0533 0.0533 0.20
    assert stats.adjust_p(p, "bh") == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20])
    # NaN = no test: kept, and not counted in m; adjusted p never above 1
    assert stats.adjust_p([0.5, np.nan, 0.6], "holm") == pytest.approx([1.0, np.nan, 1.0], nan_ok=True)
    with pytest.raises(ValueError, match="holm"):
        stats.adjust_p(p, "bonferroni")


def test_paired_wer_test_flips_error_counts_paired_on_utterance_id():
    # 6 utterances, 4 words each; round 1 has one error fewer on every utterance, listed in another order
    rows0 = [{"id": f"u{i}", "text": "one two three four", "hypothesis": "one two", "wer": 0.5, "sim": 0.5}
             for i in range(6)]
    rows1 = [dict(r, hypothesis="one two three", wer=0.25, sim=0.5 + 0.01 * i) for i, r in enumerate(rows0)][::-1]
    table = pd.concat([rows_frame(rows0, "r", 0), rows_frame(rows1, "r", 1)])
    t = stats.round_tests(table, ["wer", "sim"]).set_index("metric")
    assert t.loc["wer", "n"] == 6 and t.loc["wer", "delta"] == pytest.approx(-0.25)
    assert t.loc["wer", "p"] == 2 / 64 and t.loc["wer", "test"] == "sign-flip exact, 2^6 patterns"
    # sim: u0 did not move, the other 5 rose: 2/32
    assert t.loc["sim", "p"] == pytest.approx(2 / 32) and t.loc["sim", "test"] == "sign-flip exact, 2^5 patterns"
    # Holm over the table's two tests: 2 x 2/64 = 0.0625 for the smaller, max(that, 2/32) for the other
    assert t.loc["wer", "p_holm"] == pytest.approx(0.0625) and t.loc["sim", "p_holm"] == pytest.approx(0.0625)
    assert t["better"].isna().all()  # neither survives the correction at 0.05
    assert stats.correct_tests(t.reset_index(), "holm", level=0.9).set_index("metric").loc["wer", "better"] is True


def test_paired_differences_are_error_counts_for_wer_and_values_otherwise():
    num_a, num_b, den = np.array([2.0, 1, 0]), np.array([1.0, 1, 3]), np.array([4.0, 2, 5])
    d = stats.paired_differences(num_a, den, num_b, den)
    assert list(d) == [-1, 0, 3] and d.sum() / den.sum() == pytest.approx(num_b.sum() / den.sum() - num_a.sum() / den.sum())
    assert stats.paired_differences(num_a, den, num_b, den * 2) == pytest.approx(num_b / (2 * den) - num_a / den)


def test_wilcoxon_is_exact_at_small_n_ties_included():
    from scipy.stats import wilcoxon

    assert stats.wilcoxon_p(np.arange(1.0, 7.0)) == 2 / 64
    d = np.array([0.3, -0.1, 0.25, 0.4, -0.05, 0.6, 0.2, 0.15])  # no ties: scipy's exact null applies
    assert stats.wilcoxon_p(d) == pytest.approx(wilcoxon(d, method="exact").pvalue)
    # ties and a zero: signed ranks +1.5 +1.5 -3 +4 of the 4 non-zero (sum 4); |sum| >= 4 in 10 of the 16 patterns
    assert stats.wilcoxon_p([1.0, 1.0, -2.0, 3.0, 0.0]) == pytest.approx(10 / 16) == _by_hand([1.5, 1.5, -3, 4])
    assert stats.wilcoxon_p(np.zeros(4)) == 1.0
