"""Judgments into training: ``pair.strategy: human`` turns a listening database into the next round's pairs."""
import json

import numpy as np
import pytest

from align.config import load_config
from align.loop import run_loop
from eval import listen
from models.io import read_jsonl
from tests.conftest import CI_CONFIG


def _judge(db, items, prefer_round: int) -> dict[str, dict]:
    """Two raters prefer round ``prefer_round`` on every item; returns {utt_id: (winner, loser) systems}."""
    store = listen.Store(db)
    truth = {}
    for it in items:
        win, lose = (it.x, it.y) if it.x.round == prefer_round else (it.y, it.x)
        truth[it.utt_id] = (win, lose)
        for rater in ("ann", "bob"):
            a, b = (it.x, it.y) if rater == "ann" else (it.y, it.x)  # both orders shown
            assert store.add_judgment({
                "rater": rater, "item": it.item_id, "utt_id": it.utt_id, "system_a": a.label, "run_a": a.run_dir,
                "round_a": a.round, "system_b": b.label, "run_b": b.run_dir, "round_b": b.round,
                "order_shown": "XY" if a == it.x else "YX", "choice": "A" if a == win else "B", "winner": win.label,
                "qmos_a": 4, "qmos_b": 3, "smos_a": None, "smos_b": None})
    return truth


@pytest.mark.slow  # a CI round (~40 s): CI runs it with -m slow; the resolution and refusal checks below are fast
def test_a_round_trains_on_what_raters_preferred(ci_run, ci_overrides, tmp_path):
    items = listen.build_items([ci_run], rounds=[0, 2])
    assert items, "the CI run saves audio for its first eval.save_audio items"
    db = tmp_path / "judgments.sqlite"
    truth = _judge(db, items, prefer_round=2)

    cfg = load_config(CI_CONFIG, ci_overrides + ["name=ci_human", "rounds=1", "pair.strategy=human",
                                                  f"pair.human_db={db}", "dpo.steps=2"])
    run = run_loop(cfg)
    pairs = read_jsonl(run / "round_001" / "pairs" / "pairs.jsonl")
    assert sorted(p["id"] for p in pairs) == sorted(truth)
    for p in pairs:  # the winner's tokens (as its evaluation spoke them) are chosen
        win, lose = truth[p["id"]]
        rows = {k: {r["id"]: r for r in read_jsonl(ci_run / f"round_{k:03d}" / "eval" / "rows.jsonl")} for k in (0, 2)}
        assert p["chosen_codes"] == rows[win.round][p["id"]]["codes"]
        assert p["rejected_codes"] == rows[lose.round][p["id"]]["codes"]
        assert p["source"] == "human" and p["scores"]["votes"] == 2 and p["keep"]
        assert p["prompt"].startswith("<bos> <prompt>") and p["prompt"].endswith("<speech>")
        assert p["chosen"].endswith("<eos>") and p["rejected"].endswith("<eos>")
    stats = json.loads((run / "round_001" / "pairs" / "stats.json").read_text())
    assert stats["pairs"] == len(truth) and stats["test_split_pairs"] == len(truth)  # evaluation clips: counted
    row = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["round"] == 1 and row["pairs"] == len(truth) and np.isfinite(row["dpo_loss"])


def test_mixed_pools_golden_and_human_pairs(ci_run, ci_overrides, tmp_path):
    from align.pairs import PAIR_STRATEGIES
    from align.run import Context
    from models.rundir import RunLayout

    items = listen.build_items([ci_run], rounds=[0, 2])
    db = tmp_path / "judgments.sqlite"
    _judge(db, items, prefer_round=0)
    cfg = load_config(CI_CONFIG, ci_overrides + ["pair.strategy=mixed", "pair.mixed=[golden_vs_synthetic, human]",
                                                  f"pair.human_db={db}"])
    ctx = Context(cfg, None)
    ctx.run = RunLayout(ci_run)  # read the CI run's round-1 samples (its config differs in pair: only)
    rows = read_jsonl(ctx.run.samples_dir(1) / "samples.jsonl")
    pairs = PAIR_STRATEGIES["mixed"](ctx, 1, rows)
    sources = [p["source"] for p in pairs]
    assert sources.count("golden_vs_synthetic") == len(rows) and sources.count("human") == len(items)


def test_human_pairs_judged_in_another_run_are_resolved_or_refused_clearly(tmp_path, real_speech_dir):
    """A judged clip's voice prompt is looked up in this run's data, else encoded from the recording its row names;
    neither: a ValueError that says which pair and what to do (the CLI prints it as one line, exit 2)."""
    import pytest

    from align.stages import prompt_codes_of
    from tests.fakes import FakeContext

    ctx = FakeContext(tmp_path)
    by_id = {u.id: u for u in ctx.splits.train}
    assert prompt_codes_of(ctx, {"id": "x", "prompt_id": "u1"}, by_id).tolist() == ctx.codes(by_id["u1"]).tolist()
    wav = real_speech_dir / "spk1_snt1.wav"
    codes = prompt_codes_of(ctx, {"id": "x", "prompt_id": "elsewhere", "prompt_audio": str(wav)}, by_id)
    assert codes.shape[0] == 1 and codes.shape[1] > 50
    with pytest.raises(ValueError, match="not an utterance of this run's data"):
        prompt_codes_of(ctx, {"id": "x", "prompt_id": "elsewhere", "prompt_audio": str(tmp_path / "gone.wav"),
                              "source": "human"}, by_id)


def test_human_pairs_spoken_with_another_codec_are_refused_naming_both(tmp_path):
    import json

    import pytest

    from align.pairs import _check_judged_codecs
    from tests.fakes import FakeContext

    ctx = FakeContext(tmp_path / "ours")
    meta = tmp_path / "theirs" / "round_002" / "policy" / "speechalign.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"codec_identity": "mel_rvq-other-codebooks"}))
    pairs = [{"judged": {"runs": [str(tmp_path / "theirs")], "rounds": [2]}}]
    with pytest.raises(ValueError, match="mel_rvq-other-codebooks") as e:
        _check_judged_codecs(ctx, pairs)
    assert ctx.codec.identity in str(e.value)
    meta.write_text(json.dumps({"codec_identity": ctx.codec.identity}))
    _check_judged_codecs(ctx, pairs)
