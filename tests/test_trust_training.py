"""What a round reports and keeps can be trusted: dev-best weights belong to their step and their starting
policy, the summary's figures are of the kept step, GRPO's length cap stays in GRPO, the rule head keeps the
forward's signature, the gate says what it paired, and ``speechalign eval --save-audio`` keeps its clips."""
import inspect
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from align import methods, validation
from align.stages import pair
from models.codec_lm import Policy, read_meta
from models.io import read_jsonl, write_jsonl
from models.optim import tail_mean

from .fakes import K, FakeContext, tiny_lm, tiny_policy


def _round_one(tmp_path, overrides, n_utts=4):
    ctx = FakeContext(tmp_path, overrides, n_utts=n_utts)
    ctx.write_samples(1, ctx.sample_rows(n=1))
    pair(ctx, 1)
    return ctx


def _fake_dev(monkeypatch, wers: list[float]):
    """Dev validation without speaking: the n-th measurement scores dev WER ``wers[n]``."""
    calls = []

    def fake_evaluate(policy, items, **kw):
        calls.append(1)
        return {"wer": wers[len(calls) - 1], "sim": 0.8, "n": 3}, []

    monkeypatch.setattr("eval.evaluate.evaluate_policy", fake_evaluate)
    monkeypatch.setattr(validation, "dev_items", lambda ctx, n: [None] * 3)
    return calls


