"""``speechalign cache``: what the stage caches hold, and pruning what can never be read again.

    speechalign cache                       # one line per entry: kind, batches, size, created, current?
    speechalign cache --prune               # remove entries no current code can read
    speechalign cache --prune --older-than 30   # ... and every entry older than 30 days
    speechalign cache --prune --all         # every stage cache entry

The stage caches (``Context.store``: ``samples/``, ``judge/``, ``evals/`` under ``cache_dir``) are keyed on the
code that computed them (``models.digest.code_digest``), so an entry made by other code is never read again:
it only takes disk. Entries from before the key carried the code (no ``meta.json``) are of that kind too.
The corpus, codecs and encoded golden codes (``codecs/``, ``codes/``) are not listed here.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("speechalign.cache")

STAGE_CACHES = ("samples", "judge", "evals")


@dataclass
class CacheEntry:
    kind: str
    path: Path
    batches: int
    bytes: int
    created: str | None      # from meta.json; None for entries written before it existed
    code_digest: str | None
    policy_dir: str | None

    def readable(self, current_code: str) -> bool:
        """Whether code with ``current_code`` could ever read this entry."""
        return self.code_digest == current_code

    def age_days(self) -> float:
        return (time.time() - self.path.stat().st_mtime) / 86400


def entries(cache_dir: str | Path) -> list[CacheEntry]:
    """Every stage-cache entry under ``cache_dir``, by kind then path."""
    from models.io import read_json

    out = []
    for kind in STAGE_CACHES:
        for folder in sorted((Path(cache_dir) / kind).glob("*")):
            if not folder.is_dir() or ".tmp" in folder.name:
                continue
            meta = {}
            if (folder / "meta.json").is_file():
                try:
                    meta = read_json(folder / "meta.json")
                except ValueError:
                    meta = {}
            files = [f for f in folder.rglob("*") if f.is_file()]
            out.append(CacheEntry(kind, folder, sum(1 for f in folder.glob("*-*.json")),
                                  sum(f.stat().st_size for f in files), meta.get("created"), meta.get("code_digest"),
                                  meta.get("policy_dir")))
    return out


def prune(cache_dir: str | Path, *, older_than_days: float | None = None, everything: bool = False,
          dry_run: bool = False) -> list[CacheEntry]:
    """Remove the entries no current code can read (and, with ``older_than_days``, every older one; with
    ``everything``, all of them). Returns the removed (or, with ``dry_run``, the removable) entries."""
    from models.digest import code_digest

    current = code_digest()
    gone = []
    for e in entries(cache_dir):
        if everything or not e.readable(current) or (older_than_days is not None and e.age_days() > older_than_days):
            gone.append(e)
            if not dry_run:
                shutil.rmtree(e.path, ignore_errors=True)
    return gone


def describe(cache_dir: str | Path) -> str:
    """A table of the entries, with the totals and what ``--prune`` would free."""
    from models.digest import code_digest

    current = code_digest()
    rows = entries(cache_dir)
    lines = [f"stage caches in {cache_dir} (current code {current}):",
             f"{'kind':8} {'batches':>7} {'MB':>9}  {'created':19}  {'code':16}  readable  entry"]
    for e in rows:
        lines.append(f"{e.kind:8} {e.batches:7d} {e.bytes / 1e6:9.2f}  {e.created or '-':19}  {e.code_digest or '-':16}  "
                     f"{'yes' if e.readable(current) else 'no':8}  {e.path.name}")
    stale = [e for e in rows if not e.readable(current)]
    lines.append(f"{len(rows)} entries, {sum(e.bytes for e in rows) / 1e6:.1f} MB; {len(stale)} made by other code "
                 f"({sum(e.bytes for e in stale) / 1e6:.1f} MB): `speechalign cache --prune` removes them")
    return "\n".join(lines)
