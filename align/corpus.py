"""The embedded offline corpus: closed-vocabulary sentences spoken by flite voices.

With no network there is no LibriTTS to download, so the package ships a corpus it can build from
nothing: `generate_sentences` writes short English sentences from a small grammar, and
`prepare_corpus` speaks them with Debian's `flite` (several voices = several speakers) into

    out_dir/wav/<voice>/<voice>_<sentence>.wav
    out_dir/train.jsonl  dev.jsonl  test.jsonl     # rows {id, audio, text, speaker, duration}
    out_dir/val.jsonl                              # with n_val_sentences > 0: checkpoint choice's split
    out_dir/corpus.json                            # config + counts; written last = "done"

Dev and test sentences are spoken by every voice, so every speaker is evaluated; each train
sentence by `voices_per_sentence` voices. Sentences are split test-first, then dev, then train, and
generation is prefix-stable, so the dev/test sets do not move when `n_sentences` grows. Validation
sentences (`n_val_sentences`, every voice) are the ones generated after those `n_sentences`, so adding
them moves no train, dev or test utterance.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from align.config import CORPUS_IDENTITY_EXCLUDE, CorpusConfig
from models.audio import is_silent_or_short, load_audio, save_audio
from models.data import Utterance, write_manifest
from models.io import atomic_write_text
from models.phones import alignment_path, parse_psdur, read_alignment, segments_from_ends, write_alignment

log = logging.getLogger("speechalign.corpus")


# ----------------------------------------------------------------------------------------------
# Sentences: a closed-vocabulary grammar (~300 words) of easy, unambiguous English. Small on
# purpose: a small policy model and an ASR judge should both cope. Common words in US spelling, so
# flite reads them from its lexicon rather than guessing from letters.

_NAMES = ("anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "lucy", "mark", "nina",
          "oscar", "paul", "rosa", "sam", "tom", "sarah", "peter")
_RELATIVES = ("mother", "father", "sister", "brother", "friend", "teacher", "uncle", "aunt",
              "neighbor", "grandmother", "grandfather", "cousin")
# (singular, plural)
_ANIMALS = (("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("cow", "cows"),
            ("duck", "ducks"), ("frog", "frogs"), ("sheep", "sheep"), ("pig", "pigs"), ("goat", "goats"),
            ("rabbit", "rabbits"), ("mouse", "mice"), ("fox", "foxes"), ("chicken", "chickens"),
            ("lion", "lions"), ("bear", "bears"))
_THINGS = (("ball", "balls"), ("book", "books"), ("cup", "cups"), ("box", "boxes"), ("hat", "hats"),
           ("car", "cars"), ("bike", "bikes"), ("boat", "boats"), ("kite", "kites"), ("lamp", "lamps"),
           ("bag", "bags"), ("key", "keys"), ("shoe", "shoes"), ("coat", "coats"), ("clock", "clocks"),
           ("bell", "bells"), ("pen", "pens"), ("cake", "cakes"), ("apple", "apples"), ("egg", "eggs"),
           ("basket", "baskets"), ("bottle", "bottles"), ("letter", "letters"), ("blanket", "blankets"),
           ("candle", "candles"), ("plate", "plates"), ("spoon", "spoons"), ("flower", "flowers"),
           ("stone", "stones"), ("shirt", "shirts"), ("ticket", "tickets"), ("pillow", "pillows"))
_PLACES = ("park", "school", "garden", "beach", "market", "farm", "river", "lake", "forest", "village",
           "city", "library", "kitchen", "station", "hill", "bridge", "shop", "house", "field", "harbor",
           "museum", "castle", "zoo")
_FURNITURE = ("table", "chair", "bed", "shelf", "desk", "sofa", "floor", "window", "door", "wall",
              "counter", "bench")
_ADJECTIVES = ("big", "small", "old", "new", "little", "happy", "quiet", "warm", "cold", "soft",
               "heavy", "clean", "tall", "round", "bright", "dark", "funny", "pretty", "tiny", "huge",
               "lazy", "sleepy", "friendly", "gentle", "lovely")
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple", "grey",
            "orange", "golden", "silver")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
# (base, past) transitive verbs that take a thing as object.
_VERBS = (("see", "saw"), ("find", "found"), ("carry", "carried"), ("paint", "painted"), ("wash", "washed"),
          ("buy", "bought"), ("bring", "brought"), ("take", "took"), ("hold", "held"), ("move", "moved"),
          ("clean", "cleaned"), ("drop", "dropped"), ("throw", "threw"), ("catch", "caught"),
          ("sell", "sold"), ("keep", "kept"), ("fix", "fixed"), ("pull", "pulled"), ("push", "pushed"),
          ("draw", "drew"), ("hide", "hid"), ("make", "made"), ("lose", "lost"), ("borrow", "borrowed"))
_MOTION_PAST = ("walked", "ran", "went", "hurried", "came back", "raced")  # animals and people
_DROVE = ("drove", "rode", "cycled")  # people only
_ANIMAL_ACTS = ("played", "slept", "waited", "sat", "stood", "rested", "ate")
_PREPOSITIONS = ("on", "under", "near", "behind", "beside")
_PAST_TIMES = ("yesterday", "last night", "this morning", "last week", "on monday", "on tuesday",
               "on wednesday", "on thursday", "on friday", "on saturday", "on sunday", "in the evening")
_FUTURE_TIMES = ("tomorrow", "tonight", "next week", "next month", "on monday", "on friday",
                 "on sunday", "after lunch", "before dinner", "in the morning")
_FOODS = ("bread", "soup", "rice", "cheese", "pasta", "salad", "fish", "chicken", "pancakes", "noodles",
          "potatoes", "carrots", "pie")
_MEALS = ("breakfast", "lunch", "dinner")
_PLACE_ADJ = ("busy", "quiet", "crowded", "empty", "beautiful", "noisy", "warm", "cold")
_DEGREE = ("very", "quite", "always", "often")
_LIKES = ("likes", "loves", "wants", "needs", "found", "painted", "liked", "bought")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(rng: random.Random) -> str:
    c = rng.choice
    template = rng.randrange(15)
    if template == 0:
        s = f"the {c(_ADJECTIVES)} {c(_ANIMALS)[0]} {c(_MOTION_PAST)} to the {c(_PLACES)}"
    elif template == 1:
        s = f"{c(_NAMES)} has {c(_NUMBERS)} {c(_COLOURS)} {c(_THINGS)[1]}"
    elif template == 2:
        s = f"{c(_NAMES)} will {c(_VERBS)[0]} the {c(_ADJECTIVES)} {c(_THINGS)[0]} {c(_FUTURE_TIMES)}"
    elif template == 3:
        s = f"my {c(_RELATIVES)} {c(_LIKES)} the {c(_COLOURS)} {c(_THINGS)[0]}"
    elif template == 4:
        s = f"there are {c(_NUMBERS)} {c(_ANIMALS)[1]} {c(('in', 'near'))} the {c(_PLACES)}"
    elif template == 5:
        s = f"please put the {c(_THINGS)[0]} {c(_PREPOSITIONS)} the {c(_FURNITURE)}"
    elif template == 6:
        s = f"the {c(_THINGS)[0]} on the {c(_FURNITURE)} is {c(_ADJECTIVES)}"
    elif template == 7:
        adj = c(_ADJECTIVES + _COLOURS)
        s = f"{c(_NAMES)} {c(_VERBS)[1]} {_a(adj)} {adj} {c(_THINGS)[0]} {c(_PAST_TIMES)}"
    elif template == 8:
        s = f"we saw {c(_NUMBERS)} {c(_ADJECTIVES)} {c(_ANIMALS)[1]} at the {c(_PLACES)}"
    elif template == 9:
        a, b = rng.sample(_NAMES, 2)
        s = f"{a} and {b} {c(_MOTION_PAST + _DROVE)} to the {c(_PLACES)} {c(_PAST_TIMES)}"
    elif template == 10:
        s = f"the {c(_PLACES)} is {c(_DEGREE)} {c(_PLACE_ADJ)} {c(('today', 'at night', 'in summer', 'in winter'))}"
    elif template == 11:
        s = f"my {c(_RELATIVES)} made {c(_FOODS)} for {c(_MEALS)}"
    elif template == 12:
        s = f"where did {c(_NAMES)} put the {c(_COLOURS)} {c(_THINGS)[0]}"
    elif template == 13:
        s = f"the {c(_COLOURS)} {c(_THINGS)[0]} is {c(_PREPOSITIONS)} the {c(_FURNITURE)}"
    else:
        s = f"{c(_NUMBERS)} {c(_ADJECTIVES)} {c(_ANIMALS)[1]} {c(_ANIMAL_ACTS)} in the {c(_PLACES)}"
    return s


def generate_sentences(n: int, seed: int) -> list[str]:
    """`n` distinct lowercase sentences of 4-9 words, no digits or punctuation, deterministic.

    Prefix-stable: generate_sentences(n + k, seed)[:n] == generate_sentences(n, seed). The grammar
    has millions of sentences, so any n up to tens of thousands is reachable.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int")
    rng = random.Random(f"speechalign-corpus-{seed}")
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct sentences (got {len(out)}); ask for fewer")
        s = _sentence(rng)
        # Every template is built to 4-9 words; the check guards future edits of the word lists.
        if s not in seen and 4 <= len(s.split()) <= 9:
            seen.add(s)
            out.append(s)
    return out


