"""models/kv_cache.py: the in-place cache gives the samples the default cache gives, faster (the speed is measured
in benchmarks/sampler_cache.py, not here)."""
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from models.kv_cache import GrowingCache, GrowingLayer

REPO = Path(__file__).resolve().parents[1]


def test_a_growing_layer_holds_what_concatenation_holds_across_capacity_doublings():
    g = torch.Generator().manual_seed(0)
    layer, keys, values = GrowingLayer(), [], []
    for t in [5, 1, 1, 70, 1, 3, 200, 1]:  # prefill, steps, and chunks that overflow the buffer
        k, v = torch.randn(3, 2, t, 4, generator=g), torch.randn(3, 2, t, 4, generator=g)
        keys.append(k)
        values.append(v)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=-2)) and torch.equal(got_v, torch.cat(values, dim=-2))
        assert layer.get_seq_length() == sum(x.shape[-2] for x in keys)
    # 64 -> 128 (77 rows) -> 281 (a chunk larger than a doubling) -> 562: doubled, not grown a step at a time
    assert layer._k_buf.shape[-2] == 562


def test_sampling_with_the_growing_cache_draws_what_the_default_cache_draws():
    """The CI policy's LM samples 2 x 3 sequences long enough to outgrow the first buffer; the tokens equal the
    default cache's to the last one (the same numbers reach attention in the same order)."""
    from models.codec_lm import Policy

    policy = Policy.load(REPO / "configs" / "ci_round0")
    lm, tok = policy.lm.eval(), policy.tokenizer
    enc = tok(["<bos>", "<bos>"], return_tensors="pt", add_special_tokens=False)
    outs = []
    for cache in (DynamicCache(), GrowingCache()):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(lm.generate(**enc, cache=cache, do_sample=True, top_k=50, max_new_tokens=150,
                                    min_new_tokens=150, num_return_sequences=3, pad_token_id=tok.pad_token_id))
    assert outs[0].shape == (6, enc["input_ids"].shape[1] + 150)
    assert torch.equal(outs[0], outs[1])
