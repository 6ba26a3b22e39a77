"""One distribution: the rule the sampler draws under (models/walk.py) is the one every scorer uses."""
import pytest
import torch

from models.codec import CodecConfig, MelRVQCodec
from models.codec_lm import Policy
from models.layout import build_tokenizer
from models.walk import EmitRule, completion_log_probs
from tests.fakes import tiny_lm

K = 16


def _policy(layout: str) -> Policy:
    tok = build_tokenizer(K)
    codec = MelRVQCodec(CodecConfig(n_q=1, codebook_size=K), torch.randn(1, K, 80))
    meta = {"prompt_seconds": 0.05, "max_seconds": 0.5, "frames_per_char": 2.0, "text_frontend": "phones"}
    if layout == "interleaved":
        meta.update(format="interleaved", max_frames_per_unit=4)
    return Policy(tiny_lm(len(tok), seed=3), tok, None, codec, meta)


def _toy_rule() -> EmitRule:
    """Vocab of 12: 3 = <eos>, 1 = <text>, codecs 4..7, units 8..11."""
    return EmitRule(12, torch.arange(4, 8), walk=True, codec_ids=torch.arange(4, 8), unit_ids=torch.arange(8, 12),
                    eos_id=3, text_id=1, max_frames=5)


def test_walk_gives_the_next_unit_the_mass_of_every_unit_token():
    """A policy sure that *a* unit comes next but wrong about which one advances to the text's next unit."""
    rule = _toy_rule()
    head = [1, 8, 9, 2]  # <text> (units 8 9) and a 'speech' token ending the prompt: completions start at 4
    zeros = torch.zeros(1, 12)
    first = rule.step(torch.tensor([head]), zeros.clone(), start=4)
    assert torch.isfinite(first[0]).nonzero().flatten().tolist() == [8]  # only the first unit may start
    after_unit = rule.step(torch.tensor([head + [8]]), zeros.clone(), start=4)
    assert torch.isfinite(after_unit[0]).nonzero().flatten().tolist() == [4, 5, 6, 7]  # >= 1 frame first
    s = torch.zeros(1, 12)
    s[0, 11] = 10.0  # all the "advance" mass on the wrong unit
    probs = rule.step(torch.tensor([head + [8, 5]]), s, start=4).softmax(-1)[0]
    assert probs[9] > 0.99 and probs[11] == 0 and probs[10] == 0
    capped = rule.step(torch.tensor([head + [8, 5, 5, 5, 5, 5]]), zeros.clone(), start=4)  # a 5th frame: the cap
    assert torch.isfinite(capped[0]).nonzero().flatten().tolist() == [9]
    last = rule.step(torch.tensor([head + [8, 5, 9, 6]]), zeros.clone(), start=4)  # after the last unit: <eos>
    assert torch.isfinite(last[0]).nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


def test_scoring_constrains_completion_positions_only_and_matches_the_step():
    rule = _toy_rule()
    ids = torch.tensor([[0, 1, 8, 9, 2, 8, 5, 5, 9, 6, 3]])
    predicts = torch.zeros_like(ids, dtype=torch.bool)
    predicts[0, 4:10] = True  # positions 4..9 predict the completion tokens 5..10
    logits = torch.randn(1, 11, 12)
    out = rule.constrain(logits, ids, predicts)
    assert torch.equal(out[0, :4], logits[0, :4])  # the prompt's positions are untouched
    for t in range(4, 10):
        assert torch.equal(out[0, t], rule.step(ids[:, : t + 1], logits[:, t], start=5)[0])


