"""The codec language model = the policy that SpeechAlign aligns.

An autoregressive transformers causal LM (Llama) over one joint vocabulary of special tokens,
text characters and RVQ-1 codec tokens, plus the NAR model for RVQ 2..n_q and the codec that turns
codes into audio. A sequence reads (models/layout.py)::

    <bos> <prompt> <a12> <a7> ... <text> t h e | c a t <speech> <a3> <a3> ... <eos>
          \\_ voice prompt: RVQ-1 of another   \\_ text, one token   \\_ RVQ-1 of the
             utterance of the same speaker       per character        target speech

With ``policy.layout: interleaved`` the speech part instead writes each text unit just before its
codes (``<speech> HH <a3> <a3> AY <a7> ... <eos>``, models/layout.py) and generation walks through
the text's units (models/walk.py: the rule every trainer scores under too); ``policy.renderer: phones`` then renders codes and units through
models/renderer.py instead of the NAR.

TRL's DPOTrainer tokenizes string columns with the policy's ``processing_class`` and has no
pre-tokenized path, so the policy carries a real ``PreTrainedTokenizerFast`` over this vocabulary
(codec tokens written as strings ``<a123>``), saved with the model. DPO's ``prompt`` is everything
up to ``<speech>``, ``chosen``/``rejected`` the codes after it.

A policy directory (what every round writes and ``Policy.load`` reads)::

    policy/config.json model.safetensors tokenizer.json ...   # transformers: from_pretrained loads it
    policy/nar/ (or renderer/, flow/)   policy/codec/       policy/speechalign.json
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.codec import Codec, load_codec, prompt_frames
from models.layout import (LAYOUT_VERSION, TEXT_FRONTENDS, SequenceFormat, codec_token, format_for,
                           text_length, with_hint)
from models.nar import NAR_KINDS, NARModel, load_nar
from models.walk import RuleProcessor

log = logging.getLogger("speechalign.policy")

@dataclass
class PolicyConfig:
    """Shape of the AR policy and the NAR model."""

    size: str = field(default="tiny", metadata={"help": "AR size: tiny (4x128, CPU minutes), base (8x512), "
                                                         "paper (LLaMA-7B shape)"})
    nar_size: str = field(default="tiny", metadata={"help": "NAR size: tiny, base, paper"})
    nar_type: str = field(default="vall_e", metadata={
        "help": "NAR kind: vall_e (level by level) or soundstorm (masked tokens, iterative decoding)"})
    prompt_seconds: float = field(default=1.5, metadata={
        "help": "seconds of the voice prompt's codes prefixed to each sequence"})
    max_seconds: float = field(default=6.0, metadata={"help": "longest speech the policy may generate"})
    text_frontend: str = field(default="chars", metadata={
        "help": "how text enters the policy: chars (letters) or phones (ARPAbet from the CMU dictionary the "
                "pocketsphinx package ships; out-of-dictionary words fall back to letters). Phones spare a "
                "small model from learning English spelling from a few hundred sentences"})
    layout: str = field(default="plain", metadata={
        "help": "sequence layout: plain (the paper's: text, then all RVQ-1 codes) or interleaved (each text unit "
                "just before its codes, as in ELLA-V; needs phone alignments of the training audio, which the "
                "embedded corpus writes)"})
    renderer: str = field(default="nar", metadata={
        "help": "what turns RVQ-1 into audio: nar (levels 2..n_q token by token, policy.nar_type) or phones (a "
                "codec latent regressed from RVQ-1 and each frame's unit, then quantised; needs layout interleaved)"})
    renderer_size: str = field(default="tiny", metadata={"help": "phones renderer size: small, tiny, base, paper"})
    pretrained: str | None = field(default=None, metadata={
        "help": "start from this policy directory instead of training a base model"})

    def __post_init__(self):
        if self.size not in AR_SIZES:
            raise ValueError(f"policy.size={self.size!r} unknown; choose one of {sorted(AR_SIZES)}")
        if self.nar_type not in NAR_KINDS:
            raise ValueError(f"policy.nar_type={self.nar_type!r} unknown; choose one of {NAR_KINDS}")
        if not 0 < self.prompt_seconds <= 10:
            raise ValueError(f"policy.prompt_seconds={self.prompt_seconds} must be in (0, 10]")
        if self.max_seconds <= 0:
            raise ValueError(f"policy.max_seconds={self.max_seconds} must be > 0")
        if self.layout not in LAYOUTS:
            raise ValueError(f"policy.layout={self.layout!r}: choose one of {LAYOUTS}")
        if self.renderer not in RENDERERS:
            raise ValueError(f"policy.renderer={self.renderer!r}: choose one of {RENDERERS}")
        if self.renderer == "phones" and self.layout != "interleaved":
            raise ValueError("policy.renderer=phones reads each frame's text unit, which only the interleaved layout "
                             "writes: set policy.layout=interleaved (or policy.renderer=nar)")
        if self.text_frontend not in TEXT_FRONTENDS:
            raise ValueError(f"policy.text_frontend={self.text_frontend!r}: choose one of {TEXT_FRONTENDS}")


LAYOUTS = ("plain", "interleaved")
RENDERERS = ("nar", "phones")

# Named AR sizes. 'paper' is the LLaMA-7B shape the SpeechAlign paper used.
AR_SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8),
    "paper": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32),
}


# ---------------------------------------------------------------------------------------------
def build_lm(size: str, vocab_size: int, max_positions: int, seed: int):
    """A fresh ``LlamaForCausalLM`` of a named size over the joint vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, **AR_SIZES[size])
    return LlamaForCausalLM(config)


