"""Utterance manifests: load, detect, write, split, and pick voice prompts.

Everything downstream (sampling, pairing, evaluation) sees a corpus as a list of `Utterance`s with an
absolute audio path, a transcript and a speaker label. This module turns the formats we meet into
that list:

- our own manifests, JSONL (one object a line) or CSV (header row), with columns
  `id, audio, text, speaker` (+ optional `duration`; other columns are ignored);
- LibriSpeech, LibriTTS and VCTK (0.80 and 0.92) directory layouts.

Bad rows (no transcript, no speaker, audio file gone) are skipped and recorded as `Skip`s rather than
failing the whole load: a 100k-row corpus with three broken files should still train. Whatever makes
the manifest as a whole untrustworthy (unparsable line, missing column, duplicate ids, nothing
usable) raises `ValueError` naming the file and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from models.io import atomic_write_text
from models.text import normalize_text  # one normaliser: sentences match as WER sees them

log = logging.getLogger("speechalign.data")

REQUIRED_COLUMNS = ("id", "audio", "text", "speaker")


@dataclass(frozen=True)
class Utterance:
    """One recording with its transcript.

    id: unique within a corpus. audio: absolute path to the audio file. text: the transcript as
    given (not normalised). speaker: speaker label. duration: length in seconds, if known.
    prompt_audio / prompt_text: an evaluation manifest's chosen voice prompt (absolute path), if any.
    """

    id: str
    audio: str
    text: str
    speaker: str
    duration: float | None = None
    prompt_audio: str | None = None
    prompt_text: str | None = None


@dataclass(frozen=True)
class Skip:
    """A row that was left out of a corpus, and why (kept so the caller can report it)."""

    id: str
    reason: str


# ----------------------------------------------------------------------------------------------
# Manifests (JSONL / CSV)


def load_manifest(path: str | os.PathLike) -> tuple[list[Utterance], list[Skip]]:
    """Load a JSONL or CSV manifest.

    Relative audio paths resolve against the manifest's folder. The format follows the suffix
    (`.jsonl`/`.ndjson` vs `.csv`); any other suffix is sniffed from the first character.
    Returns (utterances, skips) in file order.
    Raises ValueError if the file is missing or unparsable, lacks a required column, repeats an
    id, or yields no usable row.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist; pass the path of a .jsonl or .csv manifest")
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet-exported CSVs start with a BOM
    if _is_jsonl(path, text):
        rows = _parse_jsonl(path, text)
    else:
        rows = _parse_csv(path, text)
    if not rows:
        raise ValueError(
            f"manifest {path} has no rows; add one row per recording with columns {', '.join(REQUIRED_COLUMNS)}"
        )
    seen_columns = set().union(*(row.keys() for _, row in rows))
    missing = [c for c in REQUIRED_COLUMNS if c not in seen_columns]
    if missing:
        raise ValueError(
            f"manifest {path} lacks column(s) {', '.join(missing)} (it has: {', '.join(sorted(seen_columns))}); "
            f"every row needs {', '.join(REQUIRED_COLUMNS)}"
        )

    base = path.parent
    utts: list[Utterance] = []
    skips: list[Skip] = []
    first_line: dict[str, int] = {}
    duplicates: list[str] = []
    for lineno, row in rows:
        uid = _cell(row.get("id"))
        if not uid:
            raise ValueError(f"{path}:{lineno}: row has no id; give every row a unique `id`")
        if uid in first_line:
            duplicates.append(f"{uid!r} (lines {first_line[uid]} and {lineno})")
            continue
        first_line[uid] = lineno
        item = _row_to_utterance(uid, row, base)
        (skips if isinstance(item, Skip) else utts).append(item)
    if duplicates:
        shown = "; ".join(duplicates[:5]) + (f"; and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise ValueError(f"manifest {path} repeats id(s): {shown}; ids must be unique, rename or drop the repeats")
    if not utts:
        raise ValueError(
            f"manifest {path} has no usable row ({_summarise_skips(skips)}); "
            "check the audio paths (relative ones resolve against the manifest's folder) and transcripts"
        )
    _log_skips(path, skips)
    return utts, skips


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance]) -> None:
    """Write utterances as a JSONL manifest, atomically (temp file + rename).

    Audio paths are stored relative to the manifest's folder so the folder can be moved as a whole;
    `duration` is written only when known.
    """
    path = Path(path).expanduser().absolute()
    base = path.parent
    lines = []
    for u in utterances:
        row = {"id": u.id, "audio": os.path.relpath(u.audio, base), "text": u.text, "speaker": u.speaker}
        if u.duration is not None:
            row["duration"] = round(float(u.duration), 4)
        if u.prompt_audio:
            row["prompt_audio"] = os.path.relpath(u.prompt_audio, base)
        if u.prompt_text:
            row["prompt_text"] = u.prompt_text
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return True
    if suffix in (".csv", ".tsv"):
        return False
    return text.lstrip().startswith("{")


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                "a JSONL manifest holds one JSON object per line"
            ) from e
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object like "
                f'{{"id": ..., "audio": ..., "text": ..., "speaker": ...}}, got {type(obj).__name__}'
            )
        rows.append((lineno, obj))
    return rows


