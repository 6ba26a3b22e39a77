"""Atomic writes: a reader, or a run killed half-way, never sees a half-written file or folder.

    atomic_write_text(path, text)        temp file in the same folder, fsync, rename
    write_json / write_jsonl             the same, for JSON and JSON lines
    with atomic_dir(path) as tmp: ...     fill ``tmp``; on success it replaces ``path`` whole
    BatchStore(folder)                   a stage's finished batches, kept across a crash
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("speechalign.io")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; our outputs should be readable like any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; when the block succeeds it is renamed to ``path``.

    An existing ``path`` is replaced, or, with ``keep_existing=True``, kept and the new folder
    discarded (several processes building the same cache entry: the first one wins). If the block
    raises, the temp folder is removed and ``path`` is untouched. The temp name carries the pid,
    so two processes never write into one temp folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if keep_existing:
            shutil.rmtree(tmp)
            return
        shutil.rmtree(path)
    tmp.rename(path)


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """One dict per non-empty line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """One JSON object per line, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


class BatchStore:
    """A stage's finished batches, one file each, kept across a crash so that a re-run reads them instead of
    redoing them: a killed ``sample``, pair judging or ``evaluate`` loses at most the batch it was on.

    ``get(key)`` -> the stored object or None; ``put(key, obj)`` writes it atomically (JSON; ``torch.save`` is
    not needed: batches hold lists, numbers and strings). Keys are a batch's place in the stage's fixed item list
    (``"0-32"``), so every process of a multi-process run writes its own files into one folder. ``folder=None``
    stores nothing (tests, one-off evaluations). ``clear()`` once the stage's output is committed.
    """

    def __init__(self, folder: str | os.PathLike | None, meta: dict | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.meta = meta  # what the entry was keyed on: written once as meta.json beside the batches

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str):
        """The stored batch, or None when there is none. An entry that cannot be read (a disk error, a file cut
        short outside ``put``'s atomic write) is removed with a warning and reads as missing: the stage computes
        that batch again instead of failing on it at every resume."""
        if self.folder is None or not self._path(key).is_file():
            return None
        path = self._path(key)
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("cache entry %s is unreadable (%s); removed, computing it again", path, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, obj) -> None:
        if self.folder is not None:
            if self.meta is not None and not (self.folder / "meta.json").is_file():
                write_json(self.folder / "meta.json", dict(self.meta, created=time.strftime("%Y-%m-%d %H:%M:%S")))
            atomic_write_text(self._path(key), json.dumps(obj))

    def sub(self, name: str) -> "BatchStore":
        """A store for one part of the stage (an extra test set, the judging of one scorer)."""
        return BatchStore(None if self.folder is None else self.folder / name, self.meta)

    def clear(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
