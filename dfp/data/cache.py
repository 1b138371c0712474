"""A disk cache for decoded arrays, so that slow decoding (60,000 JPEGs) happens once.

Each source has one ``.npz`` file, named after a hash of the source's absolute path; inside it
lies the source's signature (every file's path, size and modification time). A changed source has a
different signature, so its stale entry is rebuilt and replaced. Entries are written to a
temporary file and renamed into place, so an interrupted run never leaves a half-written
entry under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# Bump when the arrays stored for a source change meaning, to invalidate every old entry.
CACHE_VERSION = 1
_SIGNATURE_KEY = "__signature__"


def signature(source: Path, files: Iterable[str]) -> str:
    """Identifies the content of ``files`` (``str(source)`` itself or paths beginning with it) by
    path relative to ``source``, size in bytes and modification time (ns)."""
    prefix = len(str(source))
    entries = []
    for path in files:  # plain strings and os.stat: pathlib would take seconds for 60,000 files
        st = os.stat(path)
        entries.append([path[prefix:], st.st_size, st.st_mtime_ns])
    return json.dumps([CACHE_VERSION, sorted(entries)])


def cache_path(cache_dir: Path, name: str, source: Path) -> Path:
    """Where the entry of data set ``name`` read from ``source`` lives."""
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{digest}.npz"


def cached_arrays(
    cache_dir: Path | None,
    name: str,
    source: Path,
    files: Callable[[], Iterable[str]],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """The arrays ``build()`` makes from ``source``, read from the cache while ``files()`` (the files
    ``build`` reads) keep the signature they had when the entry was written.

    ``cache_dir`` None: no cache, ``build()`` runs every time.
    """
    if cache_dir is None:
        return build()
    path = cache_path(cache_dir, name, source)
    sig = signature(source, files())
    arrays = _read(path, sig)
    if arrays is None:
        arrays = build()
        _write_atomically(path, {**arrays, _SIGNATURE_KEY: np.array(sig)})
    return arrays


def _read(path: Path, sig: str) -> dict[str, np.ndarray] | None:
    """The entry's arrays, or None when it is absent, stale or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            if _SIGNATURE_KEY not in entry.files or str(entry[_SIGNATURE_KEY]) != sig:
                return None
            return {key: entry[key] for key in entry.files if key != _SIGNATURE_KEY}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        # Damaged by something outside this module (our own writes are atomic): rebuild it.
        return None


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