def _parse_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if reader.fieldnames is None:
            return []
        header = [(h or "").strip() for h in reader.fieldnames]
        reader.fieldnames = header
        rows = []
        for row in reader:
            # A row with more cells than the header puts the surplus under the key None: ignore it.
            rows.append((reader.line_num, {k: v for k, v in row.items() if k}))
    except csv.Error as e:
        raise ValueError(
            f"{path}: not a valid CSV manifest ({e}); write a header row and quote cells that hold commas"
        ) from e
    return rows


def _cell(value) -> str:
    """A manifest cell as a stripped string; None (absent or a short CSV row) becomes ''."""
    if value is None:
        return ""
    return str(value).strip()


def _row_to_utterance(uid: str, row: dict, base: Path) -> Utterance | Skip:
    text = _cell(row.get("text"))
    if not text:
        return Skip(uid, "empty or missing text")
    speaker = _cell(row.get("speaker"))
    if not speaker:
        return Skip(uid, "empty or missing speaker")
    audio = _cell(row.get("audio"))
    if not audio:
        return Skip(uid, "empty or missing audio path")
    audio_abs = _abs_audio(audio, base)
    if not os.path.isfile(audio_abs):
        return Skip(uid, f"audio file not found: {audio_abs}")
    prompt_audio = _cell(row.get("prompt_audio")) or None
    if prompt_audio:
        prompt_audio = _abs_audio(prompt_audio, base)
        if not os.path.isfile(prompt_audio):
            return Skip(uid, f"prompt audio file not found: {prompt_audio}")
    duration = None
    raw = _cell(row.get("duration"))
    if raw:
        try:
            duration = float(raw)
        except ValueError:
            return Skip(uid, f"duration {raw!r} is not a number of seconds")
        if not duration > 0:
            return Skip(uid, f"duration {raw!r} is not positive")
    return Utterance(id=uid, audio=audio_abs, text=text, speaker=speaker, duration=duration,
                     prompt_audio=prompt_audio, prompt_text=_cell(row.get("prompt_text")) or None)


def _abs_audio(audio: str, base: Path) -> str:
    path = Path(audio).expanduser()
    if not path.is_absolute():
        path = base / path
    # abspath, not resolve(): normalise `..` without swapping a symlinked data folder for its target.
    return os.path.abspath(path)


def _summarise_skips(skips: list[Skip]) -> str:
    if not skips:
        return "no rows"
    # Reasons carry file paths; group on the part before the colon so the summary stays short.
    counts = Counter(s.reason.split(":")[0] for s in skips)
    return ", ".join(f"{n} x {reason}" for reason, n in counts.most_common())


def _log_skips(source, skips: list[Skip]) -> None:
    if skips:
        log.warning(
            "%s: skipped %d row(s): %s (first: %s: %s)",
            source, len(skips), _summarise_skips(skips), skips[0].id, skips[0].reason,
        )


# ----------------------------------------------------------------------------------------------
# Public corpus layouts

