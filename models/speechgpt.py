"""SpeechGPT (arXiv 2305.11000): a plain-text causal LM whose vocabulary also holds speech units.

Speech is written inline as discrete units between ``<sosp>`` and ``<eosp>``::

    <sosp><661><588><588><12><eosp>

and every example is a one-turn dialogue after a fixed system prompt::

    {SYSTEM_PROMPT}[Human]: {instruction} This is input: {input}<eoh> [SpeechGPT]: {response}<eoa>

    cross-modal TTS:   input = text,  response = <sosp>...<eosp>
    cross-modal ASR:   input = units, response = text
    chain-of-modality: response = {transcript of the question}; [ta] {text answer}; [ua] <sosp>...<eosp>
                       ("; [ua] ..." only when the answer is spoken)

This module holds what defines the model family: the token formats and templates, the instruction
phrasings, the tokenizer (a character tokenizer for models we build, or any local pretrained
tokenizer extended with the unit and format tokens), named sizes, the unit extractors (the embedded
codec's RVQ-1, or HuBERT features + a k-means we fit), pluggable unit-to-speech renderers, the
``speechgpt`` sequence format the alignment loop's ``Policy`` uses, and chat inference.
The three-stage training recipe is ``align/speechgpt.py``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

log = logging.getLogger("speechalign.speechgpt")

# ---------------------------------------------------------------------------------------------
# Token formats and templates (byte for byte: tests pin them)
# ---------------------------------------------------------------------------------------------
SOSP, EOSP = "<sosp>", "<eosp>"          # start / end of speech
EOH, EOA = "<eoh>", "<eoa>"              # end of the human turn / of the answer
EOS = "<eos>"                            # document separator (stage-1 packing)
HUMAN, SPEECHGPT = "[Human]", "[SpeechGPT]"
TA, UA = "[ta]", "[ua]"                  # chain of modality: text answer, unit answer
FORMAT_TOKENS = [SOSP, EOSP, EOH, EOA, EOS, HUMAN, SPEECHGPT, TA, UA]

# The published system prompt (SpeechGPT's META_INSTRUCTION). Loss is masked over it in stages 2-3.
SYSTEM_PROMPT = (
    "You are an AI assistant whose name is SpeechGPT.\n"
    "- SpeechGPT is a intrinsic cross-modal conversational language model that is developed by Fudan "
    "University.  SpeechGPT can understand and communicate fluently with human through speech or text "
    "chosen by the user.\n"
    "- It can perceive cross-modal inputs and generate cross-modal outputs.\n")

# Decoding defaults of the published inference script.
CHAT_TEMPERATURE, CHAT_TOP_P, CHAT_TOP_K = 0.7, 0.8, 50

_UNIT_RE = re.compile(r"<(\d+)>")


def unit_token(i: int) -> str:
    return f"<{i}>"


def units_str(units: Sequence[int] | torch.Tensor) -> str:
    """Units [T] -> ``"<sosp><661><588>...<eosp>"`` (no spaces)."""
    return SOSP + "".join(unit_token(int(u)) for u in units) + EOSP


def parse_units(s: str) -> torch.LongTensor:
    """The units of the first speech span in ``s`` (from ``<sosp>``, up to ``<eosp>`` if present).

    Returns LongTensor [T]; empty when ``s`` holds no ``<sosp>``.
    """
    if SOSP not in s:
        return torch.zeros(0, dtype=torch.long)
    span = s.split(SOSP, 1)[1].split(EOSP, 1)[0]
    return torch.tensor([int(m) for m in _UNIT_RE.findall(span)], dtype=torch.long)


def dedup_units(units: torch.Tensor) -> torch.LongTensor:
    """Remove consecutive duplicates ([T] -> [T'], T' <= T), as the published units are."""
    if units.numel() == 0:
        return units.long()
    keep = torch.ones_like(units, dtype=torch.bool)
    keep[1:] = units[1:] != units[:-1]
    return units[keep].long()


def human_turn(instruction: str, input_: str) -> str:
    """``[Human]: {instruction} This is input: {input}<eoh>``."""
    return f"{HUMAN}: {instruction} This is input: {input_}{EOH}"


def prompt_text(instruction: str, input_: str, system: str = SYSTEM_PROMPT) -> str:
    """Everything the model is given: system prompt + human turn + ``" [SpeechGPT]: "``."""
    return f"{system}{human_turn(instruction, input_)} {SPEECHGPT}: "


def example_text(instruction: str, input_: str, response: str, system: str = SYSTEM_PROMPT) -> str:
    """A whole training example: prompt + response + ``<eoa>``."""
    return prompt_text(instruction, input_, system) + response + EOA


def com_response(transcript: str, text_answer: str, answer_units: Sequence[int] | None = None) -> str:
    """Chain-of-modality response: ``{transcript}; [ta] {answer}`` [+ ``; [ua] <sosp>...<eosp>``]."""
    out = f"{transcript}; {TA} {text_answer}"
    if answer_units is not None:
        out += f"; {UA} {units_str(answer_units)}"
    return out


def parse_response(response: str) -> dict:
    """Split a generated answer (text after ``[SpeechGPT]: ``) into its parts.

    Returns {"answer": text up to <eoa>, "transcript", "text_answer", "units": LongTensor [T]}.
    ``transcript``/``text_answer`` are "" unless the answer has the chain-of-modality form.
    """
    answer = response.split(EOA, 1)[0]
    transcript = text_answer = ""
    if f"; {TA}" in answer:
        transcript, rest = answer.split(f"; {TA}", 1)
        text_answer = rest.split(f"; {UA}", 1)[0].strip()
        transcript = transcript.strip()
    units = parse_units(answer.split(UA, 1)[1] if UA in answer else answer)
    return {"answer": answer, "transcript": transcript, "text_answer": text_answer, "units": units}


# Instruction phrasings (ours). ASR: speech in, text out; TTS: text in, speech out.
# TTS_INSTRUCTIONS[0] is the example and the one the alignment loop asks with.
ASR_INSTRUCTIONS = [
    "Can you transcribe the speech into a written format?",
    "Listen to the speech and write down its content.",
    "What is the content of the speech you heard?",
    "Please write down the transcription of the speech.",
    "Please transcribe the following audio.",
    "Convert the speech to text, please.",
    "Write out what is said in this recording.",
    "Turn this spoken sentence into text.",
    "What words are spoken in this audio?",
    "Give me a written version of this speech.",
    "Could you tell me what the speaker says?",
    "Transcribe this utterance word for word.",
    "Recognize the speech and output the text.",
    "Please listen carefully and type out the sentence.",
    "Write the sentence you hear in plain text.",
    "What does the voice in this clip say?",
    "Put the spoken words of this recording into writing.",
    "Provide a transcript of the following speech.",
    "Decode this speech into a sentence.",
    "Tell me, in text, what this person said.",
    "Note down the spoken content exactly.",
    "Help me transcribe this piece of speech.",
]
TTS_INSTRUCTIONS = [
    "Try to speak out this sentence, please.",
    "Please read this sentence aloud.",
    "Can you say this sentence for me?",
    "Convert the text to speech, please.",
    "Read out the following text.",
    "Speak the following sentence.",
    "Turn this text into spoken words.",
    "Say this out loud, please.",
    "Please pronounce this sentence.",
    "Give me a spoken version of this text.",
    "Could you read this line aloud?",
    "Synthesize speech for this sentence.",
    "Let me hear you say this sentence.",
    "Please voice the following words.",
    "Read this sentence in your own voice.",
    "Produce speech that says the following.",
    "Speak this text clearly.",
    "Recite the following sentence.",
    "I would like to hear this sentence spoken.",
    "Transform this written sentence into speech.",
    "Vocalize the text below.",
    "Say the following words aloud.",
]
# Chain-of-modality instructions, one list per (question modality, answer modality).
COM_INSTRUCTIONS = {
    ("speech", "speech"): [
        "This is a speech instruction. Transcribe it, think of a text answer, then speak the answer aloud.",
        "Answer this spoken question in speech, step by step: transcript, text answer, spoken answer.",
        "Listen to the question, write it down, answer it in text and then say the answer.",
    ],
    ("speech", "text"): [
        "This is a speech instruction. Transcribe it and answer it in text.",
        "Answer this spoken question in writing, after transcribing it.",
        "Listen to the question, write it down and give a text answer.",
    ],
    ("text", "speech"): [
        "This is a text instruction. Repeat it, think of a text answer, then speak the answer aloud.",
        "Answer this written question in speech, step by step: question, text answer, spoken answer.",
        "Read the question, answer it in text and then say the answer.",
    ],
    ("text", "text"): [
        "This is a text instruction. Repeat it and answer it in text.",
        "Answer this written question in writing, after repeating it.",
        "Read the question, restate it and give a text answer.",
    ],
}
COM_DIRECTIONS = list(COM_INSTRUCTIONS)


# ---------------------------------------------------------------------------------------------
# Sizes and the tokenizer
# ---------------------------------------------------------------------------------------------
# Named Llama shapes. '7b' is LLaMA-7B, the size of the published training scripts.
SPEECHGPT_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
_CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def build_tokenizer(n_units: int):
    """A character-level ``PreTrainedTokenizerFast`` for models we build from scratch.

    Vocabulary: <pad> <unk>, the format tokens, printable ASCII + newline, ``<0>``..``<n_units-1>``.
    Every format token and unit is one token; every other character is one token, so the
    tokenization of ``prompt + completion`` is the tokenizations of both joined (what TRL's DPO needs).
    ``eos_token`` is ``<eoa>``: an answer ends there.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>"] + FORMAT_TOKENS + _CHARS +
                                        [unit_token(i) for i in range(n_units)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join(re.escape(t) for t in ["<pad>", "<unk>"] + FORMAT_TOKENS) + r"|<\d+>|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOA, pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens=[t for t in FORMAT_TOKENS if t != EOA],
                                   clean_up_tokenization_spaces=False)


def extend_tokenizer(tokenizer, n_units: int):
    """Add the unit and format tokens to a pretrained tokenizer (e.g. LLaMA's); returns it.

    ``eos_token`` becomes ``<eoa>`` and a pad token is set if missing. Resize the model's
    embeddings to ``len(tokenizer)`` afterwards (``load_base_lm`` does).
    """
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(unit_token(i), normalized=False) for i in range(n_units)])
    tokenizer.add_special_tokens({"eos_token": EOA, "additional_special_tokens":
                                  [t for t in FORMAT_TOKENS if t != EOA]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or EOS
    return tokenizer


def build_lm(size: str, vocab_size: int, max_positions: int, seed: int, pad_token_id: int = 0):
    """A fresh ``LlamaForCausalLM`` of a named size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SPEECHGPT_SIZES:
        raise ValueError(f"SpeechGPT size {size!r} unknown; choose one of {sorted(SPEECHGPT_SIZES)}")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, **SPEECHGPT_SIZES[size])
    return LlamaForCausalLM(config)


def load_base_lm(path: str, n_units: int, dtype: torch.dtype = torch.float32):
    """A pretrained causal LM + tokenizer from a LOCAL directory, extended with units and format tokens.

    Returns (model, tokenizer); the embeddings are resized (new rows initialised by transformers
    to the mean of the old ones).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"base_model={path!r} is not a local transformers model directory (config.json missing); "
                         "download the weights elsewhere (e.g. `huggingface-cli download <id> --local-dir DIR`) "
                         "and pass DIR: the training code never reaches the hub")
    tokenizer = extend_tokenizer(AutoTokenizer.from_pretrained(p), n_units)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Unit extractors: audio -> units
# ---------------------------------------------------------------------------------------------
class UnitExtractor(Protocol):
    """Audio -> discrete speech units."""

    n_units: int
    sample_rate: int
    frame_rate: float
    identity: str

    def units(self, wav: np.ndarray) -> torch.LongTensor:
        """wav: float32 mono [n_samples] at ``sample_rate`` -> units LongTensor [T] (not de-duplicated)."""

    def save(self, path: str | Path) -> None:
        """Write what ``load_extractor`` needs into folder ``path``."""


class CodecUnits:
    """The embedded default: the codec's first RVQ level as units (no HuBERT needed).

    Units keep one token per codec frame, so the policy's NAR + codec decoder turn them straight
    back into audio with the durations they were spoken with.
    """

    kind = "codec_rvq1"

    def __init__(self, codec):
        self.codec = codec
        self.n_units = codec.codebook_size
        self.sample_rate = codec.sample_rate
        self.frame_rate = codec.frame_rate
        self.identity = f"codec_rvq1-{codec.identity}"

    def units(self, wav: np.ndarray) -> torch.LongTensor:
        return self.codec.encode(wav)[0].long()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.codec.save(path / "codec")
        (path / "units.json").write_text(json.dumps({"kind": self.kind, "identity": self.identity}, indent=2))


class HubertKMeansUnits:
    """HuBERT features of one layer (transformers ``HubertModel``, local weights) + our k-means.

    centroids: FloatTensor [n_units, D]. The published units: mHuBERT layer 11, 1000 clusters, 16 kHz.
    """

    kind = "hubert_kmeans"

    def __init__(self, hubert_path: str, layer: int, centroids: torch.Tensor, model=None):
        self.hubert_path = str(hubert_path)
        self.model = model if model is not None else self.load_hubert(hubert_path)
        if not 0 <= layer <= self.model.config.num_hidden_layers:
            raise ValueError(f"hubert_layer={layer} out of range: the model has "
                             f"{self.model.config.num_hidden_layers} layers")
        self.layer = layer
        self.centroids = centroids.float()
        self.n_units = int(centroids.shape[0])
        self.sample_rate = 16000
        self.frame_rate = self.sample_rate / float(np.prod(self.model.config.conv_stride))
        import hashlib

        digest = hashlib.sha1(self.centroids.numpy().tobytes()).hexdigest()[:12]
        self.identity = f"hubert-l{layer}-k{self.n_units}-{digest}"

    @staticmethod
    def load_hubert(hubert_path: str):
        """``HubertModel`` from a local directory (never the hub)."""
        from transformers import HubertModel

        p = Path(hubert_path)
        if not (p / "config.json").is_file():
            raise ValueError(f"hubert_path={hubert_path!r} is not a local HuBERT directory (config.json missing); "
                             "download e.g. facebook/hubert-base-ls960 elsewhere and pass its local folder")
        return HubertModel.from_pretrained(p).eval()

    @staticmethod
    @torch.no_grad()
    def _features(model, layer: int, wav: np.ndarray) -> torch.Tensor:
        """wav [n] at 16 kHz -> FloatTensor [T, D] (hidden state ``layer``; 0 = the CNN output projection)."""
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None]
        out = model(input_values=x, output_hidden_states=True)
        return out.hidden_states[layer][0]

    def features(self, wav: np.ndarray) -> torch.Tensor:
        return self._features(self.model, self.layer, wav)

    @classmethod
    def fit(cls, hubert_path: str, layer: int, n_units: int, wavs: list[np.ndarray], *, max_frames: int = 100_000,
            seed: int = 0) -> "HubertKMeansUnits":
        """Fit a k-means of ``n_units`` clusters on layer-``layer`` features of ``wavs`` (16 kHz)."""
        from sklearn.cluster import MiniBatchKMeans

        model = cls.load_hubert(hubert_path)
        if not 0 <= layer <= model.config.num_hidden_layers:
            raise ValueError(f"hubert_layer={layer} out of range: the model has {model.config.num_hidden_layers} layers")
        feats = torch.cat([cls._features(model, layer, w) for w in wavs]).numpy()
        if len(feats) < n_units:
            raise ValueError(f"{len(feats)} HuBERT frames cannot fit {n_units} clusters; give more audio or "
                             "lower n_units")
        rng = np.random.default_rng(seed)
        if len(feats) > max_frames:
            feats = feats[rng.choice(len(feats), max_frames, replace=False)]
        km = MiniBatchKMeans(n_clusters=n_units, random_state=seed, n_init=3, batch_size=4096).fit(feats)
        return cls(hubert_path, layer, torch.from_numpy(km.cluster_centers_).float(), model=model)

    def units(self, wav: np.ndarray) -> torch.LongTensor:
        f = self.features(wav)
        return torch.cdist(f[None], self.centroids[None])[0].argmin(-1).long()

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": self.centroids.contiguous()}, str(path / "kmeans.safetensors"))
        (path / "units.json").write_text(json.dumps({
            "kind": self.kind, "hubert_path": self.hubert_path, "layer": self.layer, "n_units": self.n_units,
            "identity": self.identity}, indent=2))


