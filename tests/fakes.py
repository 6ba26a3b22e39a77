"""A tiny in-memory stand-in for ``align.run.Context``: a run directory with a saved tiny policy,
golden codes with structure (runs of ascending codes), and no corpus, codec fitting or ASR."""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import torch

from align.config import load_config
from align.dist import Ranks
from models.data import Utterance
from models.codec import CodecConfig, MelRVQCodec
from models.codec_lm import Policy
from models.layout import build_tokenizer
from models.rundir import RunLayout

K = 16


def tiny_lm(vocab_size: int, seed: int = 0):
    """A 2-layer, 32-wide Llama: enough to take a step, small enough for seconds on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tiny_policy(layout: str = "plain") -> Policy:
    """A tiny plain-layout policy, or (``layout="interleaved"``) one that walks through the letters of its text."""
    tok = build_tokenizer(K)
    codec = MelRVQCodec(CodecConfig(n_q=1, codebook_size=K), torch.randn(1, K, 80))
    meta = {"prompt_seconds": 0.05, "max_seconds": 0.3, "frames_per_char": 1.0}
    if layout == "interleaved":
        meta.update(format="interleaved", max_frames_per_unit=3)
    return Policy(tiny_lm(len(tok)), tok, None, codec, meta)


def golden_codes(i: int, length: int = 12) -> list[int]:
    """Structured 'speech': runs of 3 equal codes stepping up by one (what a real codec's slow frames look like)."""
    return [((i + j // 3) % K) for j in range(length)]


def corrupted(codes: list[int], rng: random.Random) -> list[int]:
    return [rng.randrange(K) for _ in codes]


class FakeRun(RunLayout):
    """The run directory's paths, without a config, state or log."""


class FakeContext:
    """What stages read from a Context: cfg, run, device, splits.train, codec and ``codes(utt)``."""

    def __init__(self, root: Path, overrides: list[str] | None = None, n_utts: int = 6, layout: str = "plain"):
        self.cfg = load_config(None, [f"cache_dir={Path(root) / 'cache'}", "policy.prompt_seconds=0.05", "dpo.steps=2", "dpo.batch_size=2",
                                      "dpo.save_steps=100", "dpo.max_length=128", "pair.min_distance=0.0",
                                      "base.log_every=1"] + (overrides or []))
        self.run = FakeRun(Path(root))
        self.device = "cpu"
        self.ranks = Ranks()  # one process, as a test runs
        self.scorers = None  # no judges: tests that need them stub the scorers
        self.policy = tiny_policy(layout)
        self.codec = self.policy.codec
        texts = ["a cat", "the dog", "big red", "one two", "go now", "hi you", "we sat", "no way"]
        utts = [Utterance(f"u{i}", str(root / f"u{i}.wav"), texts[i % len(texts)], f"s{i % 2}") for i in range(n_utts)]
        self.splits = SimpleNamespace(train=utts, dev=[], test=[])
        self._codes = {u.id: torch.tensor([golden_codes(i)]) for i, u in enumerate(utts)}
        for k in range(3):  # pair() lays round k's pairs out for round k-1's policy
            self.policy.save(self.run.policy_dir(k))

    def codes(self, utt) -> torch.LongTensor:
        return self._codes[utt.id]

    def prompt_for(self, utt, pool, salt: int = 0, min_seconds: float = 0.0):
        from models.data import choose_prompt

        return choose_prompt(utt, pool, self.cfg.seed + salt)

    def store(self, kind, policy_dir, what):
        from align.run import Context

        return Context.store(self, kind, policy_dir, what)  # the real one, in this context's cache_dir

    def prompt_digest(self, utts) -> str:
        from align.run import Context

        return Context.prompt_digest(self, utts)  # the real one, over these codes

    def golden_stream(self, utt, fmt) -> torch.LongTensor:
        from align.run import Context

        return Context.golden_stream(self, utt, fmt)  # the real one, over these codes

    def sample_rows(self, n: int = 2, seed: int = 0) -> list[dict]:
        """samples.jsonl rows: n corrupted samples per utterance (the other utterance of its speaker as prompt)."""
        rng = random.Random(seed)
        rows = []
        utts = self.splits.train
        for i, u in enumerate(utts):
            prompt = utts[(i + 2) % len(utts)]
            for j in range(n):
                rows.append({"id": u.id, "prompt_id": prompt.id, "text": u.text, "speaker": u.speaker, "sample": j,
                             "codes": corrupted(golden_codes(i), rng)})
        return rows

    def write_samples(self, k: int, rows: list[dict]) -> None:
        from models.io import write_jsonl

        d = self.run.samples_dir(k)
        d.mkdir(parents=True, exist_ok=True)
        write_jsonl(d / "samples.jsonl", rows)