_AUDIO_SUFFIXES = (".wav", ".flac")


def load_librispeech(root: str | os.PathLike) -> tuple[list[Utterance], list[Skip]]:
    """Load a LibriSpeech tree: <root>/<spk>/<chapter>/<spk>-<chapter>.trans.txt beside <utt>.flac.

    `root` may be a split folder (train-clean-100) or a folder above several splits. Durations are
    left unknown (reading 280k headers is slow; `eval` measures what it needs).
    """
    root = _existing_dir(root, "LibriSpeech")
    utts: list[Utterance] = []
    skips: list[Skip] = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            text = text.strip()
            if not text:
                skips.append(Skip(uid, f"empty transcript in {trans}:{lineno}"))
                continue
            audio = _find_audio(trans.parent, uid)
            if audio is None:
                skips.append(Skip(uid, f"audio file not found: {trans.parent / (uid + '.flac')}"))
                continue
            utts.append(Utterance(uid, str(audio), text, speaker=uid.split("-")[0]))
    return _finish_layout(root, "LibriSpeech", "<spk>/<chapter>/<spk>-<chapter>.trans.txt", utts, skips)


def load_libritts(root: str | os.PathLike) -> tuple[list[Utterance], list[Skip]]:
    """Load a LibriTTS tree: <root>/<spk>/<chapter>/<utt>.wav + <utt>.normalized.txt.

    Falls back to <utt>.original.txt where the normalized transcript is missing (the normalized one
    spells out numbers and abbreviations, which is what an ASR judge will output).
    """
    root = _existing_dir(root, "LibriTTS")
    stems: dict[Path, None] = {}  # ordered set of <folder>/<utt>
    for pattern in ("*.wav", "*.normalized.txt", "*.original.txt"):
        for p in root.rglob(pattern):
            stems[p.parent / p.name.split(".")[0]] = None
    utts: list[Utterance] = []
    skips: list[Skip] = []
    for stem in sorted(stems):
        uid = stem.name
        audio = stem.with_name(uid + ".wav")
        txt = next((t for t in (stem.with_name(uid + ".normalized.txt"), stem.with_name(uid + ".original.txt"))
                    if t.is_file()), None)
        if txt is None:
            skips.append(Skip(uid, f"no transcript ({uid}.normalized.txt or .original.txt) beside {audio}"))
            continue
        text = " ".join(txt.read_text(encoding="utf-8").split())
        if not text:
            skips.append(Skip(uid, f"empty transcript in {txt}"))
            continue
        if not audio.is_file():
            skips.append(Skip(uid, f"audio file not found: {audio}"))
            continue
        # LibriTTS ids are <spk>_<chapter>_<para>_<sent>; the speaker is also the grandparent folder.
        utts.append(Utterance(uid, str(audio), text, speaker=uid.split("_")[0]))
    return _finish_layout(root, "LibriTTS", "<spk>/<chapter>/<utt>.wav + <utt>.normalized.txt", utts, skips)


