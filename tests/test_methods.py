"""Each training method runs a tiny step on a tiny policy; the reward model learns golden > corrupted."""
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from align import methods
from align.config import load_config
from align.stages import pair
from models.codec_lm import Policy
from models.layout import completion_str, prompt_str

from .fakes import K, FakeContext, corrupted, golden_codes, tiny_policy


def _round_one(tmp_path, overrides, n_utts=4, n=1):
    ctx = FakeContext(tmp_path, overrides, n_utts=n_utts)
    ctx.write_samples(1, ctx.sample_rows(n=n))
    pair(ctx, 1)
    return ctx


def _changed(ctx) -> bool:
    w0 = load_file(str(ctx.run.policy_dir(0) / "model.safetensors"))
    w1 = load_file(str(ctx.run.policy_dir(1) / "model.safetensors"))
    return any(not torch.equal(w0[k], w1[k]) for k in w0 if k in w1 and w0[k].shape == w1[k].shape)


def _summary(ctx):
    return json.loads((ctx.run.train_dir(1) / "metrics.json").read_text())["summary"]


@pytest.mark.parametrize("overrides", [
    ["dpo.loss_type=sigmoid_norm"],
    pytest.param(["dpo.loss_type=robust", "dpo.label_smoothing=0.1"], marks=pytest.mark.slow),
    pytest.param(["dpo.loss_type=ipo", "dpo.sft_weight=0.5"], marks=pytest.mark.slow),  # RPO-style SFT term
])
def test_dpo_loss_types_take_a_step(tmp_path, overrides):
    ctx = _round_one(tmp_path, overrides)
    stats = methods.train(ctx, 1)
    assert stats["method"] == "dpo" and stats["steps"] == 2 and math.isfinite(stats["loss"])
    assert _changed(ctx) and _summary(ctx)["method"] == "dpo"


def test_every_installed_trl_loss_type_is_accepted():
    from align.config import DPOStageConfig
    from align.methods import check_loss_type, trl_loss_types

    known = trl_loss_types()
    assert {"sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"} <= set(known)
    for lt in known:
        DPOStageConfig(loss_type=lt)
        check_loss_type(lt)
    with pytest.raises(ValueError, match="installed TRL"):
        check_loss_type("nope")
    with pytest.raises(ValueError, match="0.5"):
        DPOStageConfig(loss_type="robust", label_smoothing=0.6)


