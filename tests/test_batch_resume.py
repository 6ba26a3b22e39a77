"""A crash inside ``sample``, the pair stage's judging or ``evaluate`` costs at most the batch it was on: finished
batches are kept (models.io.BatchStore, in a cache folder named by what they depend on: stages.content_store) and a
rerun reads them, giving the result an uninterrupted run gives."""
import json

import numpy as np
import pytest
import torch

from align.stages import sample
from models.io import BatchStore, read_jsonl

from .fakes import FakeContext


class Crash(RuntimeError):
    pass


def _crash_after(n_calls: int, fn):
    """fn, which raises Crash on its (n_calls + 1)-th call; .calls counts the calls."""
    def wrapped(*a, **kw):
        wrapped.calls += 1
        if wrapped.calls > n_calls:
            raise Crash("killed")
        return fn(*a, **kw)
    wrapped.calls = 0
    return wrapped


def test_sample_resumes_at_its_first_unfinished_batch(tmp_path, monkeypatch):
    from models.codec_lm import Policy

    overrides = ["sample.batch_size=2", "sample.prompts_per_round=0", "sample.n=2", "sample.temperature=1.0"]
    whole = FakeContext(tmp_path / "whole", overrides)
    sample(whole, 1)
    want = read_jsonl(whole.run.samples_dir(1) / "samples.jsonl")

    ctx = FakeContext(tmp_path / "killed", overrides)
    real = Policy.generate
    monkeypatch.setattr(Policy, "generate", _crash_after(2, real))
    with pytest.raises(Crash):
        sample(ctx, 1)
    # 2 of 3 batches kept (beside meta.json: what the entry was keyed on)
    assert len(list((tmp_path / "killed" / "cache" / "samples").glob("*/[0-9]*-*.json"))) == 2
    counting = _crash_after(10 ** 6, real)
    monkeypatch.setattr(Policy, "generate", counting)
    sample(ctx, 1)
    assert counting.calls == 1  # only the batch it died on was spoken again
    assert read_jsonl(ctx.run.samples_dir(1) / "samples.jsonl") == want


def test_pair_judging_resumes_at_its_first_unfinished_batch(tmp_path, monkeypatch):
    from align import pairs as P

    calls = []

    def stub_wer(ctx):
        def score(batch):
            calls.append(len(batch.rows))
            if len(calls) == 2 and stub_wer.crash:
                raise Crash("killed")
            return [len(r["codes"]) / 100 + (r["sample"] or 0) / 10 for r in batch.rows]
        return score

    monkeypatch.setitem(P.SCORERS, "wer", stub_wer)
    monkeypatch.setattr(P, "JUDGE_BATCH", 4)
    ctx = FakeContext(tmp_path, ["pair.strategy=ranked_samples", "pair.scorers=[wer]", "pair.min_gap=0.0",
                                 "pair.max_chosen_wer=10"])
    rows = ctx.sample_rows(n=2)  # 6 utterances x 2 samples = 12 rows: 3 judging batches
    stub_wer.crash = True
    with pytest.raises(Crash):
        P.score_samples(ctx, 1, rows)
    stub_wer.crash = False
    calls.clear()
    resumed = P.score_samples(ctx, 1, rows)
    assert calls == [4, 4]  # batch 1 was read, not judged again
    calls.clear()
    (tmp_path / "cache" / "judge").rename(tmp_path / "kept")  # a fresh judge of everything agrees
    assert P.score_samples(ctx, 1, rows) == resumed and calls == [4, 4, 4]


def test_evaluate_resumes_at_its_first_unfinished_batch_with_the_same_rows(tmp_path, real_speech_dir):
    from eval.evaluate import EvalItem, evaluate_policy

    from .fakes import tiny_policy

    policy = tiny_policy()
    wavs = sorted(real_speech_dir.glob("*.wav"))[:5]
    items = [EvalItem(f"u{i}", "a cat sat", "s", str(w), str(wavs[(i + 1) % 5]),
                      prompt_codes=torch.zeros(1, 4, dtype=torch.long)) for i, w in enumerate(wavs)]

    class Scorers:
        speaker = type("S", (), {"sample_rate": 16000})()
        quality = None

        def __init__(self, crash_on: int | None):
            self.crash_on, self.calls = crash_on, 0

        def wer(self, wavs, sr, texts):
            self.calls += 1
            if self.calls == self.crash_on:
                raise Crash("killed")
            return [len(w) / 1e5 for w in wavs], ["a cat"] * len(wavs)

        def sim(self, wavs, sr, refs):
            return np.array([0.5 + len(r) / 1e7 for r in refs], dtype=np.float32)

        def quality_scores(self, wavs, sr):
            return [{} for _ in wavs]

        def phones(self, wavs, sr, texts):
            return [{} for _ in wavs]

    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seed=3, batch_size=2, save_audio_dir=tmp_path / "audio", save_n=2)
    want, want_rows = evaluate_policy(policy, items, scorers=Scorers(None), **kw)
    store = BatchStore(tmp_path / "store")
    with pytest.raises(Crash):
        evaluate_policy(policy, items, scorers=Scorers(crash_on=2), store=store, **kw)
    again = Scorers(None)
    got, rows = evaluate_policy(policy, items, scorers=again, store=store, **{**kw, "save_audio_dir": tmp_path / "a2"})
    assert again.calls == 2  # batches [2, 4) and [4, 5); [0, 2) was read
    assert json.dumps(rows, sort_keys=True) == json.dumps(want_rows, sort_keys=True)
    assert got["wer"] == want["wer"] and sorted(p.name for p in (tmp_path / "a2").glob("*.wav")) == ["u0.wav", "u1.wav"]
