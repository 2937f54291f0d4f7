"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every writer in verydeep goes through :func:`atomic_path`: the bytes go to a temporary file in
the same folder (``os.replace`` is atomic only within one file system), which replaces the
target only once it is complete. A crash or a kill leaves at most a temporary file whose name
matches :data:`TEMP_GLOB`, which :func:`remove_stale` clears; concurrent writers of one target
never share a temporary file (the name carries the process id and a random tag).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The names of temporary files left behind by an interrupted write (in the target's folder).
TEMP_GLOB = ".*.tmp-*"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path`` that keeps its suffix (``.fc7.npz.tmp-123-ab12cd34.npz``):
    writers that infer the format from the suffix (numpy, matplotlib, onnx) see the right one."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``,
    on any error (or interrupt) it is removed and ``path`` is left as it was.

    ``durable`` also survives a power cut, not only a killed process: the bytes are flushed to
    disk before the rename, and the rename itself after (for checkpoints and converted weights).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.exists():  # writers that create private files (safetensors: 0600) get the usual mode
            os.chmod(tmp, _usual_mode())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _usual_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; a no-op where folders cannot be opened."""
    if path.is_dir() and sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (strict JSON: NaN and infinities are refused)."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files an interrupted write left in ``folder``; return them."""
    found = sorted(Path(folder).glob(TEMP_GLOB)) if Path(folder).is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found
