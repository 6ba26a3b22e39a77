"""Human preferences: blind A/B listening items, their SQLite store, statistics, and preference pairs.

    RUN/round_{k:03d}/eval/rows.jsonl      what the items are built from (read, never written)
    RUN/listen/judgments.sqlite            one row per judgment (the first run's, by default)
    RUN/listen/results.md, *.csv           ``write_results``: win rates, MOS, rater agreement

A *system* is (run directory, round). An *item* is (utterance id, system X, system Y) where both
systems saved that utterance's audio; every rater gets every item, in a seeded per-rater order
with the sides (which system is A) drawn per rater and item, so a rater who closes the page
resumes at the same next item and raters overlap on every item (which the agreement needs).

``eval.listen_app`` is the web page on top of this module; ``human_pairs`` turns the judgments
into (chosen, rejected) token pairs for DPO. Nothing here imports ``align`` (the layer rule), so
the run layout is read from the files, and flask is only needed by the app.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import itertools
import logging
import math
import os
import random
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from models.io import atomic_write_text, read_jsonl
from models.layout import token_distance
from models.rundir import RunLayout

log = logging.getLogger("speechalign.eval")

DB_NAME = "judgments.sqlite"
CHOICES = ("A", "B", "same")
SIDES = ("A", "B", "ref")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# A clip counts as heard when it played to its end, or for this long (or 90% of it, if shorter):
# long enough to hear the voice and most of the words, short enough not to force long clips.
MIN_PLAY_SECONDS = 2.0
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def default_db_path(run_dir: str | os.PathLike) -> Path:
    """Where the judgments of a listening test over ``run_dir`` (the first one given) live."""
    return Path(run_dir) / "listen" / DB_NAME


# ---------------------------------------------------------------------------------------------
# Items from run directories
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class System:
    """One round of one run; ``label`` is what results call it (raters never see it)."""

    run_dir: str   # resolved path
    round: int
    label: str     # "<run name>:r<k>"


@dataclass(frozen=True)
class Item:
    """One blind comparison: the same utterance from systems ``x`` and ``y`` (x first in
    ``system_key`` order). ``clip_x``/``clip_y``: resolved audio paths inside their run dirs;
    ``reference``: the real recording of the text (None if absent or not an audio file)."""

    item_id: str
    utt_id: str
    text: str
    speaker: str
    x: System
    y: System
    clip_x: str
    clip_y: str
    duration_x: float
    duration_y: float
    reference: str | None = None


def evaluated_rounds(run_dir: str | os.PathLike) -> list[int]:
    """Rounds of a run that have ``eval/rows.jsonl``, ascending."""
    out = []
    for p in Path(run_dir).glob("round_*"):
        suffix = p.name.split("_", 1)[1]
        if suffix.isdigit() and (p / "eval" / "rows.jsonl").is_file():
            out.append(int(suffix))
    return sorted(out)


def eval_rows(run_dir: str | os.PathLike, k: int) -> dict[str, dict]:
    """Round k's evaluation rows by utterance id."""
    path = RunLayout(run_dir).eval_dir(k) / "rows.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: round {k} of {run_dir} was not evaluated "
                         f"(evaluated rounds: {evaluated_rounds(run_dir)})")
    return {r["id"]: r for r in read_jsonl(path)}


def _labels(run_dirs: list[Path]) -> list[str]:
    """Run names for labels: the folder name, with its parent when two runs share a name."""
    names = [p.name for p in run_dirs]
    labels = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]
    if len(set(labels)) < len(labels):
        raise ValueError(f"run directories {[str(p) for p in run_dirs]} cannot be told apart by name; "
                         "give each run its own folder name")
    return labels