# ----------------------------------------------------------------------------------------------
# Synthesis

_TRIM_KEEP_S = 0.05  # keep a little silence: codecs and ASR clip hard onsets that start at sample 0


def trim_silence(wav: np.ndarray, sample_rate: int, keep_s: float = _TRIM_KEEP_S) -> np.ndarray:
    """Cut leading/trailing silence from a float `[n_samples]` waveform, keeping `keep_s` each side
    (the bounds of `trim_bounds`)."""
    start, end = trim_bounds(wav, sample_rate, keep_s)
    return wav[start:end]


def trim_bounds(wav: np.ndarray, sample_rate: int, keep_s: float = _TRIM_KEEP_S) -> tuple[int, int]:
    """(start, end) samples of `wav` without its leading/trailing silence, `keep_s` kept each side.

    Silence is relative to the clip's own noise floor (the quiet 5 % of 10 ms frames): the diphone
    voices (awb, kal16) have a floor near -50 dB, slt/rms near -70 dB, so a fixed level would either
    keep awb's silence or clip slt's soft onsets.
    """
    frame = max(1, int(0.01 * sample_rate))
    n = len(wav) // frame
    if n < 5:
        return 0, len(wav)
    power = (wav[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1)
    # 3-frame smoothing so a lone noise spike does not count as speech.
    power = np.convolve(power, np.ones(3) / 3, mode="same")
    db = 10 * np.log10(power + 1e-12)
    peak = db.max()
    threshold = max(np.percentile(db, 5) + 8.0, peak - 50.0)
    loud = np.flatnonzero(db > threshold)
    if loud.size == 0:
        return 0, len(wav)
    keep = int(keep_s * sample_rate)
    return max(0, loud[0] * frame - keep), min(len(wav), (loud[-1] + 1) * frame + keep)


def check_flite() -> str:
    exe = shutil.which("flite")
    if exe is None:
        raise RuntimeError("`flite` is not installed or not on PATH; the embedded corpus needs it: "
                           "apt-get install flite")
    return exe


def _installed_voices(exe: str) -> set[str]:
    out = subprocess.run([exe, "-lv"], capture_output=True, text=True, timeout=30).stdout
    # "Voices available: kal awb_time kal16 awb rms slt"
    return set(out.split(":", 1)[-1].split())


def speak(exe: str, voice: str, text: str, sample_rate: int, trim: bool, tmp_dir: Path
          ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """`text` spoken by flite's `voice`: (float32 waveform [n] at `sample_rate`, its phone segments on that
    waveform's clock: flite's own durations, after silence trimming)."""
    fd, raw = tempfile.mkstemp(dir=tmp_dir, prefix=".speak.", suffix=".flite.wav")
    os.close(fd)
    try:
        proc = subprocess.run([exe, "-voice", voice, "-psdur", "-t", text, "-o", raw], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"flite -voice {voice} failed on {text!r} (exit {proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}; check `flite -lv` lists {voice}")
        wav = load_audio(raw, sample_rate)  # resamples voices whose native rate differs (kal: 8 kHz)
    finally:
        Path(raw).unlink(missing_ok=True)
    ends = parse_psdur(proc.stdout)
    start, end = trim_bounds(wav, sample_rate) if trim else (0, len(wav))
    # flite's clock runs a little off the WAV it writes; its last phone ends where the file does
    segments = segments_from_ends(ends, scale=len(wav) / sample_rate / ends[-1][1], offset=start / sample_rate)
    wav = wav[start:end]
    if is_silent_or_short(wav, sample_rate):
        raise RuntimeError(f"flite voice {voice} produced silence for {text!r}; the voice is broken, "
                           "drop it from corpus.voices or reinstall flite")
    return wav, segments


# The planted pause's own noise: white noise this far below full scale, about the floor of flite's quiet voices
# (a recording's pause is room noise, not digital zeros).
PAUSE_NOISE_DBFS = -70.0


def synthesise(exe: str, voice: str, text: str, out_path: Path, sample_rate: int, trim: bool,
               pause: dict | None = None) -> dict | None:
    """Speak `text` with `voice` into `out_path` (16-bit WAV at `sample_rate`), atomically, with its phone
    alignment beside it (models/phones.py: flite's own durations, on the trimmed WAV's clock).

    pause: ``{"after_word": j, "seconds": s}`` plants the pause defect: the first j words and the rest are spoken
    as two utterances and joined by s seconds of low noise (a ``pau`` segment in the alignment), as a speaker who
    stopped mid-sentence and went on. Returns the planted defect with its place in the file
    (``start``/``end`` seconds of the inserted silence), or None."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    source = f"flite -voice {voice} -psdur"
    if pause is None:
        wav, segments = speak(exe, voice, text, sample_rate, trim, out_path.parent)
        planted = None
    else:
        words = text.split()
        j = pause["after_word"]
        if not 1 <= j < len(words):
            raise ValueError(f"a pause after word {j} of {text!r} is not inside the sentence")
        a, seg_a = speak(exe, voice, " ".join(words[:j]), sample_rate, trim, out_path.parent)
        b, seg_b = speak(exe, voice, " ".join(words[j:]), sample_rate, trim, out_path.parent)
        rng = np.random.default_rng(zlib.crc32(f"{out_path.stem}|pause".encode()))
        gap = (rng.standard_normal(int(round(pause["seconds"] * sample_rate))) * 10 ** (PAUSE_NOISE_DBFS / 20))
        t0, t1 = len(a) / sample_rate, (len(a) + len(gap)) / sample_rate
        wav = np.concatenate([a, gap.astype(np.float32), b])
        segments = seg_a + [("pau", t0, t1)] + [(p, s + t1, e + t1) for p, s, e in seg_b]
        planted = dict(pause, defect="pause", start=round(t0, 5), end=round(t1, 5))
        source += f" (two parts, a {pause['seconds']:.3f} s pause after word {j}: corpus.defect=pause)"
    write_alignment(out_path, segments, source=source)
    save_audio(out_path, wav, sample_rate)  # last: a finished wav means its alignment is there too
    return planted


def planted_defect(cfg: CorpusConfig, split: str, uid: str, text: str) -> dict | None:
    """The defect `cfg` plants in utterance `uid` (train only), or None: drawn from (corpus seed, uid) alone, so it
    is the same whatever else the corpus holds. defect=pause: ``{"after_word": j, "seconds": s}``, j a uniformly
    drawn word boundary inside the sentence."""
    if cfg.defect == "none" or split != "train":
        return None
    rng = random.Random(f"speechalign-defect-{cfg.seed}-{uid}")
    if rng.random() >= cfg.defect_fraction:
        return None
    n_words = len(text.split())
    if n_words < 2:
        return None
    lo, hi = cfg.pause_seconds
    return {"after_word": rng.randint(1, n_words - 1), "seconds": round(rng.uniform(lo, hi), 3)}


def _check_voices(exe: str, cfg: CorpusConfig) -> None:
    installed = _installed_voices(exe)
    missing = [v for v in cfg.voices if v not in installed]
    if missing:
        raise RuntimeError(f"flite lacks voice(s) {', '.join(missing)} (it has: {', '.join(sorted(installed))}); "
                           "install the full Debian flite package or drop them from corpus.voices")
    with tempfile.TemporaryDirectory() as tmp:
        for v in cfg.voices:
            synthesise(exe, v, "hello there", Path(tmp) / f"{v}.wav", cfg.sample_rate, cfg.trim_silence)


def splits_of(cfg: CorpusConfig) -> tuple[str, ...]:
    """The corpus's splits: train, dev, test, and val when it has validation sentences."""
    return ("train", "dev", "test") + (("val",) if cfg.n_val_sentences else ())


def _plan(cfg: CorpusConfig) -> dict[str, list[tuple[str, str, str]]]:
    """{split: [(utt_id, voice, text)]}: test sentences first, then dev, then train (prefix-stable), then val."""
    sentences = generate_sentences(cfg.n_sentences + cfg.n_val_sentences, cfg.seed)
    width = max(4, len(str(cfg.n_sentences - 1)))
    n_test, n_dev = cfg.n_test_sentences, cfg.n_dev_sentences
    # Each train sentence gets one voice combination, cycling through all of them in a seeded order:
    # every voice speaks the same number of train sentences (+-1), and every voice pair co-occurs.
    combos = list(itertools.combinations(cfg.voices, cfg.voices_per_sentence))
    random.Random(f"speechalign-voices-{cfg.seed}").shuffle(combos)
    plan: dict[str, list[tuple[str, str, str]]] = {s: [] for s in splits_of(cfg)}
    for i, text in enumerate(sentences):
        if i >= cfg.n_sentences:
            split, voices = "val", cfg.voices
        elif i < n_test:
            split, voices = "test", cfg.voices
        elif i < n_test + n_dev:
            split, voices = "dev", cfg.voices
        else:
            split, voices = "train", combos[(i - n_test - n_dev) % len(combos)]
        for v in voices:
            plan[split].append((f"{v}_{i:0{width}d}", v, text))
    return plan


def prepare_corpus(cfg: CorpusConfig, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Synthesise the corpus into `out_dir` and write its manifests.

    Idempotent: returns at once when `out_dir/corpus.json` records the same config. A killed run
    resumes: each wav is written atomically, so an existing wav is finished and is not redone.
    Returns {"train", "dev", "test" (and "val"): manifest paths, "corpus": corpus.json path}.
    Raises RuntimeError if flite or a voice is missing/broken; ValueError if `out_dir` holds a
    corpus (finished or not) built with a different config.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    paths = {s: out_dir / f"{s}.jsonl" for s in splits_of(cfg)}
    paths["corpus"] = out_dir / "corpus.json"
    pending = out_dir / ".corpus.pending.json"
    identity = cfg.identity()
    for marker in (paths["corpus"], pending):
        if marker.is_file():
            stored = json.loads(marker.read_text(encoding="utf-8")).get("config", {})
            try:  # through the schema, so fields added since it was built compare at their defaults
                stored = CorpusConfig.from_dict(stored).identity()
            except (TypeError, ValueError):
                stored = {k: v for k, v in stored.items() if k not in CORPUS_IDENTITY_EXCLUDE}
            if stored != identity:
                diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                raise ValueError(
                    f"{out_dir} holds a corpus built with another config (differs in: {', '.join(diff)}); "
                    "pass a new out_dir, or delete this one to rebuild")
    # (a corpus written before alignments existed lacks "alignments" and gets them below)
    if (paths["corpus"].is_file() and all(paths[s].is_file() for s in splits_of(cfg))
            and json.loads(paths["corpus"].read_text(encoding="utf-8")).get("alignments")):
        log.info("corpus at %s is already prepared", out_dir)
        return paths

    exe = check_flite()
    _check_voices(exe, cfg)
    # Recorded before any wav is written, so a resumed run with a changed config is refused above
    # instead of mixing wavs from two configs.
    atomic_write_text(pending, json.dumps({"config": asdict(cfg)}, indent=2) + "\n")

    t0 = time.monotonic()
    # A killed run can leave flite's raw output and save_audio's temp files behind; both are hidden
    # names that no finished wav has.
    for stale in itertools.chain((out_dir / "wav").glob("*/.*.flite.wav"), (out_dir / "wav").glob("*/.*.tmp")):
        stale.unlink(missing_ok=True)
    plan = _plan(cfg)
    wav_path = lambda uid, voice: out_dir / "wav" / voice / f"{uid}.wav"  # noqa: E731
    defects = {uid: d for split, rows in plan.items() for uid, _, text in rows
               if (d := planted_defect(cfg, split, uid, text)) is not None}
    todo = [(uid, v, text) for rows in plan.values() for uid, v, text in rows
            if not (wav_path(uid, v).is_file() and alignment_path(wav_path(uid, v)).is_file())]
    total = sum(len(rows) for rows in plan.values())
    log.info("synthesising %d of %d utterances with flite (%d workers) into %s",
             len(todo), total, cfg.num_workers, out_dir)
    # Threads, not processes: the work happens in the flite subprocess (and in numpy/libsndfile,
    # which release the GIL), and forking a parent that may hold torch state is asking for trouble.
    with ThreadPoolExecutor(max_workers=cfg.num_workers) as pool:
        futures = {pool.submit(synthesise, exe, v, text, wav_path(uid, v), cfg.sample_rate, cfg.trim_silence,
                               defects.get(uid)): uid
                   for uid, v, text in todo}
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc="flite corpus", unit="utt",
                            disable=not todo):
                fut.result()  # re-raises a worker's error with its message
        except BaseException:
            # Without this the pool would finish every queued utterance before the error surfaces.
            for fut in futures:
                fut.cancel()
            raise

    if cfg.defect != "none":  # the planted defects with their place in each file: the detector's ground truth
        rows = []
        for uid, d in sorted(defects.items()):
            voice = next(v for u, v, _ in plan["train"] if u == uid)
            pau = [(s_, e) for p, s_, e in read_alignment(wav_path(uid, voice)) or [] if p == "pau"
                   and abs((e - s_) - d["seconds"]) < 2e-3]
            rows.append(dict(d, id=uid, defect=cfg.defect, start=pau[0][0] if pau else None,
                             end=pau[0][1] if pau else None))
        atomic_write_text(out_dir / "defects.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    counts: dict[str, dict] = {}
    for split, rows in plan.items():
        utts = []
        for uid, v, text in rows:
            p = wav_path(uid, v)
            info = sf.info(str(p))
            utts.append(Utterance(uid, str(p), text, speaker=v, duration=info.frames / info.samplerate))
        write_manifest(paths[split], utts)
        counts[split] = {
            "sentences": len({u.text for u in utts}),
            "utterances": len(utts),
            "hours": round(sum(u.duration for u in utts) / 3600, 4),
        }
    summary = {
        "config": asdict(cfg),
        "counts": counts,
        "total": {"utterances": sum(c["utterances"] for c in counts.values()),
                  "hours": round(sum(c["hours"] for c in counts.values()), 4)},
        "speakers": list(cfg.voices),
        "alignments": "flite -psdur phone segments beside each wav (<id>.align.json)",
        "defects": ({"defect": cfg.defect, "utterances": len(defects), "of_train": counts["train"]["utterances"],
                     "file": "defects.jsonl"} if cfg.defect != "none" else None),
        "manifests": {s: paths[s].name for s in splits_of(cfg)},
        "seconds_to_prepare": round(time.monotonic() - t0, 1),
    }
    atomic_write_text(paths["corpus"], json.dumps(summary, indent=2) + "\n")  # last: marks the corpus done
    pending.unlink(missing_ok=True)
    log.info("corpus ready at %s: %d utterances, %.2f h (%s)", out_dir, summary["total"]["utterances"],
             summary["total"]["hours"],
             ", ".join(f"{s} {c['utterances']}" for s, c in counts.items()))
    return paths
