"""The vocabulary and the sequence layout of the codec LM: what a policy's strings look like.

    <bos> <prompt> <a12> <a7> ... <text> t h e | c a t <speech> <a3> <a3> ... <eos>

``build_tokenizer`` makes the word-level tokenizer over specials, text characters, phones and codec
tokens; ``prompt_str``/``completion_str`` write DPO's prompt and completion strings; a
``SequenceFormat`` bundles one layout (SpeechGPT's lives in models/speechgpt.py) and a policy
directory names its format in ``speechalign.json``. Pure string and tokenizer code: the reward
model, the policy and the trainers all read sequences through here.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<prompt>", "<text>", "<speech>"]
TEXT_CHARS = list("abcdefghijklmnopqrstuvwxyz'") + ["|"]  # '|' marks a word boundary
# ARPAbet phones (no stress), as in the CMU dictionary that the pocketsphinx package ships.
PHONES = ["AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY",
          "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y",
          "Z", "ZH"]
TEXT_FRONTENDS = ("chars", "phones")
LAYOUT_VERSION = 1


def codec_token(i: int) -> str:
    return f"<a{i}>"


_CODE_RE = re.compile(r"<a(\d+)>")


# ---------------------------------------------------------------------------------------------
# Vocabulary and sequence layout
# ---------------------------------------------------------------------------------------------
def build_tokenizer(codebook_size: int):
    """A word-level ``PreTrainedTokenizerFast``: specials, characters, phones, ``<a0>``..``<a{K-1}>``.

    Pre-tokenisation splits on whitespace and then isolates every ``<...>`` token, every run of
    capitals (a phone) and every other character, so ``"<speech><a1>"`` and ``"c a t"`` tokenize
    the same with or without spaces.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TEXT_CHARS + PHONES +
                                             [codec_token(i) for i in range(codebook_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<[^<>\s]+>|[A-Z]+|[^<]"), behavior="isolated"),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<prompt>", "<text>", "<speech>"], padding_side="left")


def text_to_tokens(text: str, frontend: str = "chars") -> str:
    """Normalised text as space-separated tokens, ``|`` between words.

    chars: ``"h i | t h e r e"``; phones: ``"HH AY | DH EH R"`` (letters for words the dictionary lacks).
    """
    from models.text import normalize_text

    words = ["".join(ch for ch in w if ch in TEXT_CHARS) for w in normalize_text(text).split()]
    words = [w for w in words if w]
    if not words:
        raise ValueError(f"text {text!r} has no speakable characters (a-z and ')")
    if frontend == "phones":
        lexicon = _cmudict()
        return " | ".join(" ".join(lexicon.get(w) or w) for w in words)
    if frontend != "chars":
        raise ValueError(f"text frontend {frontend!r} unknown; choose one of {TEXT_FRONTENDS}")
    return " | ".join(" ".join(w) for w in words)


@functools.lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[str]]:
    """word -> ARPAbet phones (first pronunciation), from the dictionary inside the pocketsphinx package."""
    import pocketsphinx

    path = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    lexicon: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        word, *phones = line.split()
        if "(" not in word:  # "read(2)" and the like are alternative pronunciations
            lexicon[word] = [p.rstrip("012") for p in phones]
    return lexicon


def text_length(text: str, frontend: str = "chars") -> int:
    """Number of text tokens of ``text`` (what frames-per-token length estimates are relative to)."""
    return len(text_to_tokens(text, frontend).split())


def codes_to_str(codes) -> str:
    """RVQ-1 codes: LongTensor/array [T] -> ``"<a3> <a17> ..."``."""
    return " ".join(codec_token(int(c)) for c in codes)


def prompt_str(prompt_codes, text: str, frontend: str = "chars") -> str:
    """The conditioning part of a sequence, ending with ``<speech>`` (DPO's ``prompt`` column)."""
    return f"<bos> <prompt> {codes_to_str(prompt_codes)} <text> {text_to_tokens(text, frontend)} <speech>"


def with_hint(prompt: str, hint: str | None) -> str:
    """Chain-of-Hindsight: put a quality hint token (``<good>``/``<bad>``) just before ``<speech>``."""
    if not hint:
        return prompt
    if not prompt.endswith("<speech>"):
        raise ValueError(f"a hint goes before the final <speech> token; got a prompt ending {prompt[-20:]!r}")
    return f"{prompt[: -len('<speech>')]}{hint} <speech>"


