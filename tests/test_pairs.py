"""Pair strategies build the pairs they promise; scores come from stub scorers (no audio, no ASR)."""
import pytest

from align import pairs as P
from align.config import PairConfig, SampleConfig
from align.pairs import pareto_fronts, rank_group
from models.io import read_jsonl
from align.stages import pair

from .fakes import FakeContext


def test_weighted_ranking_picks_best_and_worst():
    cfg = PairConfig(weights={"wer": -1.0, "sim": 1.0}, min_gap=0.0, max_chosen_wer=1.0)
    scores = [{"wer": 0.5, "sim": 0.5}, {"wer": 0.1, "sim": 0.6}, {"wer": 0.9, "sim": 0.2}, {"wer": 0.3, "sim": 0.3}]
    assert rank_group(scores, cfg) == (1, 2, None)


def test_ties_are_dropped_even_with_zero_gap():
    cfg = PairConfig(weights={"wer": -1.0, "sim": 1.0}, min_gap=0.0, max_chosen_wer=1.0)
    assert rank_group([{"wer": 0.2, "sim": 0.5}] * 3, cfg)[2] == "tie"
    pcfg = PairConfig(rank_by="pareto", weights={"wer": -1.0, "sim": 1.0}, min_gap=0.0, max_chosen_wer=1.0)
    assert rank_group([{"wer": 0.2, "sim": 0.5}] * 2, pcfg)[2] == "tie"


def test_min_gap_and_wer_ceiling():
    scores = [{"wer": 0.40, "sim": 0.5}, {"wer": 0.45, "sim": 0.5}]
    assert rank_group(scores, PairConfig(weights={"wer": -1.0}, min_gap=0.1, max_chosen_wer=1.0))[2] == "gap"
    assert rank_group(scores, PairConfig(weights={"wer": -1.0}, min_gap=0.01, max_chosen_wer=1.0))[2] is None
    assert rank_group(scores, PairConfig(weights={"wer": -1.0}, min_gap=0.01, max_chosen_wer=0.3))[2] == "wer_ceiling"


def test_pareto_fronts_and_pareto_ranking():
    # (WER, SIM): 0 and 1 trade off (front 0), 2 is dominated by 0, 3 by everything
    pts = [(0.1, 0.5), (0.3, 0.9), (0.2, 0.4), (0.8, 0.1)]
    assert pareto_fronts(pts) == [0, 0, 1, 2]
    cfg = PairConfig(rank_by="pareto", weights={"wer": -1.0, "sim": 1.0}, min_gap=0.0, max_chosen_wer=1.0)
    scores = [{"wer": w, "sim": s} for w, s in pts]
    best, worst, drop = rank_group(scores, cfg)
    # front 0 members have weighted scores 0.4 and 0.6: the tie-break picks sample 1; the last front is sample 3
    assert (best, worst, drop) == (1, 3, None)


def _stub_scorers(monkeypatch, table):
    """Register scorers 'wer'/'sim' that look scores up by (id, sample) and never touch audio."""
    def factory(name):
        def build(ctx):
            def score(batch):
                return [table[(r["id"], r["sample"])][name] for r in batch.rows]
            return score
        return build
    monkeypatch.setitem(P.SCORERS, "wer", factory("wer"))
    monkeypatch.setitem(P.SCORERS, "sim", factory("sim"))
    monkeypatch.setitem(P.SCORERS, "dnsmos", lambda ctx: None)  # an unavailable scorer is skipped


def test_ranked_samples_strategy_with_injected_scorer(tmp_path, monkeypatch):
    ctx = FakeContext(tmp_path, ["pair.strategy=ranked_samples", "pair.min_gap=0.1", "pair.max_chosen_wer=0.5"],
                      n_utts=4)
    rows = ctx.sample_rows(n=3)
    table = {}
    for r in rows:
        j = r["sample"]
        table[(r["id"], j)] = {"wer": [0.2, 0.6, 0.4][j], "sim": 0.5}
    table[("u1", 0)] = table[("u1", 1)] = table[("u1", 2)] = {"wer": 0.3, "sim": 0.5}   # all tied -> dropped
    table[("u2", 0)], table[("u2", 1)], table[("u2", 2)] = ({"wer": 0.70, "sim": 0.5}, {"wer": 0.9, "sim": 0.5},
                                                             {"wer": 0.8, "sim": 0.5})   # best too bad -> dropped
    table[("u3", 1)] = {"wer": 0.25, "sim": 0.5}                                      # gap 0.05 < 0.1 -> dropped
    table[("u3", 0)] = {"wer": 0.2, "sim": 0.5}
    table[("u3", 2)] = {"wer": 0.22, "sim": 0.5}
    _stub_scorers(monkeypatch, table)
    ctx.write_samples(1, rows)
    stats = pair(ctx, 1)
    out = {p["id"]: p for p in read_jsonl(tmp_path / "round_001" / "pairs" / "pairs.jsonl")}
    assert set(out) == {"u0", "u1", "u2", "u3"} and stats["pairs"] == 1
    assert out["u0"]["keep"] and out["u0"]["sample"] == [0, 1]
    by = {(r["id"], r["sample"]): r["codes"] for r in rows}
    assert out["u0"]["chosen_codes"] == by[("u0", 0)] and out["u0"]["rejected_codes"] == by[("u0", 1)]
    assert out["u0"]["scores"]["gap"] == pytest.approx(0.4)
    assert out["u0"]["prompt"].endswith("<speech>") and out["u0"]["chosen"].endswith("<eos>")
    assert (out["u1"]["drop"], out["u2"]["drop"], out["u3"]["drop"]) == ("tie", "wer_ceiling", "gap")
    assert stats["drop_reasons"] == {"tie": 1, "wer_ceiling": 1, "gap": 1}