def choose_systems(run_dirs: list[str | os.PathLike], rounds: list[int] | None = None) -> list[System]:
    """The systems to compare, in the order items name them.

    One run: the given rounds (default: its first and last evaluated round). Several runs: every run
    at the given rounds (default: each run's last evaluated round); runs are compared within a round.
    """
    if not run_dirs:
        raise ValueError("listen needs at least one run directory")
    dirs = [Path(d).resolve() for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"run directory {d} not found")
    if len(set(dirs)) < len(dirs):
        raise ValueError(f"a run directory is given twice: {[str(d) for d in dirs]}")
    labels = _labels(dirs)
    systems = []
    for d, name in zip(dirs, labels):
        have = evaluated_rounds(d)
        if not have:
            raise ValueError(f"{d} has no evaluated round (no round_*/eval/rows.jsonl); run its evaluate stage first")
        if rounds:
            ks = list(dict.fromkeys(rounds))
        elif len(dirs) == 1:
            if len(have) < 2:
                raise ValueError(f"{d} has only round {have[0]} evaluated; one run needs two rounds to compare "
                                 "(evaluate another round, or give several runs)")
            ks = [have[0], have[-1]]
        else:
            ks = [have[-1]]
        missing = [k for k in ks if k not in have]
        if missing:
            raise ValueError(f"round(s) {missing} of {d} have no eval/rows.jsonl; evaluated rounds: {have}")
        systems += [System(str(d), k, f"{name}:r{k}") for k in ks]
    if len(dirs) == 1 and len(systems) < 2:
        raise ValueError(f"one run needs at least two rounds to compare, got --rounds {rounds}")
    return systems


def system_key(label: str, k: int) -> tuple[str, int]:
    """Sort key of a system: run name, then round (so r2 comes before r10)."""
    return label.rsplit(":r", 1)[0], int(k)


def system_pairs(systems: list[System]) -> list[tuple[System, System]]:
    """Which systems are compared: all rounds of one run against each other, or runs within a round.

    Each pair is (x, y) in ``system_key`` order, whatever order the runs were given in, so an item's
    id and its "x" are the same in every session over the same runs.
    """
    if len({s.run_dir for s in systems}) == 1:
        pairs = list(itertools.combinations(systems, 2))
    else:
        pairs = [(a, b) for a, b in itertools.combinations(systems, 2) if a.round == b.round]
    return [tuple(sorted(p, key=lambda s: system_key(s.label, s.round))) for p in pairs]


def opaque_id(*parts: object, n: int = 16) -> str:
    """A short hex id of ``parts`` (item and clip ids: stable, and saying nothing about what they name)."""
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:n]


def _audio_duration(path: Path) -> float | None:
    """Seconds of an audio file, or None when it cannot be read as audio."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, ValueError):  # soundfile raises LibsndfileError (a RuntimeError)
        return None
    return info.frames / info.samplerate if info.samplerate else None


def _saved_clip(system: System, row: dict) -> Path | None:
    """The resolved path of a row's saved audio, if it exists and stays inside its run directory."""
    rel = row.get("saved_audio")
    if not rel:
        return None
    eval_dir = RunLayout(system.run_dir).eval_dir(system.round)
    path = (eval_dir / rel).resolve()
    # A row is data: a saved_audio of "../../x" must not make the app serve a file outside the run.
    if not path.is_relative_to(Path(system.run_dir)) or not path.is_file():
        log.warning("listen: %s round %d: saved_audio %r of %s is missing or outside the run; skipped",
                    system.run_dir, system.round, rel, row.get("id"))
        return None
    return path


def _reference(row: dict) -> Path | None:
    """The real recording named by a row, only if it is an existing audio file (it lives in the corpus)."""
    ref = row.get("audio")
    if not ref:
        return None
    path = Path(ref).resolve()
    if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file() or _audio_duration(path) is None:
        return None
    return path


