"""What a cached result depends on, as short hex digests: files, directories and the code that computes it.

    dir_digest(policy_dir)            the files of a directory (names and bytes), computed once per process
    file_digest(path)                 one file's bytes, computed once per (path, size, mtime)
    code_digest()                     this package's source (align/, models/, eval/) and the versions of the
                                      libraries that compute what the caches hold

A cache keyed on these cannot be read by code that would compute something else: a change to the sampler,
the renderer or an ASR wrapper changes ``code_digest()``, another policy changes ``dir_digest``. The whole
package is digested rather than a hand-kept list of modules per stage: a list goes stale the day a stage
starts calling a module it did not call before, and a cache recomputed once after a code change costs
minutes, while one read stale costs a wrong table.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

# The project's packages: every stage's batches are computed by code in these.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "models", "eval")
# Libraries whose version changes what a stage computes (sampling, rendering, scoring).
LIBRARIES = ("torch", "transformers", "trl", "peft", "numpy", "scipy", "librosa", "soundfile", "jiwer",
             "pocketsphinx", "resemblyzer", "speechbrain", "speechmos", "onnxruntime", "encodec", "tokenizers")


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4096)
def _file_digest(key: tuple) -> str:
    h = hashlib.sha1()
    with open(key[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha1 of a file's bytes (hex), read once per (path, size, mtime) in this process."""
    return _file_digest(_stat_key(Path(path)))


def file_key(path: str | os.PathLike) -> str:
    """``file_digest`` for a cache key, or ``missing:<path>`` for a file that is not there (a stage that needs it
    fails on its own terms; the key only has to differ from any present file's)."""
    return file_digest(path) if Path(path).is_file() else f"missing:{path}"


@functools.lru_cache(maxsize=256)
def _dir_digest(key: tuple) -> str:
    root, listing = key
    h = hashlib.sha1()
    for rel, size, mtime in listing:
        h.update(rel.encode())
        h.update(_file_digest((str(Path(root) / rel), size, mtime)).encode())
    return h.hexdigest()


def dir_digest(path: str | os.PathLike) -> str:
    """sha1 over a directory's files (relative names and contents), hex.

    Each file is read once per process (memoised on its size and mtime): a stage that keys several caches on the
    same policy directory (sample, judge, evaluate, validation) reads its weights once, not once per call; at a
    7B policy that is 14 GB per read. A file rewritten in place (new mtime or size) is read again."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    listing = []
    for f in sorted(root.rglob("*")):
        if f.is_file():
            st = f.stat()
            listing.append((str(f.relative_to(root)), st.st_size, st.st_mtime_ns))
    return _dir_digest((str(root), tuple(listing)))


def source_files(root: str | os.PathLike = PACKAGE_ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """The ``.py`` files of ``packages`` under ``root``, sorted."""
    root = Path(root)
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each library (None where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def code_digest(root: str | os.PathLike = PACKAGE_ROOT, packages: tuple[str, ...] = PACKAGES) -> str:
    """sha1 (hex, 16 digits) of the source files of ``packages`` (relative names and bytes) and
    ``library_versions()``. Computed once per process for the installed package (``root`` left at its default)."""
    if Path(root).resolve() == PACKAGE_ROOT:
        return _installed_code_digest(tuple(packages))
    return _code_digest(Path(root), tuple(packages))


@functools.lru_cache(maxsize=8)
def _installed_code_digest(packages: tuple[str, ...]) -> str:
    return _code_digest(PACKAGE_ROOT, packages)


def _code_digest(root: Path, packages: tuple[str, ...]) -> str:
    import json

    h = hashlib.sha1()
    for f in source_files(root, packages):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    h.update(json.dumps(library_versions(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def machine() -> str:
    """The CPU model (lscpu) and core count, e.g. "AMD EPYC, 2 cores": beside every time and recorded reference."""
    import platform
    import subprocess

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores"