def test_sft_control_trains_on_golden_tokens_only(tmp_path):
    ctx = _round_one(tmp_path, ["train.method=sft_control"])
    before = Policy.load(ctx.run.policy_dir(0))
    stats = methods.train(ctx, 1)
    # the same trainer and budget as DPO: its steps, its optimiser; one golden sequence per sampled prompt
    assert stats["method"] == "sft_control" and stats["pairs"] == 4 and stats["steps"] == ctx.cfg.dpo.steps
    assert math.isfinite(stats["loss"])
    assert _changed(ctx)
    after = Policy.load(ctx.run.policy_dir(1))
    # the golden completion became more likely
    u = ctx.splits.train[0]
    p = prompt_str(ctx.codes(ctx.splits.train[2])[0, :3], u.text)
    ids = torch.tensor([before.tokenizer(p + completion_str(golden_codes(0)), add_special_tokens=False)["input_ids"]])
    n_p = len(before.tokenizer(p, add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:, :n_p] = -100
    with torch.no_grad():
        assert after.lm(ids, labels=labels).loss < before.lm(ids, labels=labels).loss


def test_coh_adds_hints_and_generates_with_good(tmp_path):
    ctx = _round_one(tmp_path, ["train.method=coh"])
    stats = methods.train(ctx, 1)
    assert stats["method"] == "coh" and stats["examples"] == 8
    policy = Policy.load(ctx.run.policy_dir(1))
    assert policy.meta["quality_hint"] == "<good>"
    vocab = policy.tokenizer.get_vocab()
    assert {"<good>", "<bad>"} <= set(vocab) and policy.lm.get_input_embeddings().weight.shape[0] == len(vocab)
    cond = policy.conditioning(ctx.codes(ctx.splits.train[0]), "a cat")
    assert cond.endswith("<good> <speech>")
    out = policy.generate(["a cat"], [ctx.codes(ctx.splits.train[0])], n=2, temperature=1.0, top_k=0, seed=0)
    assert len(out[0]) == 2 and all(x.numel() == 0 or x.max() < K for x in out[0])


def test_reward_bon_attaches_a_reranker(tmp_path):
    ctx = _round_one(tmp_path, ["train.method=reward_bon", "train.best_of_n=3", "train.reward.steps=3",
                                "train.reward.batch_size=2"])
    stats = methods.train(ctx, 1)
    assert stats["method"] == "reward_bon" and stats["best_of_n"] == 3 and stats["pairs"] == 4
    policy = Policy.load(ctx.run.policy_dir(1))
    assert policy.reranker is not None and policy.reranker.n == 3
    prompts = [ctx.codes(u) for u in ctx.splits.train[:2]]
    assert [len(o) for o in policy.generate(["a cat", "the dog"], prompts, n=2, temperature=1.0, top_k=0)] == [2, 2]
    out = policy.generate(["a cat"], prompts[:1], n=2, temperature=1.0, top_k=0, seed=0)
    # the picked sample is the reward model's best of its group of 3
    many = policy._sample(["a cat"], prompts[:1], n=6, temperature=1.0, top_k=0, top_p=1.0, batch_size=16, seed=0,
                          progress=False)[0]
    r = policy.reranker.reward_model.score([policy.conditioning(prompts[0], "a cat")] * 6, [m.tolist() for m in many])
    from models.layout import text_length

    e = policy.meta["frames_per_char"] * text_length("a cat", policy.text_frontend)
    lo, hi = policy.reranker.length_band
    for g in range(2):
        group = [j for j in range(3 * g, 3 * g + 3) if lo * e <= many[j].numel() <= hi * e] or \
            [min(range(3 * g, 3 * g + 3), key=lambda j: abs(many[j].numel() - e))]
        assert torch.equal(out[0][g], many[max(group, key=lambda j: float(r[j]))])


def test_best_of_n_length_band_stops_a_short_loving_reward_model():
    """A reward model that prefers short outputs (what golden-vs-babble pairs teach) must not win Best-of-N
    with near-empty speech: only candidates within the band of the expected length are eligible."""
    from models.reward import BestOfN

    class ShortLover:
        def score(self, prompts, codes):
            return torch.tensor([-float(len(c)) for c in codes])

    cands = [[torch.zeros(n, dtype=torch.long) for n in (2, 40, 55, 90)]]
    bon = BestOfN(ShortLover(), n=4)
    assert bon.pick(["p"], cands, keep=1)[0][0].numel() == 2  # no expected length: unguarded
    assert bon.pick(["p"], cands, keep=1, expected_frames=[50.0])[0][0].numel() == 40  # shortest in [25, 100]
    # nothing in the band: the closest to the expected length
    assert bon.pick(["p"], cands, keep=1, expected_frames=[400.0])[0][0].numel() == 90
    with pytest.raises(ValueError, match="best_of_n_length_band"):
        from align.config import TrainConfig

        TrainConfig(best_of_n_length_band=[1.5, 2.0])


def test_grpo_takes_a_step_with_a_direct_reward(tmp_path, monkeypatch):
    """reward=wer through the pluggable scorer registry, with a stub WER that depends on the codes and
    records what it saw and returned; the logged reward statistics must be exactly those of -WER over the
    completions GRPO generated (reward = 1 - min(WER, 1), SIM off)."""
    from align import pairs as P

    calls = []  # one (codes of each completion, WERs returned) per call

    def stub_wer(ctx):
        def score(batch):
            codes = [list(r["codes"]) for r in batch.rows]
            wers = [len(c) / 10 + sum(c) / 1000 for c in codes]  # differs between most completions
            calls.append((codes, wers))
            return wers
        return score

    monkeypatch.setitem(P.SCORERS, "wer", stub_wer)
    ctx = _round_one(tmp_path, ["train.method=grpo", "train.grpo.reward=wer", "train.grpo.steps=1",
                                "train.grpo.num_generations=2", "train.grpo.prompts_per_step=2",
                                "train.grpo.max_completion_frames=8", "train.grpo.learning_rate=1e-3"])
    stats = methods.train(ctx, 1)
    assert stats["method"] == "grpo" and stats["steps"] == 1 and _changed(ctx)
    # one step = one generation batch: 2 prompts x 2 completions, scored once
    assert len(calls) == 1
    codes, wers = calls[0]
    assert len(codes) == 4 and all(0 <= x < K for c in codes for x in c)
    rewards = torch.tensor([1 - min(w, 1) for w in wers], dtype=torch.float64)  # methods.speech_reward, SIM off
    assert stats["grpo_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert stats["grpo_reward_std"] == pytest.approx(rewards.std().item(), abs=1e-6)  # TRL: unbiased, whole batch
    (logged,) = json.loads((ctx.run.train_dir(1) / "metrics.json").read_text())["history"]
    assert logged["rewards/reward_wer/mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    # train.grpo.max_completion_frames caps the codes a completion may hold (its <eos> comes on top)
    assert max(len(c) for c in codes) <= 8, [len(c) for c in codes]


def test_grpo_on_the_interleaved_layout_rewards_the_walks_it_sampled(tmp_path, monkeypatch):
    """GRPO's completions come from our sampler's walk (every unit of the text once, in order, with 1-3 frames
    each) and its reward is speech_reward of the scorers' values on exactly those streams, unit markers included."""
    from align import pairs as P
    from models.layout import TEXT_UNITS, text_units

    seen = []

    def stub(name, fn):
        def factory(ctx):
            def score(batch):
                values = [fn(r["codes"]) for r in batch.rows]
                seen.append((name, [(r["text"], list(r["codes"])) for r in batch.rows], values))
                return values
            return score
        return factory

    monkeypatch.setitem(P.SCORERS, "wer", stub("wer", lambda c: (len(c) % 7) / 10))
    monkeypatch.setitem(P.SCORERS, "sim", stub("sim", lambda c: 0.5 + sum(x for x in c if x >= 0) / 1000))
    ctx = FakeContext(tmp_path, ["train.method=grpo", "train.grpo.reward=wer_sim", "train.grpo.steps=1",
                                 "train.grpo.num_generations=2", "train.grpo.prompts_per_step=2",
                                 "train.grpo.sim_weight=0.5", "train.grpo.learning_rate=1e-3"], n_utts=4,
                      layout="interleaved")
    ctx.write_samples(1, ctx.sample_rows(n=1))
    stats = methods.train(ctx, 1)
    assert stats["method"] == "grpo" and _changed(ctx)
    (_, walked, wers), (_, _, sims) = seen
    assert len(walked) == 4
    for text, stream in walked:
        units = [TEXT_UNITS[-1 - x] for x in stream if x < 0]
        assert units == text_units(text)  # the walk: every unit, in order
        runs = [len(r) for r in "".join("u" if x < 0 else "f" for x in stream).split("u")[1:]]
        assert all(1 <= n <= 3 for n in runs)  # >= 1 frame per unit, at most max_frames_per_unit
    rewards = torch.tensor([methods.speech_reward(w, s, sum(x >= 0 for x in c), 0.5)
                            for (_, c), w, s in zip(walked, wers, sims)], dtype=torch.float64)
    assert stats["grpo_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)


@pytest.mark.slow
def test_grpo_takes_a_step_with_a_reward_model(tmp_path):
    ctx = _round_one(tmp_path, ["train.method=grpo", "train.reward.steps=2", "train.reward.batch_size=2",
                                "train.grpo.steps=1", "train.grpo.num_generations=2", "train.grpo.prompts_per_step=2",
                                "train.grpo.max_completion_frames=8", "train.grpo.learning_rate=1e-3"])
    stats = methods.train(ctx, 1)
    assert stats["method"] == "grpo" and stats["rm_pairs"] == 4 and stats["grpo_reward"] is not None
    assert _changed(ctx)


def test_grpo_rewards_read_completion_ids():
    tok = tiny_policy().tokenizer
    off = tok.convert_tokens_to_ids("<a0>")
    seen = {}

    def score(prompts, streams, rows):
        seen.update(streams=streams, rows=rows)
        return [float(len(c)) for c in streams]

    fn = methods.StreamReward("r", tok, tiny_policy().format, score)
    ids = [[off + 3, off + 5, tok.eos_token_id, off + 1], [tok.convert_tokens_to_ids("<text>"), off + 2]]
    out = fn(["p", "p"], ["", ""], ids, utt_id=["u0", "u1"], prompt_id=["u2", "u3"], text=["a", "b"])
    assert out == [2.0, 1.0] and seen["streams"] == [[3, 5], [2]] and seen["rows"][1]["utt_id"] == "u1"
    assert methods.speech_reward(0.25, 0.8, frames=10, sim_weight=0.5) == pytest.approx(1.15)
    assert methods.speech_reward(3.0, 0.8, frames=10, sim_weight=0.0) == 0.0  # WER above 1 counts as 1
    assert methods.speech_reward(0.0, 0.9, frames=0, sim_weight=1.0) == 0.0  # said nothing: 0
    # the second ear's reward: exp(-NLL per phone), the pause detector subtracted, silence still 0
    assert methods.speech_reward(None, 0.0, frames=10, sim_weight=0.0, ear_nll=math.log(2)) == pytest.approx(0.5)
    assert methods.speech_reward(None, 0.0, frames=10, sim_weight=0.0, pause=1.0, pause_weight=0.25,
                                 ear_nll=0.0) == pytest.approx(0.75)
    assert methods.speech_reward(None, 0.0, frames=0, sim_weight=0.0, ear_nll=0.0) == 0.0


def test_reward_model_ranks_golden_over_corrupted(tmp_path):
    from models.reward import RewardConfig, train_reward_model

    policy = tiny_policy()
    rng = random.Random(0)
    prompt = prompt_str([1, 2, 3], "a cat")

    def pairs(idx):
        return [{"prompt": prompt, "chosen": completion_str(golden_codes(i)),
                 "rejected": completion_str(corrupted(golden_codes(i), rng))} for i in idx]

    rm, stats = train_reward_model(policy, pairs(range(12)), RewardConfig(steps=30, learning_rate=3e-3, batch_size=6),
                                   tmp_path, seed=0)
    held_out = [(golden_codes(i, 15), corrupted(golden_codes(i, 15), rng)) for i in range(40, 56)]
    g = rm.score([prompt] * len(held_out), [a for a, _ in held_out])
    b = rm.score([prompt] * len(held_out), [b for _, b in held_out])
    assert (g > b).float().mean() >= 0.9, (g, b)
    rm.save(tmp_path / "rm")
    from models.reward import RewardModel

    again = RewardModel.load(tmp_path / "rm")
    assert torch.allclose(again.score([prompt], [held_out[0][0]]), g[:1], atol=1e-5)


def test_method_config_validation_and_old_configs_resume(tmp_path):
    with pytest.raises(ValueError, match="train.method"):
        load_config(None, ["train.method=ppo"])
    with pytest.raises(ValueError, match="num_generations"):
        load_config(None, ["train.grpo.num_generations=1"])
    # a run directory written before train:/new pair: keys existed resumes with the same config
    import yaml

    from models.configutil import to_dict
    from align.run import RunDir

    cfg = load_config(None, [f"out_dir={tmp_path}", "name=old"])
    old = to_dict(cfg)
    del old["train"]
    for key in ("scorers", "rank_by", "weights", "min_gap", "max_chosen_wer", "data", "accumulate_rounds"):
        del old["pair"][key]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(old))
    RunDir(cfg)
    with pytest.raises(ValueError, match="different config"):
        RunDir(load_config(None, [f"out_dir={tmp_path}", "name=old", "train.method=coh"]))


def test_the_ablation_study_covers_every_method_from_one_round0_policy():
    """configs/studies/ablations.yaml runs every training method; its variants start from one round-0 policy, which
    is only fair if none of them changes what round 0 depends on."""
    from align.study import load_study, plan, touches_round0

    from .conftest import REPO

    study = load_study(REPO / "configs" / "studies" / "ablations.yaml")
    specs = [s for s in plan(study) if s.variant]
    methods_run = {load_config(REPO / s.config, s.overrides).train.method for s in specs}
    assert methods_run == set(methods.METHODS)
    assert not any(touches_round0(v) for v in study.variants.values())
    assert all(any(o.startswith("policy.pretrained=") for o in s.overrides) for s in specs)


def test_a_round_keeps_its_dev_best_checkpoint(tmp_path, monkeypatch):
    """train.validate_every: the round's policy is the checkpoint with the lowest dev WER (here step 4 of 8), not the
    last step's; the curve (steps 0, 2, 4, 6, 8) goes to validation.jsonl and the summary."""
    import hashlib

    from align import validation

    dev_wer = {0: 0.50, 2: 0.45, 4: 0.30, 6: 0.40, 8: 0.35}
    seen = {}

    def fake_evaluate(policy, items, **kw):
        step = len(seen) * 2
        state = policy.lm.state_dict()
        seen[step] = hashlib.sha1(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
        return {"wer": dev_wer[step], "sim": 0.8, "n": 3}, []

    monkeypatch.setattr("eval.evaluate.evaluate_policy", fake_evaluate)
    monkeypatch.setattr(validation, "dev_items", lambda ctx, n: [None] * 3)
    ctx = _round_one(tmp_path, ["dpo.steps=8", "dpo.save_steps=100", "dpo.learning_rate=1e-2",
                                "train.validate_every=2", "corpus.n_val_sentences=2", "train.validate_utterances=3"])
    stats = methods.train(ctx, 1)
    assert [r["step"] for r in stats["validation"]] == [0, 2, 4, 6, 8] and stats["chosen_step"] == 4
    assert stats["dev_wer"] == 0.30 and len(set(seen.values())) == 5  # every checkpoint differs
    lm = Policy.load(ctx.run.policy_dir(1)).lm.state_dict()
    assert hashlib.sha1(b"".join(lm[k].numpy().tobytes() for k in sorted(lm))).hexdigest() == seen[4]
    rows = [json.loads(x) for x in (ctx.run.train_dir(1) / "validation.jsonl").read_text().splitlines()]
    assert [r["wer"] for r in rows] == [dev_wer[s] for s in (0, 2, 4, 6, 8)]


def test_a_round_that_only_hurts_dev_keeps_round_k_minus_1(tmp_path, monkeypatch):
    from align import validation

    calls = []

    def fake_evaluate(policy, items, **kw):
        calls.append(1)
        return {"wer": 0.2 if len(calls) == 1 else 0.9, "sim": 0.8, "n": 3}, []

    monkeypatch.setattr("eval.evaluate.evaluate_policy", fake_evaluate)
    monkeypatch.setattr(validation, "dev_items", lambda ctx, n: [None] * 3)
    ctx = _round_one(tmp_path, ["dpo.steps=4", "dpo.learning_rate=1e-2", "train.validate_every=2", "corpus.n_val_sentences=2"])
    stats = methods.train(ctx, 1)
    assert stats["chosen_step"] == 0 and not _changed(ctx)


def test_stray_folders_beside_trainer_checkpoints_are_ignored(tmp_path):
    (tmp_path / "checkpoint-foo").mkdir()
    (tmp_path / "checkpoint-12.bak").mkdir()
    for step in (4, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-20").mkdir()  # cut off mid-save: removed
    assert [p.name for p in methods.complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-12"]
    assert (tmp_path / "checkpoint-foo").is_dir() and not (tmp_path / "checkpoint-20").exists()
