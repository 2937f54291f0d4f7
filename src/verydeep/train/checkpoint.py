"""Checkpoints that survive SIGKILL: written through :func:`verydeep.core.atomic.atomic_file`,
synced to disk before the rename, and the rename synced too.

A reader sees either the previous set of checkpoints or the new one, never half a file; a kill
mid-write leaves a temporary file that :func:`verydeep.core.atomic.remove_stale` clears on
resume. Only the last K are kept. A checkpoint holds plain tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: opening one cannot run code.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from verydeep.core.atomic import atomic_file

PATTERN = re.compile(r"^step-(\d{9})\.pt$")


def path_for(folder: str | os.PathLike[str], step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save(folder: str | os.PathLike[str], step: int, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; delete all but the last ``keep``."""
    folder = Path(folder)
    target = path_for(folder, step)
    with atomic_file(target, durable=True) as f:  # an OS error (disk full) is one line naming target
        torch.save(state, f)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def load_latest(
    folder: str | os.PathLike[str], *, warn: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint (an unreadable one is reported and skipped), or None."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: fall back to the one before
            warn(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); trying the previous one")
    return None


# -- random number generator states ---------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and CUDA generator states, as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    # The legacy form is a tuple (the stubs also allow the dict form, which legacy=True excludes).
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