def load_vctk(root: str | os.PathLike) -> tuple[list[Utterance], list[Skip]]:
    """Load VCTK: <root>/txt/<spk>/<utt>.txt with audio under <root>/wav48*/<spk>/.

    Handles 0.80 (wav48/<spk>/<utt>.wav) and 0.92 (wav48_silence_trimmed/<spk>/<utt>_mic1.flac, with
    a second microphone as _mic2). We take mic1 and fall back to mic2: one recording per sentence
    per speaker, or the same sentence would appear twice under one speaker.
    """
    root = _existing_dir(root, "VCTK")
    txt_root = root / "txt"
    wav_roots = sorted(p for p in root.glob("wav48*") if p.is_dir())
    if not txt_root.is_dir() or not wav_roots:
        raise ValueError(
            f"{root} is not a VCTK folder: expected txt/<spk>/<utt>.txt and wav48*/<spk>/<utt>.(wav|flac); "
            "pass the folder that holds txt/ and wav48*/"
        )
    audio_index: dict[str, Path] = {}
    for wav_root in wav_roots:
        for p in sorted(wav_root.glob("*/*")):
            if p.suffix.lower() not in _AUDIO_SUFFIXES:
                continue
            stem = p.stem
            rank = 0
            for i, mic in enumerate(("_mic1", "_mic2"), start=1):
                if stem.endswith(mic):
                    stem, rank = stem[: -len(mic)], i
            key = f"{p.parent.name}/{stem}"
            # Lower rank wins: a plain file (0.80) or mic1 over mic2.
            if key not in audio_index or rank < _mic_rank(audio_index[key]):
                audio_index[key] = p
    utts: list[Utterance] = []
    skips: list[Skip] = []
    seen: set[str] = set()
    for txt in sorted(txt_root.glob("*/*.txt")):
        spk, uid = txt.parent.name, txt.stem
        key = f"{spk}/{uid}"
        seen.add(key)
        text = " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
        if not text:
            skips.append(Skip(uid, f"empty transcript in {txt}"))
            continue
        audio = audio_index.get(key)
        if audio is None:
            skips.append(Skip(uid, f"audio file not found for {key} under {', '.join(p.name for p in wav_roots)}"))
            continue
        utts.append(Utterance(uid, str(audio.absolute()), text, speaker=spk))
    for key in sorted(set(audio_index) - seen):
        # VCTK 0.92 ships p315's audio without transcripts; record rather than silently drop.
        skips.append(Skip(key.split("/")[1], f"no transcript txt/{key}.txt for {audio_index[key]}"))
    return _finish_layout(root, "VCTK", "txt/<spk>/<utt>.txt + wav48*/<spk>/<utt>.(wav|flac)", utts, skips)


def _mic_rank(p: Path) -> int:
    return 1 if p.stem.endswith("_mic1") else 2 if p.stem.endswith("_mic2") else 0


def _find_audio(folder: Path, uid: str) -> Path | None:
    for suffix in (".flac", ".wav"):
        p = folder / (uid + suffix)
        if p.is_file():
            return p.absolute()
    return None


def _existing_dir(root, layout: str) -> Path:
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise ValueError(f"{layout} root {root} is not a folder; pass the folder that holds the {layout} files")
    return root


def _finish_layout(root: Path, layout: str, expected: str, utts, skips):
    if not utts:
        raise ValueError(
            f"no usable {layout} utterance under {root} ({_summarise_skips(skips)}); expected {expected}"
        )
    ids = Counter(u.id for u in utts)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ValueError(
            f"{layout} folder {root} holds id(s) {', '.join(dup[:5])} more than once "
            "(two splits copied into one tree?); point at one copy"
        )
    _log_skips(f"{layout} {root}", skips)
    return utts, skips


def load_any(path: str | os.PathLike) -> tuple[list[Utterance], list[Skip]]:
    """Load a manifest file, or a folder whose layout is detected.

    A folder is tried as: a folder with manifest.jsonl / manifest.csv; VCTK (txt/ + wav48*/);
    LibriSpeech (*.trans.txt); LibriTTS (*.normalized.txt / *.original.txt).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return load_manifest(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist; pass a .jsonl/.csv manifest or a corpus folder")
    for name in ("manifest.jsonl", "manifest.csv"):
        if (path / name).is_file():
            return load_manifest(path / name)
    if (path / "txt").is_dir() and any(p.is_dir() for p in path.glob("wav48*")):
        return load_vctk(path)
    # next() stops at the first hit, so detection costs one match, not a walk of the whole tree.
    if next(path.rglob("*.trans.txt"), None) is not None:
        return load_librispeech(path)
    if next(path.rglob("*.normalized.txt"), None) is not None or next(path.rglob("*.original.txt"), None) is not None:
        return load_libritts(path)
    raise ValueError(
        f"cannot tell what corpus {path} holds: expected manifest.jsonl/manifest.csv, a VCTK folder "
        "(txt/ + wav48*/), a LibriSpeech tree (*.trans.txt) or a LibriTTS tree (*.normalized.txt); "
        "pass a manifest file instead"
    )


# ----------------------------------------------------------------------------------------------
# Prompts and splits


def batch_slices(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """The (start, stop) slices of ``n`` items cut into batches of ``batch_size``, batch b dealt to rank
    b mod ``world``; this ``rank``'s share. Fixed cuts (not a split of the share) keep every batch, and so
    its seed, the same whatever the number of processes."""
    starts = range(0, n, max(1, batch_size))
    return [(s, min(s + batch_size, n)) for b, s in enumerate(starts) if b % world == rank]


def _stable_hash(*parts) -> int:
    # hashlib, not hash(): Python salts str hashes per process, and choices must survive restarts.
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def audio_seconds(utt: Utterance) -> float:
    """An utterance's length in seconds: its `duration` if known, else read from the file header."""
    if utt.duration is not None:
        return float(utt.duration)
    import soundfile

    try:
        return float(soundfile.info(utt.audio).duration)
    except RuntimeError as e:
        raise ValueError(f"cannot read the length of {utt.audio} ({e}); check the file or drop the row") from e