@pytest.mark.parametrize("layout", ["interleaved", "plain"])
def test_a_samples_log_prob_under_the_sampler_equals_the_training_path(layout):
    """Sampled at temperature 1 without top-k, the sampler's summed log-prob of each sequence (from the scores
    generate hands its sampling step) equals what the trainers score (``completion_log_probs``) to 1e-4."""
    from transformers import LogitsProcessorList

    from models.walk import RuleProcessor

    policy = _policy(layout)
    tok, lm = policy.tokenizer, policy.lm.eval()
    prompts = [torch.randint(0, K, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    texts = ["a cat sat", "hi", "the old red boat"]
    enc = tok([policy.conditioning(p, t) for p, t in zip(prompts, texts)], return_tensors="pt", padding=True,
              add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = lm.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=60,
                          logits_processor=LogitsProcessorList([RuleProcessor(policy.emit_rule)]),
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, output_scores=True,
                          return_dict_in_generate=True)
    width = enc["input_ids"].shape[1]
    new = out.sequences[:, width:]
    for i in range(len(texts)):
        steps = [(t, int(new[i, t])) for t in range(new.shape[1])]
        ended = next((t for t, x in steps if x == tok.eos_token_id), len(steps) - 1)
        sampler = sum(float(torch.log_softmax(out.scores[t][i], -1)[x]) for t, x in steps[: ended + 1])
        # the training path: right-padded prompt + completion, loss on the completion (as TRL builds it)
        head = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        tail = new[i, : ended + 1].tolist()
        ids = torch.tensor([head + tail])
        labels = torch.tensor([[-100] * len(head) + tail])
        with torch.no_grad():
            scored = completion_log_probs(lm, policy.emit_rule, ids, None, labels)["log_probs"].sum()
        assert float(scored) == pytest.approx(sampler, abs=1e-4)
        assert sampler > -1e9  # every sampled token is allowed by the rule


def test_a_sequence_the_walk_cannot_say_scores_minus_infinity():
    """A unit out of order: the sampler never draws it, so the scoring path gives it no probability."""
    policy = _policy("interleaved")
    tok = policy.tokenizer
    head = tok(policy.conditioning(torch.zeros(1, 8, dtype=torch.long), "hi"), add_special_tokens=False)["input_ids"]
    good = tok(" HH <a1> AY <a2> <eos>", add_special_tokens=False)["input_ids"]
    bad = tok(" AY <a1> HH <a2> <eos>", add_special_tokens=False)["input_ids"]
    for tail, finite in ((good, True), (bad, False)):
        ids = torch.tensor([head + tail])
        labels = torch.tensor([[-100] * len(head) + tail])
        with torch.no_grad():
            lp = completion_log_probs(policy.lm, policy.emit_rule, ids, None, labels)["log_probs"].sum()
        assert bool(torch.isfinite(lp)) is finite


def test_trl_dpo_scores_policy_and_reference_under_the_rule(tmp_path):
    """The reference log-probs TRL precomputes inside rule_scoring are the rule's, not the full softmax's."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from align.scoring import rule_scoring

    policy = _policy("interleaved")
    tok = policy.tokenizer
    prompt = policy.conditioning(torch.zeros(1, 8, dtype=torch.long), "hi")
    chosen, rejected = " HH <a1> <a1> AY <a2> <eos>", " HH <a5> AY <a7> <a7> <a7> <eos>"
    data = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, per_device_train_batch_size=2,
                     max_steps=1, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    with rule_scoring(policy.emit_rule):
        trainer = DPOTrainer(model=policy.lm, ref_model=_policy("interleaved").lm, args=args, train_dataset=data,
                             processing_class=tok)
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    want = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        tail = tok(text, add_special_tokens=False)["input_ids"]
        ids, labels = torch.tensor([head + tail]), torch.tensor([[-100] * len(head) + tail])
        with torch.no_grad():
            want[name] = float(completion_log_probs(policy.lm, policy.emit_rule, ids, None, labels)["log_probs"].sum())
            full = float(-policy.lm(ids, labels=labels).loss * len(tail))
        assert want[name] > full + 1.0  # the rule renormalises over far fewer tokens than the vocabulary
    assert trainer.train_dataset["ref_chosen_logps"][0] == pytest.approx(want["chosen"], abs=1e-3)  # batch padding: float sums
    assert trainer.train_dataset["ref_rejected_logps"][0] == pytest.approx(want["rejected"], abs=1e-3)
    trainer.train()  # and the policy's own forward in a step goes through the rule head without error



def test_the_sampler_never_draws_a_stream_its_renderer_cannot_render():
    """The CI policy may dwell 90 frames on a unit, so the walk alone allows streams longer than the renderer's
    positions; a ruined policy drew one (a learning rate x 10 stopped a run at 2132 frames). The sampler's bound is
    the renderer's room after the prompt: with the room shrunk to 40 tokens a hot sampler's every stream fits it and
    renders."""
    from pathlib import Path

    policy = Policy.load(Path(__file__).resolve().parents[1] / "configs" / "ci_round0")
    prompt = torch.randint(0, policy.codec.codebook_size, (policy.codec.n_q, 80),
                           generator=torch.Generator().manual_seed(0))
    text = "a sentence long enough that its walk alone would allow hundreds of frames"
    assert len(policy.format.units(text)) * (policy.emit_rule.max_frames + 1) > 400
    prompt_n = policy.renderer.cfg.max_frames - policy.renderer_room
    policy.renderer.cfg.max_frames = prompt_n + 40
    assert policy.renderer_room == 40
    streams = policy.generate([text] * 4, [prompt] * 4, n=2, temperature=1.5, top_k=0, batch_size=4, seed=1)
    lengths = [len(s) for samples in streams for s in samples]
    assert max(lengths) == 40  # hot sampling runs into the bound, and no further
    for samples in streams:
        for s in samples:
            policy.render(s, prompt)  # no "exceeds renderer max_frames"