def build_items(run_dirs: list[str | os.PathLike], rounds: list[int] | None = None) -> list[Item]:
    """Every (utterance, system X, system Y) whose two outputs were saved, in a fixed order."""
    systems = choose_systems(run_dirs, rounds)
    rows = {s: eval_rows(s.run_dir, s.round) for s in systems}
    clips: dict[tuple[System, str], tuple[Path, float]] = {}
    for s in systems:
        for uid, r in rows[s].items():
            p = _saved_clip(s, r)
            d = _audio_duration(p) if p is not None else None
            if p is not None and d is None:
                log.warning("listen: %s is not readable audio; skipped", p)
            if p is not None and d is not None:
                clips[(s, uid)] = (p, d)
    items = []
    for x, y in system_pairs(systems):
        for uid, r in rows[x].items():  # eval order: the same fixed item set every round
            if (x, uid) not in clips or (y, uid) not in clips:
                continue
            (cx, dx), (cy, dy) = clips[(x, uid)], clips[(y, uid)]
            ref = _reference(r)
            items.append(Item(item_id=opaque_id(uid, x.label, y.label), utt_id=uid, text=str(r.get("text", "")),
                              speaker=str(r.get("speaker", "")), x=x, y=y, clip_x=str(cx), clip_y=str(cy),
                              duration_x=dx, duration_y=dy, reference=str(ref) if ref else None))
    if not items:
        raise ValueError(f"no utterance has saved audio in both systems of any pair of {[s.label for s in systems]}; "
                         "evaluate with eval.save_audio > 0 (the first N test utterances keep their WAVs)")
    log.info("listen: %d items from %d system pairs of %s", len(items), len(system_pairs(systems)),
             ", ".join(s.label for s in systems))
    return items


def rater_order(items: list[Item], rater: str, seed: int = 0) -> list[Item]:
    """The order one rater hears the items in: seeded by (seed, rater), so a reload resumes it.
    It depends on the set of items only (sorted by id first), not on the order runs were given in."""
    order = sorted(items, key=lambda it: it.item_id)
    random.Random(f"{seed}:order:{rater}").shuffle(order)  # str seeds hash with sha512: stable across processes
    return order


def shown_order(item: Item, rater: str, seed: int = 0) -> Literal["XY", "YX"]:
    """Which system is A for this rater: "XY" = the item's x on side A. Drawn per (seed, rater, item)."""
    return "XY" if random.Random(f"{seed}:sides:{rater}:{item.item_id}").random() < 0.5 else "YX"


def played_threshold(duration: float) -> float:
    """Seconds of playback after which a clip counts as heard (see MIN_PLAY_SECONDS)."""
    return min(MIN_PLAY_SECONDS, 0.9 * duration)