def choose_prompt(utt: Utterance, pool: list[Utterance], seed: int, min_seconds: float = 0.0) -> Utterance:
    """Pick the voice prompt for `utt`: another utterance of the same speaker.

    The candidate must differ in id, audio file and (normalised) sentence: a prompt that is the
    target itself, or the same sentence read again, leaks the answer into the condition.
    The pick is the candidate with the smallest hash of (seed, utt.id, candidate.id), so it is
    deterministic, independent of pool order, and mostly stable when the pool grows.
    With `min_seconds` > 0 (zero-shot evaluation: a 3 s prompt is the usual protocol) only candidates
    at least that long are considered; if the speaker has none, the longest candidate is taken.
    Raises ValueError if the speaker has no such other utterance.
    """
    target_text = normalize_text(utt.text)
    candidates = [
        u for u in pool
        if u.speaker == utt.speaker and u.id != utt.id and u.audio != utt.audio
        and normalize_text(u.text) != target_text
    ]
    if not candidates:
        same = sum(u.speaker == utt.speaker for u in pool)
        raise ValueError(
            f"no voice prompt for {utt.id!r}: speaker {utt.speaker!r} has no other utterance with a different "
            f"sentence in the pool ({same} of its utterances there, counting {utt.id!r} itself); a prompt must "
            "not be the target or its sentence, or it leaks the target. Give each speaker at least two "
            "different sentences, or drop this speaker"
        )
    if min_seconds > 0:
        seconds = {u.id: audio_seconds(u) for u in candidates}
        long_enough = [u for u in candidates if seconds[u.id] >= min_seconds]
        if not long_enough:
            return max(candidates, key=lambda u: (seconds[u.id], u.id))
        candidates = long_enough
    return min(candidates, key=lambda u: (_stable_hash(seed, utt.id, u.id), u.id))


def split_by_text(
    utts: list[Utterance], n_dev_texts: int, n_test_texts: int, seed: int
) -> dict[str, list[Utterance]]:
    """Split by sentence so that dev and test sentences never occur in train.

    Distinct normalised sentences are shuffled with `seed` (after sorting, so the input order does
    not matter); the first `n_test_texts` go to test, the next `n_dev_texts` to dev, the rest to
    train. Every utterance of a sentence follows it. Returns {"train", "dev", "test"}, each in input
    order.
    """
    for name, n in (("n_dev_texts", n_dev_texts), ("n_test_texts", n_test_texts)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}={n!r} must be a non-negative int")
    texts = sorted({normalize_text(u.text) for u in utts})
    if n_dev_texts + n_test_texts >= len(texts):
        raise ValueError(
            f"n_dev_texts + n_test_texts = {n_dev_texts + n_test_texts} leaves no training sentence: the corpus "
            f"has {len(texts)} distinct sentences; lower the dev/test counts below that"
        )
    random.Random(seed).shuffle(texts)
    which = {t: "test" for t in texts[:n_test_texts]}
    which.update({t: "dev" for t in texts[n_test_texts : n_test_texts + n_dev_texts]})
    out: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    for u in utts:
        out[which.get(normalize_text(u.text), "train")].append(u)
    return out