def test_ranked_samples_needs_several_samples(tmp_path):
    ctx = FakeContext(tmp_path, ["pair.strategy=ranked_samples"], n_utts=2)
    ctx.write_samples(1, ctx.sample_rows(n=1))
    with pytest.raises(ValueError, match="sample.n >= 2"):
        pair(ctx, 1)


def test_mixed_and_accumulated_pairs(tmp_path, monkeypatch):
    ctx = FakeContext(tmp_path, ["pair.strategy=mixed", "pair.min_gap=0.0", "pair.max_chosen_wer=1.0",
                                 "pair.data=accumulate"], n_utts=3)
    rows = ctx.sample_rows(n=2)
    _stub_scorers(monkeypatch, {(r["id"], r["sample"]): {"wer": 0.1 + 0.3 * r["sample"], "sim": 0.5} for r in rows})
    golden = {u.id: ctx.codes(u)[0].tolist() for u in ctx.splits.train}
    for k in (1, 2):
        ctx.write_samples(k, rows)
        stats = pair(ctx, k)
    got = read_jsonl(tmp_path / "round_002" / "pairs" / "pairs.jsonl")
    new = [p for p in got if p["round"] == 2]
    # mixed: one golden pair per sample (6) + one ranked pair per prompt (3)
    assert sum(p["source"] == "golden_vs_synthetic" for p in new) == 6
    assert sum(p["source"] == "ranked_samples" for p in new) == 3
    assert all(p["chosen_codes"] == golden[p["id"]] for p in new if p["source"] == "golden_vs_synthetic")
    # accumulate: round 1's own 9 pairs come along, round 2's file does not re-add them twice
    assert stats["new_pairs"] == 9 and stats["accumulated"] == 9 and stats["pairs"] == 18
    assert sum(p["round"] == 1 for p in got) == 9


def test_fresh_pairs_do_not_accumulate(tmp_path):
    ctx = FakeContext(tmp_path, n_utts=2)
    for k in (1, 2):
        ctx.write_samples(k, ctx.sample_rows(n=1, seed=k))
        stats = pair(ctx, k)
    assert stats["accumulated"] == 0 and stats["pairs"] == 2


def test_per_sample_temperatures_cycle():
    s = SampleConfig(n=4, temperatures=[0.6, 1.2], top_ps=[0.9])
    assert [s.settings(j) for j in range(3)] == [(0.6, 0.9), (1.2, 0.9), (0.6, 0.9)]
    assert SampleConfig().settings(5) == (1.0, 1.0) and not SampleConfig().varied
    with pytest.raises(ValueError, match="top_ps"):
        SampleConfig(top_ps=[1.5])


def test_bad_pair_config_values_name_the_fix():
    with pytest.raises(ValueError, match="rank_by"):
        PairConfig(rank_by="best")
    with pytest.raises(ValueError, match="registered scorers"):
        PairConfig(scorers=["mos9000"])
    with pytest.raises(ValueError, match="fresh"):
        PairConfig(data="sometimes")