def completion_str(codes) -> str:
    """The speech part (DPO's ``chosen``/``rejected``): leading space, codes, ``<eos>``."""
    return f" {codes_to_str(codes)} <eos>"


def parse_codes(s: str) -> torch.LongTensor:
    """Inverse of ``codes_to_str`` (spaces between tokens or not); stops at ``<eos>``. Returns LongTensor [T]."""
    s = s.split("<eos>")[0]
    return torch.tensor([int(m) for m in _CODE_RE.findall(s)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Sequence formats: how a policy writes (text, voice prompt) -> speech as one token string.
# A policy directory names its format in speechalign.json ("format"; absent = "codec_lm");
# Policy.generate and the pair stage go through it, so any plain-text LM layout can be aligned.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceFormat:
    """One sequence layout: DPO's prompt/completion strings and how generated speech is read back.

    A layout's *stream* is the speech part as integers: codec codes (>= 0), and in the interleaved
    layout also text-unit markers (< 0, ``unit_marker``). Samples, pairs and evaluation rows store
    streams; ``frames`` takes the codes out of one.
    """

    name: str
    prompt_str: Callable[..., str]        # (prompt_codes [Tp], text) -> prompt
    completion_str: Callable[..., str]    # (stream [T']) -> completion (DPO chosen/rejected)
    parse_codes: Callable[[str], torch.LongTensor]  # generated token string -> stream [T']
    speech_tokens: Callable[[int], list[str]]       # codebook_size -> tokens generation may emit
    stop_tokens: list[str]                          # tokens that end generation
    units: Callable[[str], list[str]] | None = None  # interleaved: text -> the units its stream walks through
    frames: Callable[[torch.Tensor], torch.Tensor] = lambda stream: stream  # stream [T'] -> codes [T]


CODEC_LM_FORMAT = SequenceFormat(name="codec_lm", prompt_str=prompt_str, completion_str=completion_str,
                                 parse_codes=parse_codes,
                                 speech_tokens=lambda k: [codec_token(i) for i in range(k)], stop_tokens=["<eos>"])
# name -> "module:factory" (imported lazily: a format's module may import this one)
SEQUENCE_FORMATS = {"codec_lm": "models.layout:_codec_lm_format", "interleaved": "models.layout:_interleaved_format",
                    "speechgpt": "models.speechgpt:speechgpt_format"}


def _codec_lm_format() -> SequenceFormat:
    return CODEC_LM_FORMAT


def get_format(name: str) -> SequenceFormat:
    import importlib

    if name not in SEQUENCE_FORMATS:
        raise ValueError(f"sequence format {name!r} unknown; known: {sorted(SEQUENCE_FORMATS)}")
    module, factory = SEQUENCE_FORMATS[name].split(":")
    return getattr(importlib.import_module(module), factory)()


def format_for(meta: dict) -> SequenceFormat:
    """The sequence format a policy's meta declares (``format``, default codec_lm), with its text frontend."""
    fmt = get_format(meta.get("format", "codec_lm"))
    frontend = meta.get("text_frontend", "chars")
    if fmt.name in ("codec_lm", "interleaved") and frontend != "chars":
        fmt = dataclasses.replace(fmt, prompt_str=functools.partial(prompt_str, frontend=frontend))
    if fmt.name == "interleaved":
        fmt = dataclasses.replace(fmt, units=functools.partial(text_units, frontend=frontend))
    return fmt


# ---------------------------------------------------------------------------------------------
# The interleaved layout (after ELLA-V, arXiv 2401.07333): each text unit is written just before
# its frames, so the policy reads its place in the text off its own output and cannot skip or
# repeat words; at generation the next unit is the only other token allowed after a unit's first
# frame (models/codec_lm.py), and a cap on frames per unit stops a runaway.
#
#     <bos> <prompt> <a12> ... <text> HH AY | DH EH R <speech> HH <a3> <a3> AY <a7> ... R <a9> <eos>
# ---------------------------------------------------------------------------------------------
TEXT_UNITS = TEXT_CHARS[:-1] + PHONES  # what a unit can be: a phone, or a letter of an out-of-dictionary word
_UNIT_INDEX = {u: i for i, u in enumerate(TEXT_UNITS)}


def text_units(text: str, frontend: str = "chars") -> list[str]:
    """The units of ``text`` in order, without word separators: ``["HH", "AY", "DH", "EH", "R"]``."""
    return [t for t in text_to_tokens(text, frontend).split() if t != "|"]


def unit_marker(unit: str) -> int:
    """A unit's stream value (< 0, so it can never be mistaken for a codec code)."""
    return -1 - _UNIT_INDEX[unit]


def interleave(codes, frame_unit, units: list[str]) -> torch.LongTensor:
    """RVQ-1 codes [T] + each frame's index into ``units`` [T] (non-decreasing, every unit >= 1 frame)
    -> stream [T + len(units)]: each unit's marker, then its frames."""
    codes = torch.as_tensor(codes).long()
    frame_unit = torch.as_tensor(np.asarray(frame_unit)).long()
    if codes.shape != frame_unit.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and frame units {tuple(frame_unit.shape)} differ in length")
    counts = torch.bincount(frame_unit, minlength=len(units))
    if len(counts) != len(units) or bool((counts == 0).any()) or bool((frame_unit.diff() < 0).any()):
        raise ValueError("frame units must walk through every unit in order, at least one frame each")
    out, start = [], 0
    for u, n in zip(units, counts.tolist()):
        out.append(unit_marker(u))
        out.extend(codes[start: start + n].tolist())
        start += n
    return torch.tensor(out, dtype=torch.long)


def split_stream(stream) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """stream [T'] -> (codes [T], unit id per frame [T] (index into TEXT_UNITS), unit position per frame [T]).

    Frames before any marker (not produced by the interleaved layout) get unit id and position 0.
    """
    stream = torch.as_tensor(stream).long()
    is_unit = stream < 0
    position = (torch.cumsum(is_unit.long(), 0) - 1).clamp_min(0)
    unit_id = torch.where(is_unit, -1 - stream, torch.zeros_like(stream))
    # the id of the latest marker at or before each position: markers' ids carried forward
    idx = torch.where(is_unit, torch.arange(len(stream)), torch.zeros_like(stream))
    last = torch.cummax(idx, 0).values
    frame_ids = unit_id[last]
    keep = ~is_unit
    return stream[keep], frame_ids[keep], position[keep]


def interleaved_completion_str(stream) -> str:
    """Stream [T'] -> ``" HH <a3> <a3> AY <a7> <eos>"``."""
    return " " + " ".join(TEXT_UNITS[-1 - int(v)] if v < 0 else codec_token(int(v)) for v in stream) + " <eos>"


def parse_interleaved(s: str) -> torch.LongTensor:
    """Inverse of ``interleaved_completion_str`` (tokens separated by spaces); stops at ``<eos>``."""
    out = []
    for t in s.split("<eos>")[0].split():
        m = _CODE_RE.fullmatch(t)
        if m:
            out.append(int(m.group(1)))
        elif t in _UNIT_INDEX:
            out.append(unit_marker(t))
    return torch.tensor(out, dtype=torch.long)


def _interleaved_format() -> SequenceFormat:
    return SequenceFormat(name="interleaved", prompt_str=prompt_str, completion_str=interleaved_completion_str,
                          parse_codes=parse_interleaved, speech_tokens=lambda k: [codec_token(i) for i in range(k)],
                          stop_tokens=["<eos>"], units=text_units, frames=lambda stream: split_stream(stream)[0])


def format_of(policy_dir: str | Path) -> SequenceFormat:
    """The sequence format a policy directory declares in its speechalign.json."""
    return format_for(json.loads((Path(policy_dir) / "speechalign.json").read_text()))


# ---------------------------------------------------------------------------------------------
# Distances between code sequences (pair filters, listening pairs)
# ---------------------------------------------------------------------------------------------
def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two code sequences (O(len(a) * len(b)), numpy rows)."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    b_arr = np.asarray(b)
    prev = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
        cur = np.empty_like(prev)
        cur[0] = i
        sub = prev[:-1] + (b_arr != x)
        cur[1:] = np.minimum(sub, prev[1:] + 1)
        # insertions run left to right: a cumulative min over (cur[j-1] + 1)
        cur = np.minimum.accumulate(cur - np.arange(len(cur))) + np.arange(len(cur))
        prev = cur
    return int(prev[-1])


def token_distance(a: list[int], b: list[int]) -> float:
    """Edit distance normalised by the longer sequence: 0 = identical, 1 = nothing shared."""
    return edit_distance(a, b) / max(len(a), len(b), 1)