# ---------------------------------------------------------------------------------------------
# SQLite store
# ---------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rater        TEXT NOT NULL,
    item         TEXT NOT NULL,
    utt_id       TEXT NOT NULL,
    system_a     TEXT NOT NULL,            -- the system shown as A (label), its run and round
    run_a        TEXT NOT NULL,
    round_a      INTEGER NOT NULL,
    system_b     TEXT NOT NULL,
    run_b        TEXT NOT NULL,
    round_b      INTEGER NOT NULL,
    order_shown  TEXT NOT NULL CHECK (order_shown IN ('XY', 'YX')),  -- XY: the item's x (system_pairs) was A
    choice       TEXT NOT NULL CHECK (choice IN ('A', 'B', 'same')),
    winner       TEXT,                     -- the preferred system's label; NULL for "same"
    qmos_a       INTEGER CHECK (qmos_a BETWEEN 1 AND 5),
    qmos_b       INTEGER CHECK (qmos_b BETWEEN 1 AND 5),
    smos_a       INTEGER CHECK (smos_a BETWEEN 1 AND 5),
    smos_b       INTEGER CHECK (smos_b BETWEEN 1 AND 5),
    created_at   TEXT NOT NULL,            -- UTC, ISO 8601
    UNIQUE (rater, item)                   -- a double submit stores one judgment
);
CREATE TABLE IF NOT EXISTS plays (
    rater      TEXT NOT NULL,
    item       TEXT NOT NULL,
    side       TEXT NOT NULL CHECK (side IN ('A', 'B', 'ref')),
    seconds    REAL NOT NULL DEFAULT 0,
    ended      INTEGER NOT NULL DEFAULT 0,
    played     INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (rater, item, side)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

JUDGMENT_COLUMNS = ("rater", "item", "utt_id", "system_a", "run_a", "round_a", "system_b", "run_b", "round_b",
                    "order_shown", "choice", "winner", "qmos_a", "qmos_b", "smos_a", "smos_b", "created_at")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """The judgments database. Each call opens its own connection (one per request thread) and
    commits before returning, so a killed server loses nothing that was acknowledged."""

    def __init__(self, db_path: str | os.PathLike, *, create: bool = True):
        self.path = Path(db_path)
        if not create and not self.path.is_file():
            raise ValueError(f"no judgments database at {self.path} (run `speechalign listen RUN_DIR` first, "
                             "or pass --db FILE)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.connect() as con:
                # WAL: readers (results while raters vote) never block the writer; set once, kept in the file.
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: autocommit, every statement is its own committed transaction.
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA synchronous=FULL")  # fsync on commit: a judgment acknowledged is on disk
            yield con
        finally:
            con.close()

    def set_meta(self, key: str, value: str) -> None:
        """Record a setting of the test (the seed) beside the judgments."""
        with self.connect() as con:
            con.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, value))

    def get_meta(self, key: str) -> str | None:
        """A recorded setting, or None."""
        with self.connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row["value"]

    def judged_items(self, rater: str) -> set[str]:
        """Ids of the items this rater has judged."""
        with self.connect() as con:
            return {r["item"] for r in con.execute("SELECT item FROM judgments WHERE rater=?", (rater,))}

    def mark_played(self, rater: str, item: str, side: str, seconds: float, ended: bool, threshold: float) -> bool:
        """Record a play report; returns whether this side now counts as heard (it stays so)."""
        played = bool(ended) or seconds >= threshold
        with self.connect() as con:
            con.execute(
                "INSERT INTO plays(rater, item, side, seconds, ended, played, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(rater, item, side) DO UPDATE SET seconds=max(seconds, excluded.seconds), "
                "ended=max(ended, excluded.ended), played=max(played, excluded.played), updated_at=excluded.updated_at",
                (rater, item, side, float(seconds), int(bool(ended)), int(played), _now()))
            row = con.execute("SELECT played FROM plays WHERE rater=? AND item=? AND side=?",
                              (rater, item, side)).fetchone()
        return bool(row["played"])

    def played_sides(self, rater: str, item: str) -> dict[str, bool]:
        """{"A": heard?, "B": heard?} for this rater and item."""
        with self.connect() as con:
            rows = con.execute("SELECT side, played FROM plays WHERE rater=? AND item=?", (rater, item)).fetchall()
        got = {r["side"]: bool(r["played"]) for r in rows}
        return {s: got.get(s, False) for s in ("A", "B")}

    def add_judgment(self, row: dict) -> bool:
        """Insert one judgment (keys: JUDGMENT_COLUMNS but created_at); False if the rater already judged it."""
        values = {**row, "created_at": row.get("created_at") or _now()}
        cols = ", ".join(JUDGMENT_COLUMNS)
        marks = ", ".join("?" for _ in JUDGMENT_COLUMNS)
        with self.connect() as con:
            cur = con.execute(f"INSERT INTO judgments({cols}) VALUES ({marks}) ON CONFLICT(rater, item) DO NOTHING",
                              [values.get(c) for c in JUDGMENT_COLUMNS])
            return cur.rowcount == 1

    def judgments(self) -> list[dict]:
        """Every judgment, oldest first."""
        with self.connect() as con:
            return [dict(r) for r in con.execute("SELECT * FROM judgments ORDER BY id")]


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (nan, nan for n = 0).

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage
    at the few-dozen judgments a listening test has, including 0/n and n/n.
    """
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of a mean; lo = hi = nan below two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items; nan when chance agreement is 1."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa needs two equally long, non-empty label lists, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    return float("nan") if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: list[dict[str, int]]) -> float:
    """Fleiss' kappa from per-item category counts, each item with >= 2 ratings.

    Items may have different numbers of raters: P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)) per item,
    P_bar their mean, p_j = sum_i n_ij / sum_i n_i, P_e = sum_j p_j^2 (the usual generalisation; with
    a constant n_i it is Fleiss' 1971 formula). nan when there are no items or P_e = 1.
    """
    counts = [c for c in counts if sum(c.values()) >= 2]
    if not counts:
        return float("nan")
    p_items = []
    totals: Counter = Counter()
    for c in counts:
        n_i = sum(c.values())
        p_items.append((sum(v * v for v in c.values()) - n_i) / (n_i * (n_i - 1)))
        totals.update(c)
    grand = sum(totals.values())
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((v / grand) ** 2 for v in totals.values())
    return float("nan") if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def _canonical(j: dict) -> dict:
    """A judgment in the item's own terms: systems x, y (x first in ``system_key`` order, as in
    ``system_pairs``), outcome 'x'/'y'/'same', and the scores per system (given per side)."""
    xy = system_key(j["system_a"], j["round_a"]) <= system_key(j["system_b"], j["round_b"])
    side = {"A": "x" if xy else "y", "B": "y" if xy else "x"}
    sys = {side["A"]: (j["system_a"], j["run_a"], j["round_a"]), side["B"]: (j["system_b"], j["run_b"], j["round_b"])}
    return {"rater": j["rater"], "item": j["item"], "utt_id": j["utt_id"],
            "x": sys["x"], "y": sys["y"], "outcome": "same" if j["choice"] == "same" else side[j["choice"]],
            "qmos": {sys[side["A"]][0]: j["qmos_a"], sys[side["B"]][0]: j["qmos_b"]},
            "smos": {sys[side["A"]][0]: j["smos_a"], sys[side["B"]][0]: j["smos_b"]}}


@dataclass
class Results:
    """Listening-test results; each table is a list of flat dicts (one CSV row each)."""

    n_judgments: int
    n_raters: int
    n_items: int
    pairs: list[dict] = field(default_factory=list)      # per system pair: wins, ties, win rate + Wilson CI
    scores: list[dict] = field(default_factory=list)     # per system: QMOS / SMOS mean + t CI
    agreement: list[dict] = field(default_factory=list)  # per rater pair + one "all raters" row


def compute_results(judgments: list[dict]) -> Results:
    """Win rates, MOS and agreement from judgment rows (``Store.judgments()``).

    Win rate of x over y = x wins / (x wins + y wins): ties ("same") are left out of it and reported
    as their own count and rate; ``x_score`` counts a tie as half a win. Every judgment counts once
    (several raters on one item are several judgments; the Wilson CI treats them as independent).
    """
    canon = [_canonical(j) for j in judgments]
    res = Results(n_judgments=len(canon), n_raters=len({c["rater"] for c in canon}),
                  n_items=len({c["item"] for c in canon}))
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for c in canon:
        by_pair[(c["x"][0], c["y"][0])].append(c)
    for (x, y), cs in by_pair.items():
        n = len(cs)
        wx = sum(c["outcome"] == "x" for c in cs)
        wy = sum(c["outcome"] == "y" for c in cs)
        ties = n - wx - wy
        lo, hi = wilson_interval(wx, wx + wy)
        res.pairs.append({"system_x": x, "system_y": y, "n": n, "n_items": len({c["item"] for c in cs}),
                          "n_raters": len({c["rater"] for c in cs}), "x_wins": wx, "y_wins": wy, "ties": ties,
                          "tie_rate": ties / n, "x_win_rate": wx / (wx + wy) if wx + wy else float("nan"),
                          "x_win_lo": lo, "x_win_hi": hi, "x_score": (wx + 0.5 * ties) / n})
    systems = sorted({c["x"][0] for c in canon} | {c["y"][0] for c in canon})
    for s in systems:
        row: dict = {"system": s}
        for metric in ("qmos", "smos"):
            vals = [float(c[metric][s]) for c in canon if s in c[metric] and c[metric][s] is not None]
            m, lo, hi = mean_ci(vals)
            row.update({f"{metric}_mean": m, f"{metric}_lo": lo, f"{metric}_hi": hi, f"{metric}_n": len(vals)})
        res.scores.append(row)
    # Agreement on the outcome in system terms (x / y / same): sides were shuffled per rater.
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for c in canon:
        by_item[c["item"]][c["rater"]] = c["outcome"]
    shared = {i: r for i, r in by_item.items() if len(r) >= 2}
    agree = total = 0
    for r1, r2 in itertools.combinations(sorted({c["rater"] for c in canon}), 2):
        both = [i for i, r in shared.items() if r1 in r and r2 in r]
        if not both:
            continue
        a, b = [shared[i][r1] for i in both], [shared[i][r2] for i in both]
        same = sum(u == v for u, v in zip(a, b))
        agree, total = agree + same, total + len(both)
        res.agreement.append({"raters": f"{r1} & {r2}", "n_items": len(both), "percent_agreement": same / len(both),
                              "kappa": cohen_kappa(a, b), "kappa_kind": "cohen"})
    if shared:
        res.agreement.append({"raters": "all", "n_items": len(shared),
                              "percent_agreement": agree / total if total else float("nan"),
                              "kappa": fleiss_kappa([dict(Counter(r.values())) for r in shared.values()]),
                              "kappa_kind": "fleiss"})
    return res


METHODS = ("Win rate of x over y = x wins / (x wins + y wins), ties left out and reported separately "
           "(x_score counts a tie as half a win); 95% CI: Wilson score interval, every judgment counted as "
           "independent. QMOS (quality) and SMOS (similarity to the reference speaker), 1-5: mean with a "
           "95% Student-t interval over the judgments that gave a score. Agreement on items two or more raters "
           "judged, on the outcome in system terms (x / y / same): pairwise percent agreement and Cohen's kappa "
           "per rater pair; 'all': pooled pairwise agreement and Fleiss' kappa (variable raters per item).")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    cell = lambda v: _fmt(v).replace("|", "\\|")  # noqa: E731 - a label may hold a pipe
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_markdown(res: Results) -> str:
    """The results as one Markdown page."""
    return (f"# Listening test\n\n{res.n_judgments} judgments by {res.n_raters} rater(s) on {res.n_items} item(s).\n\n"
            f"{METHODS}\n\n## Preference per system pair\n\n{_md_table(res.pairs)}\n"
            f"## QMOS / SMOS per system\n\n{_md_table(res.scores)}\n"
            f"## Agreement between raters\n\n{_md_table(res.agreement)}")


def write_results(db_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``pairs.csv``, ``scores.csv``, ``agreement.csv`` and ``results.md`` (default: beside the
    database); returns their paths by name."""
    db_path = Path(db_path)
    out = Path(out_dir) if out_dir is not None else db_path.parent
    res = compute_results(Store(db_path, create=False).judgments())
    paths = {name: out / f"{name}.csv" for name in ("pairs", "scores", "agreement")}
    for name, path in paths.items():
        atomic_write_text(path, _csv(getattr(res, name)))
    paths["results"] = out / "results.md"
    atomic_write_text(paths["results"], results_markdown(res))
    log.info("listen: %d judgments -> %s", res.n_judgments, out)
    return paths


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p class=\"small\">(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_section(run_dir: str | os.PathLike, db_path: str | os.PathLike | None = None) -> str:
    """The listening-test section of the static report (every value escaped); "" when there is no database."""
    path = Path(db_path) if db_path is not None else default_db_path(run_dir)
    if not path.is_file():
        return ""
    res = compute_results(Store(path, create=False).judgments())
    if not res.n_judgments:
        return ""
    return ("<h2>Human listening test</h2>"
            f"<p class=\"small\">{res.n_judgments} blind A/B judgments by {res.n_raters} rater(s) on {res.n_items} "
            f"item(s), from <code>{html.escape(str(path))}</code>. {html.escape(METHODS)}</p>"
            f"<h3>Preference per system pair</h3>{_html_table(res.pairs)}"
            f"<h3>QMOS / SMOS per system</h3>{_html_table(res.scores)}"
            f"<h3>Agreement between raters</h3>{_html_table(res.agreement)}")