@dataclass
class Policy:
    """AR LM + tokenizer + NAR + codec; everything needed to go from (text, prompt) to audio."""

    lm: "torch.nn.Module"
    tokenizer: object
    nar: NARModel | None
    codec: Codec
    meta: dict = field(default_factory=dict)  # prompt_seconds, frames_per_char, max_seconds, quality_hint, ...
    flow: "torch.nn.Module | None" = None  # models.flow.FlowModel: renders RVQ-1 instead of the NAR
    renderer: "torch.nn.Module | None" = None  # models.renderer.PhoneRenderer: renders interleaved streams
    reranker: object | None = None  # models.reward.BestOfN: generate() returns reward-reranked samples

    @property
    def text_frontend(self) -> str:
        return self.meta.get("text_frontend", "chars")  # policies saved before phones existed used chars

    @property
    def code_offset(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(codec_token(0))

    @property
    def format(self) -> SequenceFormat:
        """The policy's sequence layout (``meta["format"]``, default ``codec_lm``)."""
        return format_for(self.meta)

    def prompt_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Trim a prompt utterance's codes [n_q, T] to the policy's prompt length -> [n_q, Tp]."""
        n = prompt_frames(self.meta["prompt_seconds"], self.codec.frame_rate)
        return codes[:, :n]

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the policy directory atomically (temp dir, then rename)."""
        from models.io import atomic_dir

        with atomic_dir(path) as tmp:
            self.lm.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if self.nar is not None:
                self.nar.save(tmp / "nar")
            if self.flow is not None:
                self.flow.save(tmp / "flow")
            if self.renderer is not None:
                self.renderer.save(tmp / "renderer")
            self.codec.save(tmp / "codec")
            if self.reranker is not None:
                self.reranker.save(tmp / "reward_model")
            meta = dict(self.meta, layout_version=LAYOUT_VERSION, codec_identity=self.codec.identity,
                        renderer="flow" if self.flow is not None else "phones" if self.renderer is not None else "nar")
            (tmp / "speechalign.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Policy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        problems = policy_dir_problems(path)
        if problems:
            raise ValueError(f"{path} is not a policy directory this code can load: {'; '.join(problems)}")
        meta = json.loads((path / "speechalign.json").read_text())
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        nar = load_nar(path / "nar").to(device) if (path / "nar").is_dir() else None
        flow = None
        if meta.get("renderer", "nar") == "flow":
            from models.flow import FlowModel

            flow = FlowModel.load(path / "flow").to(device)
        renderer = None
        if meta.get("renderer") == "phones":
            from models.renderer import PhoneRenderer

            renderer = PhoneRenderer.load(path / "renderer").to(device)
        reranker = None
        if (path / "reward_model" / "best_of_n.json").is_file():
            from models.reward import BestOfN

            reranker = BestOfN.load(path / "reward_model", device)
        codec = load_codec(path / "codec")
        return cls(lm=lm, tokenizer=tokenizer, nar=nar, codec=codec, meta=meta, flow=flow, renderer=renderer,
                   reranker=reranker)

    @property
    def emit_rule(self):
        """What this policy may emit after its prompt (models/walk.py): the one rule its sampler draws under
        and every trainer and the gap analysis score under."""
        from models.walk import EmitRule

        return EmitRule.for_policy(self.tokenizer, self.format, self.codec.codebook_size,
                                   self.meta.get("max_frames_per_unit"))

    def conditioning(self, prompt_codes: torch.Tensor, text: str) -> str:
        """The prompt string for (full prompt codes [n_q, Tp], text), with the policy's quality hint if any."""
        return conditioning(self.meta, prompt_codes, text, self.codec.frame_rate)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, texts: list[str], prompts: list[torch.Tensor], *, n: int = 1, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, batch_size: int = 16, seed: int = 0,
                 progress: bool = False, max_frames: int | None = None) -> list[list[torch.LongTensor]]:
        """Sample RVQ-1 codes for each (text, prompt); batched, KV-cached (``generate``).

        texts: B strings; prompts: B LongTensors [n_q, Tp] (full prompt codes; trimmed here).
        Returns B lists of n LongTensors [T_i] (codes before ``<eos>``). Greedy when temperature == 0.
        Deterministic for a given seed and batch_size. A policy with a ``reranker`` draws
        ``reranker.n`` samples per returned one and keeps the best by its reward model. ``max_frames``: the
        longest sample in tokens, in place of the policy's ``meta["max_seconds"]`` for this call alone (GRPO's
        rollouts); the interleaved walk is bounded by its text's units and ignores it.
        """
        for t in texts:  # refuse before any model work: one huge text would size every batch's attention
            if text_length(t, self.text_frontend) > self.max_text_tokens:
                raise ValueError(f"cannot speak {t[:60]!r}{'...' if len(t) > 60 else ''}: {self.text_problem(t)}")
        if self.reranker is not None:
            many = self._sample(texts, prompts, n=n * self.reranker.n, temperature=temperature, top_k=top_k,
                                top_p=top_p, batch_size=batch_size, seed=seed, progress=progress, max_frames=max_frames)
            return self.reranker.pick([self.conditioning(p, t) for t, p in zip(texts, prompts)], many, keep=n,
                                      expected_frames=[self.expected_frames(t) for t in texts])
        return self._sample(texts, prompts, n=n, temperature=temperature, top_k=top_k, top_p=top_p,
                            batch_size=batch_size, seed=seed, progress=progress, max_frames=max_frames)

    @property
    def renderer_room(self) -> int:
        """The longest stream (in tokens, frames and unit markers) the phone renderer renders after the voice
        prompt: its positions less the prompt's frames."""
        return int(self.renderer.cfg.max_frames) - prompt_frames(self.meta["prompt_seconds"], self.codec.frame_rate)

    @property
    def max_text_tokens(self) -> int:
        """Longest text (in text tokens) the LM's positions leave room for, beside the longest prompt and the
        longest speech it may generate; longer texts are refused before any model work (a 5,000-word text
        would otherwise ask the attention for gigabytes)."""
        n_positions = int(getattr(self.lm.config, "max_position_embeddings", 2048))
        max_frames = int(self.meta.get("max_seconds", 6.0) * self.codec.frame_rate)
        specials = 8  # <bos> <prompt> <text> <speech> <eos> and a hint, with room to spare
        return max(0, n_positions - prompt_frames(self.meta["prompt_seconds"], self.codec.frame_rate) - max_frames
                   - specials)

    def text_problem(self, text: str) -> str | None:
        """Why this policy cannot speak ``text`` (empty, or longer than ``max_text_tokens``); None when it can."""
        n = text_length(text, self.text_frontend)
        if n == 0:
            return "the text is empty after normalisation"
        if n > self.max_text_tokens:
            return (f"the text is {n} tokens long; this policy takes at most {self.max_text_tokens} "
                    "(split it into sentences)")
        return None

    def expected_frames(self, text: str) -> float:
        """Frames a golden utterance of ``text`` takes on average: text tokens x the training data's
        frames per token (``frames_per_char``)."""
        return float(self.meta.get("frames_per_char", 4.0)) * text_length(text, self.text_frontend)

    def _sample(self, texts, prompts, *, n, temperature, top_k, top_p, batch_size, seed, progress, max_frames=None):
        from tqdm import tqdm

        lm = self.lm.eval()
        device = next(lm.parameters()).device
        tok = self.tokenizer
        K = self.codec.codebook_size
        fmt = self.format
        stop_ids = tok.convert_tokens_to_ids(fmt.stop_tokens)
        rule = self.emit_rule
        if max_frames is None:
            max_frames = int(self.meta.get("max_seconds", 6.0) * self.codec.frame_rate)
        results: list[list[torch.LongTensor]] = []
        order = range(0, len(texts), batch_size)
        for start in tqdm(order, desc="sampling", disable=not progress, leave=False):
            batch_texts = texts[start: start + batch_size]
            strs = [self.conditioning(p, t) for t, p in zip(batch_texts, prompts[start: start + batch_size])]
            enc = tok(strs, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # Cap length by the text: 2.5x the training data's frames per character, so a policy that
            # never emits <eos> cannot stall a round on max_seconds of babble.
            max_new = int(min(max_frames, 2.5 * max(self.expected_frames(t) for t in batch_texts) + 10))
            if rule.walk:  # the walk through the units bounds the length itself
                max_new = max(len(fmt.units(t)) for t in batch_texts) * (rule.max_frames + 1) + 1
            if self.renderer is not None:  # and never beyond what the renderer renders beside the prompt: a policy
                # that dwells on every unit as long as the training data ever did (90 frames) would otherwise draw a
                # sample that no stage can render (seen: a learning rate x 10 stopped a run at 2132 frames)
                max_new = min(max_new, self.renderer_room)
            processor = RuleProcessor(rule)
            torch.manual_seed(seed + start)
            from transformers import LogitsProcessorList

            from models.kv_cache import GrowingCache

            # GrowingCache: models/kv_cache.py (the default cache's per-step concatenation was most of the time)
            out = lm.generate(**enc, cache=GrowingCache(), do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              top_k=top_k if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
                              max_new_tokens=max_new, num_return_sequences=n,
                              logits_processor=LogitsProcessorList([processor]),
                              eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:].cpu()
            for i in range(len(batch_texts)):
                samples = []
                for j in range(n):
                    ids = new[i * n + j]
                    ids = ids[ids != tok.pad_token_id]
                    stream = fmt.parse_codes(" ".join(tok.convert_ids_to_tokens(ids.tolist())))
                    samples.append(torch.where(stream >= 0, stream.clamp(max=K - 1), stream).long())
                results.append(samples)
        return results

    @torch.no_grad()
    def render(self, first: torch.Tensor, prompt: torch.Tensor) -> np.ndarray:
        """A stream of the policy's layout [T'] (RVQ-1 codes, with unit markers when interleaved) + full
        prompt codes [n_q, Tp] -> waveform float32 [n] (NAR, then codec).

        With a flow model (meta renderer "flow") the RVQ-1 codes and the prompt's latent go through the
        flow to a codec latent instead, decoded by ``codec.decode_latent``. With a phone renderer
        (meta renderer "phones") codes and units go to a codec latent that is quantised through the
        codec (``codec.quantize`` where it has one) and decoded.
        """
        first = torch.as_tensor(first).long()
        if self.renderer is not None:
            latent = self._rendered_latent(first, prompt)
            if latent is None:
                return np.zeros(0, dtype=np.float32)
            if self._quantises:
                return self.codec.decode(self.codec.quantize(latent))
            return self.codec.decode_latent(latent)
        first = self.format.frames(first)
        if first.numel() == 0:
            return np.zeros(0, dtype=np.float32)
        if self.flow is not None:
            return self.flow.render(self.codec, first, self.prompt_codes(prompt))
        if self.codec.n_q == 1:
            return self.codec.decode(first[None])
        if self.nar is None:
            raise ValueError(f"this policy has no NAR for levels 2..{self.codec.n_q}: rendering RVQ-1 alone would be "
                             "scored as if it were the policy's speech; load a policy directory with its nar/ folder")
        device = next(self.nar.parameters()).device
        codes = self.nar.generate(self.prompt_codes(prompt).to(device), first.to(device)).cpu()
        return self.codec.decode(codes)

    @property
    def _quantises(self) -> bool:
        return hasattr(self.codec, "quantize") and self.meta.get("render_latent", "quantised") == "quantised"

    def _rendered_latent(self, first: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor | None:
        """The phone renderer's codec latent [T, D] of a stream (None for a stream with no frames)."""
        from models.layout import split_stream

        codes, unit_ids, unit_pos = split_stream(first)
        if codes.numel() == 0:
            return None
        return self.renderer.generate(self.codec.latent(self.prompt_codes(prompt)), codes, unit_ids, unit_pos)

    @property
    def renders_logmel(self) -> bool:
        """Whether ``render_logmel`` can skip the vocoder: a phone renderer over a log-mel codec (mel_rvq)."""
        return self.renderer is not None and hasattr(self.codec, "features")

    @torch.no_grad()
    def render_logmel(self, first: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The log-mel [T, n_mels] that ``render`` gives to the vocoder (Griffin-Lim), without running it: for judges
        of the spectrogram (eval/defects.py), at the renderer's speed rather than the vocoder's. Only where
        ``renders_logmel``; an empty stream gives [0, n_mels]."""
        if not self.renders_logmel:
            raise ValueError("render_logmel needs a phone renderer over a log-mel codec; render() and read the audio")
        latent = self._rendered_latent(torch.as_tensor(first).long(), prompt)
        if latent is None:
            return torch.zeros(0, self.codec.latent_dim)
        return self.codec.dequantize(self.codec.quantize(latent)) if self._quantises else latent

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.lm.parameters())


def policy_meta(cfg: PolicyConfig, frames_per_char: float, max_frames_per_unit: int | None = None) -> dict:
    """frames_per_char: golden frames per text token (a character or a phone, with word separators);
    max_frames_per_unit: the interleaved layout's cap on one unit's frames (from the training data)."""
    meta = {"prompt_seconds": cfg.prompt_seconds, "max_seconds": cfg.max_seconds, "text_frontend": cfg.text_frontend,
            "frames_per_char": frames_per_char, "size": cfg.size, "policy_config": dataclasses.asdict(cfg)}
    if cfg.layout == "interleaved":
        if max_frames_per_unit is None:
            raise ValueError("the interleaved layout needs max_frames_per_unit")
        meta.update(format="interleaved", max_frames_per_unit=int(max_frames_per_unit))
    return meta


def conditioning(meta: dict, prompt_codes: torch.Tensor, text: str, frame_rate: float) -> str:
    """The prompt string a policy (its ``speechalign.json`` meta) speaks ``text`` from: the first
    ``meta["prompt_seconds"]`` of the voice prompt's RVQ-1 (full codes [n_q, Tp]) in the policy's layout, with
    its quality hint if it has one. The one builder: the sampler, the pair stage and every trainer use it.
    """
    n = prompt_frames(meta["prompt_seconds"], frame_rate)
    return with_hint(format_for(meta).prompt_str(torch.as_tensor(prompt_codes)[0, :n], text), meta.get("quality_hint"))


def read_meta(policy_dir: str | Path) -> dict:
    """A policy directory's ``speechalign.json`` (no weights loaded)."""
    return json.loads((Path(policy_dir) / "speechalign.json").read_text())


def policy_dir_problems(path: str | Path) -> list[str]:
    """Why ``Policy.load`` would refuse ``path`` (empty when it can load it), read off its files without loading any
    weights, so the dry run accepts exactly the policies a run accepts."""
    path = Path(path)
    if not (path / "speechalign.json").is_file():
        return ["speechalign.json missing (pass a round's policy/ folder, e.g. runs/<name>/round_001/policy)"]
    meta = json.loads((path / "speechalign.json").read_text())
    problems = []
    if meta.get("layout_version") != LAYOUT_VERSION:
        problems.append(f"sequence layout v{meta.get('layout_version')} != this code's v{LAYOUT_VERSION}")
    if not (path / "config.json").is_file():
        problems.append("config.json missing (the transformers LM)")
    if not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        problems.append("no LM weights (model.safetensors)")
    codec_meta = path / "codec" / "codec.json"
    if not codec_meta.is_file():
        return problems + ["codec/ missing (the codec the policy speaks)"]
    codec = json.loads(codec_meta.read_text())
    if meta.get("codec_identity") and codec.get("identity") and meta["codec_identity"] != codec["identity"]:
        problems.append(f"its codec/ is {codec['identity']} but it was trained with {meta['codec_identity']}")
    renderer = meta.get("renderer", "nar")
    folder = {"flow": "flow", "phones": "renderer"}.get(renderer)
    n_q = int(codec.get("config", {}).get("n_q", 1))
    if folder is not None and not (path / folder).is_dir():
        problems.append(f"{folder}/ missing (the policy renders through its {renderer} model)")
    elif folder is None and n_q > 1 and not (path / "nar").is_dir() and meta.get("unit_vocoder", "codec") == "codec":
        # (a HuBERT-unit SpeechGPT policy speaks through its unit vocoder, not the codec's levels)
        problems.append(f"the codec has {n_q} levels but there is no nar/ folder (nor a flow or phone renderer), so it "
                        "could only render RVQ-1 alone and every score would be of that; copy the round's whole "
                        "policy/ directory, or re-run its base stage")
    return problems