def load_extractor(path: str | Path, codec=None) -> UnitExtractor:
    """Rebuild a saved extractor (``units.json`` in ``path``)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "units.json").read_text())
    if meta["kind"] == CodecUnits.kind:
        from models.codec import load_codec

        return CodecUnits(codec if codec is not None else load_codec(path / "codec"))
    if meta["kind"] == HubertKMeansUnits.kind:
        return HubertKMeansUnits(meta["hubert_path"], meta["layer"], load_file(str(path / "kmeans.safetensors"))["centroids"])
    raise ValueError(f"{path}: unknown unit extractor kind {meta['kind']!r}")


# ---------------------------------------------------------------------------------------------
# Unit-to-speech
# ---------------------------------------------------------------------------------------------
# name -> loader(policy) -> fn(units [T]) -> wav float32 [n]. A real unit vocoder (e.g. a unit
# HiFi-GAN for HuBERT units) registers here and is named in the policy's speechalign.json
# ("unit_vocoder"); "codec" renders codec RVQ-1 units through the policy's NAR + codec decoder.
UNIT_VOCODERS: dict[str, Callable] = {}


def _codec_vocoder(policy) -> Callable[[torch.Tensor], np.ndarray]:
    prompt = load_voice_prompt(policy)

    def render(units: torch.Tensor, voice_prompt: torch.Tensor | None = None) -> np.ndarray:
        return policy.render(units, voice_prompt if voice_prompt is not None else prompt)

    return render


UNIT_VOCODERS["codec"] = _codec_vocoder


def load_voice_prompt(policy) -> torch.Tensor:
    """The default voice prompt saved with a SpeechGPT policy: LongTensor [n_q, Tp] (NAR conditioning)."""
    prompt = policy.meta.get("speechgpt", {}).get("voice_prompt")
    if prompt is None:
        raise ValueError("this policy has no default voice prompt (speechalign.json speechgpt.voice_prompt); "
                         "pass a voice prompt explicitly")
    return torch.tensor(prompt, dtype=torch.long)


def unit_vocoder(policy) -> Callable:
    name = policy.meta.get("unit_vocoder", "codec")
    if name not in UNIT_VOCODERS:
        raise ValueError(f"unit vocoder {name!r} is not registered (known: {sorted(UNIT_VOCODERS)}); "
                         "import the module that registers it in models.speechgpt.UNIT_VOCODERS")
    return UNIT_VOCODERS[name](policy)


# ---------------------------------------------------------------------------------------------
# The sequence format the alignment loop uses (see models/codec_lm.py SequenceFormat)
# ---------------------------------------------------------------------------------------------
def tts_prompt(prompt_codes, text: str) -> str:
    """DPO's ``prompt``: the TTS instruction for ``text``. SpeechGPT has no voice prompt in the LM, so
    ``prompt_codes`` is unused here (the NAR uses it when rendering)."""
    return prompt_text(TTS_INSTRUCTIONS[0], " ".join(text.split()))


def tts_completion(codes) -> str:
    """DPO's ``chosen``/``rejected``: ``<sosp>...<eosp><eoa>``."""
    return units_str(codes) + EOA


