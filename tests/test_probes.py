"""The probe set (align/probes.py): constructed pairs whose right answer is known, and what a round's preference
for them reads."""
from __future__ import annotations

import random

import numpy as np
import pytest


def _stream():
    # three units (markers -1, -2, -3) of 3, 2 and 4 frames; words end after units 0 and 1
    return [-1, 5, 6, 7, -2, 8, 9, -3, 10, 11, 12, 13]


def test_a_pause_probe_is_the_golden_stream_with_silence_after_a_word():
    from align.probes import _units, corrupt

    got = corrupt(_stream(), "pause", rng=random.Random(0), word_ends=[0, 1], silence=99, frame_rate=50.0,
                  max_frames=40)
    units = _units(got)
    assert [m for m, _ in units] == [-1, -2, -3]  # the walk is the same
    added = [(f, g) for (_, f), (_, g) in zip(units, _units(_stream())) if f != g]
    assert len(added) == 1 and added[0][0][:len(added[0][1])] == added[0][1]
    assert added[0][0][len(added[0][1]):] == [99] * 30  # 0.6 s at 50 frames/s
    capped = corrupt(_stream(), "pause", rng=random.Random(0), word_ends=[0], silence=99, frame_rate=50.0,
                     max_frames=10)
    assert len(_units(capped)[0][1]) == 10  # never beyond the walk's frame cap: the policy could not say it
    assert corrupt(_stream(), "pause", rng=random.Random(0), word_ends=[], silence=99, frame_rate=50.0,
                   max_frames=None) is None


def test_shuffled_and_duplicated_probes_keep_the_walk():
    from align.probes import _units, corrupt

    s = corrupt(_stream(), "shuffle", rng=random.Random(1), word_ends=[0], silence=0, frame_rate=50.0, max_frames=9)
    assert [sorted(f) for _, f in _units(s)] == [sorted(f) for _, f in _units(_stream())]
    d = corrupt(_stream(), "duplicate", rng=random.Random(1), word_ends=[0], silence=0, frame_rate=50.0, max_frames=5)
    assert [m for m, _ in _units(d)] == [-1, -2, -3]
    assert all(len(f) <= max(5, len(g)) for (_, f), (_, g) in zip(_units(d), _units(_stream())))
    assert len(d) > len(_stream())
    with pytest.raises(ValueError, match="unknown probe kind"):
        corrupt(_stream(), "reverse", rng=random.Random(1), word_ends=[], silence=0, frame_rate=50.0, max_frames=None)


def test_word_final_units_follow_the_word_boundaries():
    from align.probes import word_final_units
    from models.layout import text_units

    units = text_units("the big dog", "phones")  # DH AH | B IH G | D AO G
    assert word_final_units("the big dog", "phones") == [1, 4] and len(units) == 8


def test_probe_summary_counts_the_probes_whose_margin_grew():
    from align.probes import probe_summary

    probes = [{"kind": "pause"}] * 3 + [{"kind": "shuffle"}] * 2
    out = probe_summary(probes, np.array([1.0, 2.0, -1.0, 0.0, 5.0]), np.array([0.0, 3.0, -2.0, 0.0, 1.0]))
    assert out["probe_accuracy_pause"] == pytest.approx(2 / 3) and out["probe_accuracy_shuffle"] == 0.5
    assert out["probe_accuracy"] == pytest.approx(3 / 5) and out["probe_n"] == 5
    assert out["probe_margin_pause"] == pytest.approx((1 - 1 + 1) / 3)
