"""Sequence layout, tokenizer, generation and one DPO step through TRL."""
import pytest
import torch

from models.codec import CodecConfig, MelRVQCodec
from models.codec_lm import Policy, build_lm
from models.layout import build_tokenizer, codec_token, completion_str, parse_codes, prompt_str, text_to_tokens

K = 32


@pytest.fixture
def tok():
    return build_tokenizer(K)


def _policy(tok, n_q=1):
    codec = MelRVQCodec(CodecConfig(n_q=n_q, codebook_size=K), torch.randn(n_q, K, 80))
    lm = build_lm("tiny", len(tok), 512, seed=0)
    return Policy(lm, tok, None, codec, {"prompt_seconds": 0.1, "max_seconds": 1.0, "frames_per_char": 2.0})


def test_pair_token_layout_is_exact(tok):
    prompt = prompt_str(torch.tensor([3, 1]), "The cat's 2 hats!")
    assert prompt == "<bos> <prompt> <a3> <a1> <text> t h e | c a t ' s | t w o | h a t s <speech>"
    assert completion_str([5, 0]) == " <a5> <a0> <eos>"
    assert text_to_tokens("  Hello,   WORLD ") == "h e l l o | w o r l d"


def test_phone_frontend_layout_and_tokens(tok):
    """phones: ARPAbet from the CMU dictionary, stress dropped; unknown words fall back to letters."""
    assert text_to_tokens("Hello, world!", "phones") == "HH AH L OW | W ER L D"
    assert text_to_tokens("the zxqv", "phones") == "DH AH | z x q v"
    prompt = prompt_str([3], "Don't read", "phones")
    assert prompt == "<bos> <prompt> <a3> <text> D OW N T | R EH D <speech>"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[3:8] == ["<text>", "D", "OW", "N", "T"]
    with pytest.raises(ValueError, match="frontend"):
        text_to_tokens("hi", "graphemes")


def test_tokenizer_round_trip_and_prefix_property(tok):
    prompt, chosen = prompt_str([3, 1], "hi there"), completion_str([7, 7, 2])
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + chosen, add_special_tokens=False)["input_ids"]
    # TRL finds the completion where prompt and prompt+completion diverge: the prompt must be a prefix
    assert full[: len(p_ids)] == p_ids
    offset = tok.convert_tokens_to_ids(codec_token(0))
    assert full[len(p_ids):] == [offset + 7, offset + 7, offset + 2, tok.eos_token_id]
    assert tok.unk_token_id not in full
    # spaces are optional between tokens
    assert tok("<speech><a1><eos>", add_special_tokens=False)["input_ids"] == \
        tok("<speech> <a1> <eos>", add_special_tokens=False)["input_ids"]
    assert parse_codes(tok.decode(full[len(p_ids):])).tolist() == [7, 7, 2]


def test_tokenizer_saves_and_reloads(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    s = prompt_str([1, 2], "a b") + completion_str([3])
    assert again(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]


def test_generate_only_emits_codes_and_is_seeded(tok):
    policy = _policy(tok)
    prompts = [torch.randint(0, K, (1, 20)) for _ in range(3)]
    a = policy.generate(["one", "two words", "three"], prompts, n=2, temperature=1.0, top_k=10, seed=3, batch_size=2)
    b = policy.generate(["one", "two words", "three"], prompts, n=2, temperature=1.0, top_k=10, seed=3, batch_size=2)
    assert len(a) == 3 and all(len(s) == 2 for s in a)
    for sa, sb in zip(a, b):
        for x, y in zip(sa, sb):
            assert torch.equal(x, y)
            assert x.numel() == 0 or (x.min() >= 0 and x.max() < K)


def test_policy_save_load_round_trip(tok, tmp_path):
    policy = _policy(tok)
    policy.save(tmp_path / "policy")
    again = Policy.load(tmp_path / "policy")
    ids = torch.tensor([[2, 4, 5, 6]])
    assert torch.allclose(policy.lm(ids).logits, again.lm(ids).logits)
    assert again.codec.identity == policy.codec.identity
    with pytest.raises(ValueError, match="speechalign.json missing"):
        Policy.load(tmp_path)


def test_dpo_step_through_trl_changes_parameters(tok, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = _policy(tok)
    ref = build_lm("tiny", len(tok), 512, seed=0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        golden = torch.randint(0, K, (12,), generator=g)
        rows.append({"prompt": prompt_str(torch.randint(0, K, (5,), generator=g), f"word {i}"),
                     "chosen": completion_str(golden), "rejected": completion_str(golden.flip(0)[:8])})
    before = {n: p.detach().clone() for n, p in policy.lm.named_parameters()}
    # fixed inputs: every pair's prompt + chosen, padded; the reference's logits on them must not move
    probe = [tok(r["prompt"] + r["chosen"], add_special_tokens=False)["input_ids"] for r in rows]
    width = max(map(len, probe))
    probe_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids in probe])
    probe_mask = (torch.arange(width)[None] < torch.tensor([len(ids) for ids in probe])[:, None]).long()

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=probe_ids, attention_mask=probe_mask).logits.clone()

    ref_logits, policy_logits = logits(ref), logits(policy.lm)
    assert torch.equal(ref_logits, policy_logits)  # same seed: the reference starts as the policy
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    # bf16=False as the project's DPO stage sets it: TRL's default (bf16) would wrap both models' forward
    # in a bf16 autocast for good, and the reference's logits would then differ by rounding alone
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", beta=0.1, bf16=False)
    trainer = DPOTrainer(model=policy.lm, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    # TRL split our strings where we meant: prompt ids end with <speech>, completions end with <eos>
    first = trainer.train_dataset[0]
    assert first["prompt_ids"][-1] == tok.convert_tokens_to_ids("<speech>")
    assert first["chosen_ids"][-1] == tok.eos_token_id and len(first["chosen_ids"]) == 13
    trainer.train()
    changed = [n for n, p in policy.lm.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > 0.9 * len(before)
    # the reference model is frozen: same weights, same logits on the fixed inputs, while the policy's moved
    assert all(torch.equal(p.detach(), ref_before[n]) for n, p in ref.named_parameters())
    assert torch.equal(logits(trainer.ref_model), ref_logits)
    assert not torch.allclose(logits(policy.lm), policy_logits, atol=1e-4)


def test_lora_dpo_step_merges_into_a_plain_policy(tok, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    policy = _policy(tok)
    before = {n: p.detach().clone() for n, p in policy.lm.named_parameters()}
    rows = [{"prompt": prompt_str([1, 2], f"w {i}"), "chosen": completion_str([3, 4, 5]),
             "rejected": completion_str([9, 9])} for i in range(4)]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                     report_to="none", use_cpu=True, save_strategy="no", beta=0.1)
    trainer = DPOTrainer(model=policy.lm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    merged = trainer.model.merge_and_unload()
    names = dict(merged.named_parameters())
    assert set(names) == set(before)  # no adapter weights left
    changed = [n for n in before if not torch.equal(names[n].detach(), before[n])]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)


def test_nan_losses_stop_with_a_clear_error():
    from types import SimpleNamespace

    from align.methods import nan_guard
    from align.training import check_finite

    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        check_finite(torch.tensor(float("nan")), "base AR", 7)
    guard = nan_guard()
    guard.on_log(None, SimpleNamespace(global_step=3), None, logs={"loss": 0.5})  # finite: fine
    with pytest.raises(FloatingPointError, match="dpo.learning_rate"):
        guard.on_log(None, SimpleNamespace(global_step=4), None, logs={"loss": float("nan")})