def speechgpt_format():
    from models.layout import SequenceFormat

    return SequenceFormat(name="speechgpt", prompt_str=tts_prompt, completion_str=tts_completion,
                          parse_codes=parse_units, speech_tokens=lambda k: [SOSP] + [unit_token(i) for i in range(k)],
                          stop_tokens=[EOSP, EOA])


# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------
@dataclass
class ChatReply:
    """One answer: the raw response, its parts, and speech when it spoke."""

    prompt: str
    response: str
    transcript: str
    text_answer: str
    units: torch.LongTensor
    wav: np.ndarray | None
    sample_rate: int

    @property
    def text(self) -> str:
        """What to show: the text answer of a chain-of-modality reply, else the plain answer."""
        if self.text_answer:
            return self.text_answer
        return self.response.split(SOSP, 1)[0].strip()


@torch.no_grad()
def chat(policy, *, text: str | None = None, wav: np.ndarray | None = None, instruction: str | None = None,
         extractor: UnitExtractor | None = None,
         temperature: float = CHAT_TEMPERATURE, top_p: float = CHAT_TOP_P, top_k: int = CHAT_TOP_K,
         max_new_tokens: int = 512, seed: int = 0, speak: bool = True) -> ChatReply:
    """Answer one message. ``text``: the message (or the input, when ``instruction`` is given);
    ``wav``: a spoken input at the codec's rate, turned into units (``instruction`` defaults to the
    speech->speech chain-of-modality one). ``extractor`` turns ``wav`` into units (default: the policy
    codec's RVQ-1). Speech in the answer is rendered when ``speak``.
    """
    if (text is None) == (wav is None):
        raise ValueError("give exactly one of text= or wav=")
    if wav is not None:
        units = (extractor or CodecUnits(policy.codec)).units(wav)
        if policy.meta.get("speechgpt", {}).get("dedup"):
            units = dedup_units(units)
        human_input = units_str(units)
        instruction = instruction or COM_INSTRUCTIONS[("speech", "speech")][0]
    else:
        human_input = text.strip()
    if instruction:
        prompt = prompt_text(instruction, human_input)
    else:  # a free-form message: the human turn is the message itself
        prompt = f"{SYSTEM_PROMPT}{HUMAN}: {human_input}{EOH} {SPEECHGPT}: "
    tok, lm = policy.tokenizer, policy.lm.eval()
    device = next(lm.parameters()).device
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    torch.manual_seed(seed)
    from models.kv_cache import GrowingCache

    out = lm.generate(**enc, cache=GrowingCache(), do_sample=temperature > 0,
                      temperature=temperature if temperature > 0 else None,
                      top_p=top_p if temperature > 0 else None, top_k=top_k if temperature > 0 else None,
                      max_new_tokens=max_new_tokens, eos_token_id=tok.convert_tokens_to_ids(EOA),
                      pad_token_id=tok.pad_token_id)
    response = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    parts = parse_response(response)
    audio = None
    if speak and parts["units"].numel():
        audio = unit_vocoder(policy)(parts["units"].clamp(0, policy.codec.codebook_size - 1))
    return ChatReply(prompt=prompt, response=parts["answer"], transcript=parts["transcript"],
                     text_answer=parts["text_answer"], units=parts["units"], wav=audio,
                     sample_rate=policy.codec.sample_rate)