def _weights(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _same(state: dict, lm: torch.nn.Module) -> bool:
    ref = lm.state_dict()
    return set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------
# (a) dev-best weights are tied to their step and to round k-1's policy
# ---------------------------------------------------------------------------------------------
def test_dev_best_weights_follow_their_step_across_a_resume(tmp_path, monkeypatch):
    """Steps 2 and 4 each improve; the run is killed and resumed from a trainer checkpoint at step 2, whose re-run
    step 4 no longer improves. The kept weights must be step 2's (the best remaining row), not the killed attempt's
    step 4; the weights of superseded steps go when the round ends, not before."""
    ctx = FakeContext(tmp_path, ["train.validate_every=2", "corpus.n_val_sentences=2"])
    _fake_dev(monkeypatch, [0.5, 0.4, 0.3, 0.45])
    v = validation.DevValidator(ctx, 1, ctx.policy)
    lms = {s: _weights(s) for s in (0, 2, 4)}
    for s in (0, 2, 4):
        v.measure(s, lms[s])
    assert v.best["step"] == 4 and _same(v.best_state(), lms[4])
    # killed; resumed from the trainer's checkpoint at step 2
    v = validation.DevValidator(ctx, 1, ctx.policy)
    v.resume_at(2)
    assert v.best["step"] == 2 and v.summary()["chosen_step"] == 2
    assert _same(v.best_state(), lms[2])
    v.measure(4, _weights(40))  # the re-run step 4 (0.45): no better than step 2
    assert v.best["step"] == 2 and _same(v.best_state(), lms[2])
    assert all(r["policy_digest"] == v.policy_digest for r in read_jsonl(v.curve_path))
    work = ctx.run.train_dir(1)
    assert {p.name for p in work.glob("*.safetensors")} == {"best-step2.safetensors", "best-step4.safetensors"}
    v.end_round()
    assert [p.name for p in work.glob("*.safetensors")] == ["best-step2.safetensors"]
    assert _same(v.best_state(), lms[2])


def test_best_state_refuses_weights_written_for_another_step(tmp_path, monkeypatch):
    ctx = FakeContext(tmp_path, ["train.validate_every=2", "corpus.n_val_sentences=2"])
    _fake_dev(monkeypatch, [0.5, 0.4, 0.3])
    v = validation.DevValidator(ctx, 1, ctx.policy)
    for s in (0, 2, 4):
        v.measure(s, _weights(s))
    v.resume_at(2)
    v.state_path(4).replace(v.state_path(2))  # step 2's name, step 4's weights
    with pytest.raises(ValueError, match="step 4.*dev-best row is step 2"):
        v.best_state()
    v.state_path(2).unlink()
    with pytest.raises(FileNotFoundError, match="step 2 has no weights"):
        v.best_state()


def test_validation_rows_of_another_round_k_minus_1_policy_are_dropped(tmp_path, monkeypatch, caplog):
    """``--only-stage train`` after round k-1's policy was redone: the old curve's step 0 measured the old policy, so
    its rows (and rows from before rows recorded the policy) are dropped and step 0 is measured again."""
    ctx = FakeContext(tmp_path, ["train.validate_every=2", "corpus.n_val_sentences=2"])
    _fake_dev(monkeypatch, [0.5, 0.4])
    v = validation.DevValidator(ctx, 1, ctx.policy)
    v.measure(0, _weights(0))
    v.measure(2, _weights(2))
    assert validation.DevValidator(ctx, 1, ctx.policy).done(0)  # same policy: the rows stand
    redone = tiny_policy()
    redone.lm = tiny_lm(len(redone.tokenizer), seed=1)
    redone.save(ctx.run.policy_dir(0))
    with caplog.at_level(logging.WARNING, logger="speechalign"):
        v = validation.DevValidator(ctx, 1, redone)
    assert v.rows == [] and not v.done(0) and read_jsonl(v.curve_path) == []
    assert any("dropping 2 of 2 rows" in r.getMessage() for r in caplog.records)
    # rows written before they carried the digest say nothing about which policy they measured
    write_jsonl(v.curve_path, [{"step": 0, "wer": 0.1, "sim": 0.9, "n": 3}])
    assert validation.DevValidator(ctx, 1, redone).rows == []


# ---------------------------------------------------------------------------------------------
# (c) the summary's figures are those of the kept step
# ---------------------------------------------------------------------------------------------
def test_kept_figures_are_of_the_kept_step():
    history = [{"step": s, "loss": float(s), "rewards/accuracies": s / 10} for s in range(1, 11)]
    keys = {"loss": "loss", "reward_accuracy": "rewards/accuracies"}
    last = methods.kept_figures(history, keys, None)
    assert last["loss"] == last["loss_last"] == tail_mean(history, "loss") == 9.5
    kept = methods.kept_figures(history, keys, 5)
    assert kept["loss"] == 5.0 and kept["reward_accuracy"] == 0.5 and kept["loss_last"] == 9.5
    assert "5" in kept["figures_of"]
    at0 = methods.kept_figures(history, keys, 0)
    assert at0["loss"] is None and at0["reward_accuracy"] is None and at0["loss_last"] == 9.5
    assert "step 0" in at0["figures_of"]


def test_a_round_reports_the_figures_of_its_dev_best_step(tmp_path, monkeypatch):
    """DPO for 6 steps, dev-best at step 2: loss/reward figures are of the steps up to 2, the last steps' are under
    *_last, and only step 2's weights stay in the train folder once the round is saved."""
    _fake_dev(monkeypatch, [0.5, 0.3, 0.4, 0.45])
    ctx = _round_one(tmp_path, ["dpo.steps=6", "dpo.learning_rate=1e-2", "train.validate_every=2", "corpus.n_val_sentences=2"])
    stats = methods.train(ctx, 1)
    history = json.loads((ctx.run.train_dir(1) / "metrics.json").read_text())["history"]
    assert stats["chosen_step"] == 2 and [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    upto = [h for h in history if h["step"] <= 2]
    for name, key in (("loss", "loss"), ("reward_accuracy", "rewards/accuracies"),
                      ("reward_margin", "rewards/margins"), ("logps_chosen", "logps/chosen")):
        assert stats[name] == pytest.approx(tail_mean(upto, key)), name
        assert stats[f"{name}_last"] == pytest.approx(tail_mean(history, key)), name
    assert stats["loss"] == pytest.approx(history[1]["loss"]) and stats["loss"] != pytest.approx(history[-1]["loss"])
    assert sorted(p.name for p in ctx.run.train_dir(1).glob("*.safetensors")) == ["best-step2.safetensors"]


# ---------------------------------------------------------------------------------------------
# (b) GRPO's length cap stays in GRPO
# ---------------------------------------------------------------------------------------------
def test_grpo_caps_its_rollouts_but_not_the_policy_it_saves(tmp_path, monkeypatch):
    from align import pairs as P

    seen = []

    def stub_wer(ctx):
        def score(batch):
            seen.extend(list(r["codes"]) for r in batch.rows)
            return [0.5] * len(batch.rows)
        return score

    monkeypatch.setitem(P.SCORERS, "wer", stub_wer)
    ctx = _round_one(tmp_path, ["train.method=grpo", "train.grpo.reward=wer", "train.grpo.steps=1",
                                "train.grpo.num_generations=2", "train.grpo.prompts_per_step=2",
                                "train.grpo.max_completion_frames=3", "train.grpo.learning_rate=1e-3"])
    methods.train(ctx, 1)
    assert len(seen) == 4 and max(len(c) for c in seen) <= 3, [len(c) for c in seen]
    before, after = read_meta(ctx.run.policy_dir(0)), read_meta(ctx.run.policy_dir(1))
    assert after["max_seconds"] == before["max_seconds"] == 0.3
    # the cap is a per-call argument of the sampler, not the policy's
    policy = Policy.load(ctx.run.policy_dir(1))
    prompt = ctx.codes(ctx.splits.train[0])
    out = policy.generate(["one two three four"] * 4, [prompt] * 4, temperature=1.0, top_k=0, seed=0, max_frames=2)
    assert all(s[0].numel() <= 2 for s in out)
    assert policy.meta["max_seconds"] == 0.3


# ---------------------------------------------------------------------------------------------
# (d) the rule head keeps the forward's signature
# ---------------------------------------------------------------------------------------------
def test_rule_head_keeps_the_forward_signature_generate_reads():
    from align.scoring import rule_head

    policy = tiny_policy()
    lm = policy.lm
    before = inspect.signature(lm.forward)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        plain = lm(input_ids=ids).logits
    rule_head(lm, policy.emit_rule)
    after = inspect.signature(lm.forward)
    assert list(after.parameters) == list(before.parameters)
    assert {"position_ids", "logits_to_keep", "attention_mask"} <= set(after.parameters)
    assert lm._supports_logits_to_keep()  # what generate asks of forward's signature
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, plain)  # the model's own forward without the flag
        out = lm(input_ids=ids, labels=ids, fused_lm_head=True)
    assert out.log_probs.shape == (1, 4)
    gen = policy.generate(["a cat"], [torch.tensor([[1, 2, 3, 4]])], temperature=1.0, top_k=0, seed=0)
    assert all(0 <= x < K for x in gen[0][0].tolist())


# ---------------------------------------------------------------------------------------------
# (e) the gate says what it paired
# ---------------------------------------------------------------------------------------------
def _eval_rows(ids, wer=0.2):
    return [{"id": i, "sample": 0, "text": "the cat sat on the mat", "hypothesis": "the cat sat on the mat",
             "wer": wer, "sim": 0.8} for i in ids]


def test_gate_counts_what_it_paired_and_refuses_a_baseline_of_another_set(tmp_path, caplog):
    from eval.gate import GateConfig, run_gate

    run = tmp_path / "run"
    write_jsonl(run / "round_001" / "eval" / "rows.jsonl", _eval_rows([f"u{i}" for i in range(10)]))
    cfg = GateConfig(n_boot=200)
    near = tmp_path / "near.jsonl"
    write_jsonl(near, _eval_rows([f"u{i}" for i in range(8)] + ["x1", "x2", "x3"]))
    with caplog.at_level(logging.WARNING, logger="speechalign"):
        result = run_gate(run, near, cfg)
    assert result.passed, result.message
    assert "8 of 10 run rows and 8 of 11 baseline rows paired; dropped 2 run, 3 baseline" in result.message
    for c in (c for c in result.checks if c["metric"] in cfg.metrics):  # the baseline's checks (not the run's own)
        assert (c["run_rows"], c["run_paired"], c["run_dropped"]) == (10, 8, 2)
        assert (c["baseline_rows"], c["baseline_paired"], c["baseline_dropped"]) == (11, 8, 3)
    assert any("dropped 2 run, 3 baseline" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # fewer than half of the baseline pairs: no verdict on the remnant
    far = tmp_path / "far.jsonl"
    write_jsonl(far, _eval_rows([f"u{i}" for i in range(4)] + [f"y{i}" for i in range(12)]))
    result = run_gate(run, far, cfg)
    assert not result.passed and "not of this evaluation set" in result.message
    assert "4 of 10 run rows and 4 of 16 baseline rows paired" in result.message
    assert all(c["failed"] and c["baseline_dropped"] == 12 for c in result.checks)
    # every row pairs: nothing dropped, no warning
    caplog.clear()
    same = tmp_path / "same.jsonl"
    write_jsonl(same, _eval_rows([f"u{i}" for i in range(10)]))
    with caplog.at_level(logging.WARNING, logger="speechalign"):
        result = run_gate(run, same, cfg)
    assert result.passed and "dropped 0 run, 0 baseline" in result.message
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---------------------------------------------------------------------------------------------
# (f) speechalign eval --save-audio
# ---------------------------------------------------------------------------------------------
class _StubScorers:
    """Judges without models: WER from the clip's length, SIM a constant."""

    quality = None
    speaker = type("Speaker", (), {"sample_rate": 16000})()

    def wer(self, wavs, sample_rate, texts):
        return [min(1.0, len(w) / 1e4) for w in wavs], ["hello"] * len(wavs)

    def sim(self, wavs, sample_rate, refs):
        return [0.5] * len(wavs)

    def phones(self, wavs, sample_rate, texts):
        return [{} for _ in wavs]


def test_eval_save_audio_keeps_every_scored_clip(tmp_path, real_speech_dir, monkeypatch):
    from align.cli import main
    from models.audio import load_audio

    monkeypatch.setattr("eval.scorers.build_scorers", lambda ecfg, device: _StubScorers())
    policy_dir = tmp_path / "policy"
    tiny_policy().save(policy_dir)
    real = read_jsonl(real_speech_dir / "manifest.jsonl")[:4]
    manifest = tmp_path / "m.jsonl"
    write_jsonl(manifest, [dict(r, audio=str(real_speech_dir / r["audio"]), text="a cat sat", speaker="s",
                                prompt_audio=str(real_speech_dir / real[(i + 1) % 4]["audio"]))
                           for i, r in enumerate(real)])
    out, clips = tmp_path / "eval.json", tmp_path / "clips"
    assert main(["eval", "--policy", str(policy_dir), "--manifest", str(manifest), "--out", str(out),
                 "--quality", "none", "--temperature", "1.0", "--save-audio", str(clips)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["id"] for r in rows] == [r["id"] for r in real]
    spoke = [r for r in rows if r["duration"] > 0]
    assert spoke, "the tiny policy said nothing at all: pick another seed"
    for r in rows:
        if r["duration"] > 0:
            assert r["output_audio"] == str(clips / f"{r['id']}.wav")
            wav = load_audio(r["output_audio"], 16000)
            assert abs(len(wav) / 16000 - r["duration"]) < 0.01 and np.isfinite(wav).all()
        else:
            assert r["output_audio"] is None and not (clips / f"{r['id']}.wav").exists()
    assert sorted(p.name for p in clips.glob("*.wav")) == sorted(f"{r['id']}.wav" for r in spoke)
    # without the flag, nothing is kept and rows carry no path
    assert main(["eval", "--policy", str(policy_dir), "--manifest", str(manifest), "--out", str(out),
                 "--quality", "none"]) == 0
    assert all("output_audio" not in r for r in json.loads(out.read_text())["rows"])


# ---------------------------------------------------------------------------------------------
# (g) a NaN stops the round loudly and saves nothing (the trainer's log filter once hid it)
# ---------------------------------------------------------------------------------------------
def test_a_nan_in_training_stops_the_round_and_saves_nothing(tmp_path):
    """transformers' ``logging_nan_inf_filter`` (on by default) logs a NaN step as the mean of the finite ones, so
    the NaN guard saw a finite loss and a NaN policy was saved as the round's (found by the gate's shuffled-pairs
    mutation, whose impossible sequences score -inf)."""
    from safetensors.torch import load_file, save_file

    ctx = _round_one(tmp_path, ["dpo.steps=2"])
    path = ctx.run.policy_dir(0) / "model.safetensors"
    weights = load_file(str(path))
    name = next(n for n in weights if weights[n].is_floating_point() and weights[n].dim() == 2)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(path), metadata={"format": "pt"})
    shutil.rmtree(ctx.run.policy_dir(1))  # (the fake lays out every round's policy; the round must write its own)
    with pytest.raises(FloatingPointError, match="(loss|grad_norm) became nan at step 1"):
        methods.train(ctx, 1)
    assert not (ctx.run.policy_dir(1) / "model.safetensors").exists()


def test_weights_that_are_not_finite_are_never_saved_as_a_round(tmp_path):
    ctx = FakeContext(tmp_path, [], n_utts=2)
    shutil.rmtree(ctx.run.policy_dir(1))
    policy = Policy.load(ctx.run.policy_dir(0), device="cpu")
    with torch.no_grad():
        next(policy.lm.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match="not finite.*nothing was saved"):
        methods._finish(ctx, 1, policy, {"method": "dpo"}, [])
    assert not ctx.run.policy_dir(1).exists()