def test_an_unscored_sample_ranks_worst_not_best():
    """DNSMOS is NaN for silence: weights [nan, 0.5, 0.2] once made the silent sample 'best' (NaN compares false)."""
    cfg = PairConfig(scorers=["wer", "sim", "dnsmos"], min_gap=0.05)
    nan = float("nan")
    scores = [{"wer": 0.1, "sim": 0.8, "dnsmos": nan}, {"wer": 0.2, "sim": 0.7, "dnsmos": 3.0},
              {"wer": 0.9, "sim": 0.2, "dnsmos": 2.0}]
    best, worst, drop = rank_group(scores, cfg)
    assert (best, worst, drop) == (1, 0, None)  # the silent one is rejected, the judged best is chosen
    assert P.weighted_score(scores[0], cfg.weights) == float("-inf")
    # a weight of 0 ignores its score, NaN or not
    assert P.weighted_score({"wer": 0.2, "dnsmos": nan}, {"wer": -1.0, "dnsmos": 0.0}) == -0.2
    # nothing judged: dropped with the reason
    assert rank_group([{"wer": nan, "sim": nan}] * 2, cfg)[2] in ("tie", "unscored")
    # pareto: an unjudged point sits behind every judged front
    pcfg = PairConfig(rank_by="pareto", min_gap=0.0)
    best, worst, _ = rank_group([{"wer": nan, "sim": 0.9}, {"wer": 0.5, "sim": 0.5}, {"wer": 0.1, "sim": 0.9}], pcfg)
    assert (best, worst) == (2, 0)


def test_the_pair_strings_are_the_codes_they_name(tmp_path, monkeypatch):
    """What the trainer reads: the paper's chosen string is the golden stream, its rejected string the sample; a
    judged pair's chosen string is the better-judged sample. (A swap anywhere between judging and the strings fails
    here; before, tests checked only that the strings end with <eos>.)"""
    from models.layout import format_of

    ctx = FakeContext(tmp_path, ["pair.strategy=golden_vs_synthetic", "pair.min_distance=0.0"], n_utts=4)
    rows = ctx.sample_rows(n=2)
    ctx.write_samples(1, rows)
    pair(ctx, 1)
    fmt = format_of(ctx.run.policy_dir(0))
    by_id = {u.id: u for u in ctx.splits.train}
    got = read_jsonl(ctx.run.pairs_dir(1) / "pairs.jsonl")
    assert len(got) == len(rows)
    for p, r in zip(got, rows):
        assert p["chosen"] == fmt.completion_str(ctx.golden_stream(by_id[p["id"]], fmt))
        assert p["rejected"] == fmt.completion_str(r["codes"]) and p["rejected"] != p["chosen"]

    ctx = FakeContext(tmp_path / "ranked", ["pair.strategy=ranked_samples", "pair.min_gap=0.0",
                                            "pair.max_chosen_wer=1.0", "pair.min_distance=0.0",
                                            "pair.scorers=[wer, sim]", "pair.length_band=[0.0, 100.0]"], n_utts=4)
    rows = ctx.sample_rows(n=3)
    table = {(r["id"], r["sample"]): {"wer": 0.1 * (r["sample"] + 1) + 0.01 * i, "sim": 0.5}
             for i, r in enumerate(rows)}
    _stub_scorers(monkeypatch, table)
    ctx.write_samples(1, rows)
    pair(ctx, 1)
    codes = {(r["id"], r["sample"]): r["codes"] for r in rows}
    for p in read_jsonl(ctx.run.pairs_dir(1) / "pairs.jsonl"):
        best, worst = p["sample"]
        assert table[(p["id"], best)]["wer"] < table[(p["id"], worst)]["wer"]  # chosen = the better judged
        assert p["chosen"] == fmt.completion_str(codes[(p["id"], best)])
        assert p["rejected"] == fmt.completion_str(codes[(p["id"], worst)])


def test_a_round_with_nothing_to_prefer_keeps_its_policy_when_allowed(tmp_path, monkeypatch):
    """A judge that finds no difference (every sample clean) leaves no pair: by default the run stops and says why;
    with pair.allow_empty the round keeps round k-1's policy."""
    import torch
    from safetensors.torch import load_file

    from align import methods

    opts = ["pair.strategy=ranked_samples", "pair.min_gap=0.5", "pair.scorers=[wer]", "pair.max_chosen_wer=1.0"]
    rows_of = lambda ctx: ctx.sample_rows(n=2)  # noqa: E731
    ctx = FakeContext(tmp_path / "strict", opts, n_utts=4)
    rows = rows_of(ctx)
    _stub_scorers(monkeypatch, {(r["id"], r["sample"]): {"wer": 0.2, "sim": 0.5} for r in rows})  # all alike
    ctx.write_samples(1, rows)
    with pytest.raises(ValueError, match="every pair was filtered out"):
        pair(ctx, 1)
    ctx = FakeContext(tmp_path / "allowed", opts + ["pair.allow_empty=true"], n_utts=4)
    ctx.write_samples(1, rows)
    assert pair(ctx, 1)["pairs"] == 0
    import shutil

    shutil.rmtree(ctx.run.policy_dir(1))  # (the fake context lays every round's policy out in advance)
    summary = methods.train(ctx, 1)
    assert summary["pairs"] == 0 and summary["carried_over"]
    a = load_file(str(ctx.run.policy_dir(0) / "model.safetensors"))
    b = load_file(str(ctx.run.policy_dir(1) / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
