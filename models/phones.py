"""Phone alignments: which text unit each codec frame of an utterance belongs to.

The interleaved sequence layout (models/layout.py) writes each text unit (an ARPAbet phone, or a
letter for a word the dictionary lacks) just before its frames, and the phone-conditioned renderer
(models/renderer.py) reads the unit of every frame. Both need, for golden speech, the frames of
each unit: a phone alignment.

An alignment is a list of ``(phone, start_s, end_s)`` segments in the audio file's own time, kept
beside the audio as ``<audio stem>.align.json``. The embedded corpus writes them from flite's own
phone durations (``flite -psdur`` prints ``phone:end_seconds``; flite made the audio, so they are
exact labels). ``frame_units`` transfers a segment list onto the unit sequence the policy reads
for the text (the CMU dictionary's phones, which differ from flite's in a few reduced vowels:
"to" is ``t ax`` in flite, ``T UW`` in the dictionary).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np

# flite's US phone set -> the CMU dictionary's (ARPAbet without stress); the rest only change case.
_FLITE_TO_ARPABET = {"ax": "AH", "axr": "ER"}
SILENCE = ("pau", "sil", "sp", "SIL", "<sil>")


def parse_psdur(stdout: str) -> list[tuple[str, float]]:
    """``flite -psdur`` output (``pau:0.184 dh:0.236 ...``) -> [(phone, end seconds)]."""
    out = []
    for seg in stdout.split():
        phone, _, end = seg.rpartition(":")
        if not phone:
            raise ValueError(f"unexpected flite -psdur segment {seg!r}")
        out.append((phone, float(end)))
    return out


def segments_from_ends(ends: list[tuple[str, float]], *, scale: float = 1.0, offset: float = 0.0
                       ) -> list[tuple[str, float, float]]:
    """[(phone, end)] -> [(phone, start, end)] with times ``t * scale - offset``.

    ``scale`` maps flite's clock onto the WAV it wrote (its last end is a little off the file's
    length: about 0.999 for slt, awb, rms, 0.948 for kal16); ``offset`` is the start of the kept
    audio after silence trimming.
    """
    segs, start = [], 0.0
    for phone, end in ends:
        segs.append((phone, start * scale - offset, end * scale - offset))
        start = end
    return segs


def alignment_path(audio: str | Path) -> Path:
    """Where the alignment of an audio file is kept: ``<stem>.align.json`` beside it."""
    audio = Path(audio)
    return audio.with_name(audio.stem + ".align.json")


def write_alignment(audio: str | Path, segments: list[tuple[str, float, float]], source: str) -> None:
    from models.io import atomic_write_text

    rows = [[p, round(s, 5), round(e, 5)] for p, s, e in segments]
    atomic_write_text(alignment_path(audio), json.dumps({"source": source, "segments": rows}) + "\n")


def read_alignment(audio: str | Path) -> list[tuple[str, float, float]] | None:
    """The alignment kept beside ``audio``, or None when there is none."""
    path = alignment_path(audio)
    if not path.is_file():
        return None
    return [(p, float(s), float(e)) for p, s, e in json.loads(path.read_text())["segments"]]


def _normal(phone: str) -> str:
    return _FLITE_TO_ARPABET.get(phone, phone.upper())


def frame_units(segments: list[tuple[str, float, float]], units: list[str], n_frames: int,
                frame_rate: float) -> np.ndarray:
    """The index into ``units`` of every frame: int64 [n_frames], non-decreasing, every unit >= 1 frame.

    segments: the audio's phone segments (silences included); units: the policy's text units for
    the transcript (phones or letters, no word separators). Frame t is centred at t / frame_rate
    seconds. Silence frames join the unit before them (the first unit for leading silence). The
    segment phones are matched to the units by sequence alignment; where they differ only in
    substitutions (the common case) each unit takes its segment's frames; elsewhere the frames of a
    stretch are shared out by unit count. Raises ValueError when there are fewer frames than units.
    """
    P = len(units)
    if P == 0:
        raise ValueError("no text units to align")
    if n_frames < P:
        raise ValueError(f"{n_frames} frames cannot hold {P} text units")
    speech = [(p, s, e) for p, s, e in segments if p not in SILENCE]
    if not speech:
        raise ValueError("the alignment has no speech segments")
    # Frame -> speech segment: the last segment starting at or before the frame centre.
    centres = np.arange(n_frames) / frame_rate
    starts = np.array([s for _, s, _ in speech])
    seg_of_frame = np.clip(np.searchsorted(starts, centres, side="right") - 1, 0, len(speech) - 1)
    # Segment -> unit index (float, for shared-out stretches).
    seg_unit = np.zeros(len(speech))
    ops = difflib.SequenceMatcher(None, [_normal(p) for p, _, _ in speech], [u.upper() for u in units],
                                  autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if i2 == i1:  # units with no segment of their own: the boundary repair below gives them frames
            continue
        if i2 - i1 == j2 - j1:
            seg_unit[i1:i2] = np.arange(j1, j2)
        else:
            seg_unit[i1:i2] = j1 + (np.arange(i2 - i1) + 0.5) * (max(j2 - j1, 1) / (i2 - i1)) - 0.5
    unit = np.clip(np.round(seg_unit[seg_of_frame]).astype(np.int64), 0, P - 1)
    unit = np.maximum.accumulate(unit)
    # Boundaries b[j] = first frame of unit j, strictly increasing from b[0] = 0, b[P] = n_frames.
    b = np.searchsorted(unit, np.arange(P), side="left").astype(np.int64)
    b[0] = 0
    for j in range(1, P):  # every unit at least one frame, keeping room for the ones after it
        b[j] = min(max(b[j], b[j - 1] + 1), n_frames - (P - j))
    return np.repeat(np.arange(P), np.diff(np.append(b, n_frames)))


# ---------------------------------------------------------------------------------------------
# Alignments of other recordings: pocketsphinx's forced alignment (offline, the English model it ships)
# ---------------------------------------------------------------------------------------------
def pocketsphinx_segments(wav, text: str, sample_rate: int = 16000) -> list[tuple[str, float, float]]:
    """Phone segments of ``text`` in ``wav`` (float [n] at 16 kHz) by pocketsphinx forced alignment.

    Two passes, as pocketsphinx 5 does it: word alignment of the text, then phones within it. Raises
    ValueError when pocketsphinx cannot align (a word outside its dictionary, audio that is not the text).
    On the embedded corpus it lands within ~20 ms of flite's own durations.
    """
    from pocketsphinx import Decoder

    from models.text import normalize_text

    if sample_rate != 16000:
        raise ValueError(f"pocketsphinx's model is 16 kHz; resample the audio first (got {sample_rate} Hz)")
    pcm = (np.clip(np.asarray(wav, dtype=np.float32), -1, 1) * 32767).astype(np.int16).tobytes()
    words = normalize_text(text)
    dec = Decoder(samprate=16000, loglevel="FATAL")
    try:
        dec.set_align_text(words)
        for _ in range(2):  # words, then (after set_alignment) phones
            dec.start_utt()
            dec.process_raw(pcm, full_utt=True)
            dec.end_utt()
            if _ == 0:
                dec.set_alignment()
        alignment = dec.get_alignment()
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"pocketsphinx could not align {words!r}: {e}") from e
    if alignment is None:
        raise ValueError(f"pocketsphinx found no alignment of {words!r} in the audio")
    frame = 0.01  # pocketsphinx counts 10 ms frames
    return [(p.name, p.start * frame, (p.start + p.duration) * frame) for word in alignment for p in word]


def align_manifest(source: str, *, overwrite: bool = False) -> dict:
    """Write ``<stem>.align.json`` beside every recording of a manifest or corpus folder (``models.data.load_any``)
    that lacks one, by ``pocketsphinx_segments``. Returns counts and the rows it could not align (with why)."""
    from tqdm import tqdm

    from models.audio import load_audio
    from models.data import load_any

    utts, skipped = load_any(source)
    done, failed = 0, []
    for u in tqdm(utts, desc="phone alignment", unit="utt"):
        if alignment_path(u.audio).is_file() and not overwrite:
            continue
        try:
            write_alignment(u.audio, pocketsphinx_segments(load_audio(u.audio, 16000), u.text),
                            source="pocketsphinx forced alignment")
            done += 1
        except ValueError as e:
            failed.append({"id": u.id, "reason": str(e)})
    return {"utterances": len(utts), "aligned": done, "failed": failed,
            "skipped_rows": [s.__dict__ for s in skipped]}