# ---------------------------------------------------------------------------------------------
# Judgments -> preference pairs
# ---------------------------------------------------------------------------------------------
def _resolver(run_dirs: list[str] | None):
    """Map a run path stored in the database to the run directory to read rows from.

    With ``run_dirs``, a stored run matches the given one with the same resolved path, else the
    same folder name (a run that was moved); runs that match none give None.
    """
    if run_dirs is None:
        return lambda stored: stored
    given = [Path(d).resolve() for d in run_dirs]
    by_path = {str(p): str(p) for p in given}
    by_name: dict[str, str] = {}
    for p in given:
        by_name.setdefault(p.name, str(p))
    return lambda stored: by_path.get(str(Path(stored).resolve())) or by_name.get(Path(stored).name)


def human_pairs(db_path: str | os.PathLike, run_dirs: list[str] | None = None) -> list[dict]:
    """Judged items as (chosen, rejected) RVQ-1 token pairs, one per item with a clear majority.

    Per item the raters' outcomes (x better, y better, same) are counted; the most voted outcome wins.
    The item is skipped when that outcome is "same", or when two outcomes tie for the most votes
    (e.g. one rater x, one rater y; or one x, one same): raters who disagree give no preference.
    The winner's ``codes`` (from its round's ``eval/rows.jsonl``) are chosen, the other's rejected.
    ``run_dirs``: where to read rows from (default: the run paths stored with the judgments; see
    ``_resolver`` for how stored runs are matched). Rows without ``codes`` are skipped, logged.

    Returns dicts: id, text, speaker, prompt_id, prompt_audio (the voice prompt's recording), chosen_codes, rejected_codes: list[int], keep=True,
    scores {token_distance, length_ratio = len(rejected)/len(chosen) (as the other strategies), votes (for the
    winner), n_judgments}, source="human", judged {item, chosen, rejected (system labels), runs, rounds}.
    """
    judgments = Store(db_path, create=False).judgments()
    resolve = _resolver(run_dirs)
    by_item: dict[str, list[dict]] = defaultdict(list)
    for j in judgments:
        by_item[j["item"]].append(_canonical(j))
    rows_cache: dict[tuple[str, int], dict[str, dict]] = {}

    def row_of(system: tuple, uid: str) -> dict | None:
        label, run, k = system
        run_dir = resolve(run)
        if run_dir is None:
            log.info("listen pairs: run %s of %s is not among %s; item skipped", run, label, run_dirs)
            return None
        if (run_dir, k) not in rows_cache:
            try:
                rows_cache[(run_dir, k)] = eval_rows(run_dir, k)
            except ValueError as e:
                log.warning("listen pairs: %s", e)
                rows_cache[(run_dir, k)] = {}
        return rows_cache[(run_dir, k)].get(uid)

    pairs, skipped = [], Counter()
    for item, cs in by_item.items():
        votes = Counter(c["outcome"] for c in cs)
        (top, n_top), *rest = votes.most_common()
        if rest and rest[0][1] == n_top:
            skipped["raters_tied"] += 1
            continue
        if top == "same":
            skipped["judged_same"] += 1
            continue
        win, lose = (cs[0]["x"], cs[0]["y"]) if top == "x" else (cs[0]["y"], cs[0]["x"])
        uid = cs[0]["utt_id"]
        rw, rl = row_of(win, uid), row_of(lose, uid)
        if rw is None or rl is None:
            skipped["row_missing"] += 1
            log.info("listen pairs: no eval row for %s in %s or %s; item %s skipped", uid, win[0], lose[0], item)
            continue
        if not isinstance(rw.get("codes"), list) or not isinstance(rl.get("codes"), list):
            skipped["no_codes"] += 1
            log.info("listen pairs: the eval rows of %s carry no `codes` (runs evaluated before codes were "
                     "saved); item %s skipped", uid, item)
            continue
        chosen, rejected = [int(t) for t in rw["codes"]], [int(t) for t in rl["codes"]]
        pairs.append({"id": uid, "text": rw.get("text"), "speaker": rw.get("speaker"), "prompt_id": rw.get("prompt_id"),
                      "prompt_audio": rw.get("prompt_audio"), "chosen_codes": chosen, "rejected_codes": rejected, "keep": True,
                      "scores": {"token_distance": token_distance(chosen, rejected),
                                 "length_ratio": len(rejected) / max(1, len(chosen)),
                                 "votes": n_top, "n_judgments": len(cs)},
                      "source": "human",
                      "judged": {"item": item, "chosen": win[0], "rejected": lose[0], "runs": [win[1], lose[1]],
                                 "rounds": [win[2], lose[2]]}})
    log.info("listen pairs: %d pairs from %d judged items%s", len(pairs), len(by_item),
             "".join(f"; {n} skipped ({why})" for why, n in sorted(skipped.items())))
    return pairs
