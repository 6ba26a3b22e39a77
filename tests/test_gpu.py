"""On a CUDA device (``python -m pytest -m gpu``): one DPO step of the project's training stage and one
sampling batch of a tiny policy. Skipped by default (setup.cfg: ``-m "not slow and not gpu"``), and
skipped with its reason where torch sees no CUDA device even when selected with ``-m gpu``."""
import json
import math

import pytest
import torch

from .fakes import K, FakeContext, golden_codes, tiny_policy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device: torch.cuda.is_available() is False")]


def _write_pairs(ctx, n=8):
    fmt = ctx.policy.format
    rows = []
    for i in range(n):
        chosen = golden_codes(i)
        rows.append({"prompt": fmt.prompt_str(torch.tensor(golden_codes(i + 3, 3)), f"word {i}"),
                     "chosen": fmt.completion_str(chosen), "rejected": fmt.completion_str(chosen[::-1][:8]),
                     "keep": True})
    d = ctx.run.pairs_dir(1)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_dpo_step_of_the_training_stage_on_cuda(tmp_path):
    from safetensors.torch import load_file

    from align import methods

    ctx = FakeContext(tmp_path, ["dpo.steps=1", "dpo.batch_size=4", "train.method=dpo"])
    ctx.device = "cuda"  # the stage hands the trainer use_cpu=(device == "cpu")
    _write_pairs(ctx)
    stats = methods.train(ctx, 1)
    assert stats["steps"] == 1 and math.isfinite(stats["loss"]), stats
    w0 = load_file(str(ctx.run.policy_dir(0) / "model.safetensors"))
    w1 = load_file(str(ctx.run.policy_dir(1) / "model.safetensors"))
    assert all(t.device.type == "cpu" for t in w1.values())  # saved as an ordinary, device-free checkpoint
    assert all(torch.isfinite(t).all() for t in w1.values())
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_sampling_on_cuda_matches_cpu_in_shape_and_greedy_tokens():
    policy = tiny_policy()
    texts = ["a cat", "the dog sat", "go"]
    prompts = [torch.tensor([golden_codes(i, 6)]) for i in range(3)]

    def sample(device, **kw):
        policy.lm.to(device)
        return policy.generate(texts, prompts, batch_size=2, seed=3, **kw)

    cpu, cuda = sample("cpu", n=2, temperature=1.0, top_k=8), sample("cuda", n=2, temperature=1.0, top_k=8)
    assert len(cuda) == len(cpu) == 3 and [len(s) for s in cuda] == [len(s) for s in cpu] == [2, 2, 2]
    for samples in cuda:
        for codes in samples:
            assert codes.device.type == "cpu" and codes.dtype == torch.long and codes.ndim == 1
            assert codes.numel() == 0 or (codes.min() >= 0 and codes.max() < K)
    # greedy decoding is a function of the weights alone: the same tokens on either device
    greedy_cpu, greedy_cuda = sample("cpu", temperature=0.0), sample("cuda", temperature=0.0)
    for a, b in zip(greedy_cpu, greedy_cuda):
        assert torch.equal(a[0], b[0]), (a, b)
