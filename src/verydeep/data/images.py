"""Image lists and a loader that decodes in worker processes and skips unreadable files.

Long runs (evaluate, extract, train) must not die on one corrupt JPEG among 50,000: a failed
decode becomes a ``Failed`` record that the job counts, lists and reports, never a zero row.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from verydeep.core.defaults import default_workers
from verydeep.data.preprocess import to_uint8_chw
from verydeep.errors import ImageError, VerydeepError

#: File endings treated as images when scanning folders.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder``, recursively, in sorted (deterministic) order."""
    root = Path(folder)
    if not root.is_dir():
        raise VerydeepError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_path_list(source: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """Paths from a list file (first column of each non-empty line; '-' reads stdin)."""
    if str(source) == "-":
        lines = sys.stdin.read().splitlines()
    else:
        lines = Path(source).read_text().splitlines()
    base = Path(root) if root is not None else (Path(source).parent if str(source) != "-" else Path("."))
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line.split()[0]) if not Path(line).exists() else Path(line)
            paths.append(p if p.is_absolute() else base / p)
    return paths


def resolve_inputs(data: str | os.PathLike) -> list[Path]:
    """A folder (scanned), a list file, or '-' (paths on stdin) -> image paths."""
    if str(data) == "-":
        return read_path_list("-")
    p = Path(data)
    if p.is_dir():
        return find_images(p)
    if p.is_file():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return [p]
        return read_path_list(p)
    raise VerydeepError(f"{p}: no such file or folder")


@dataclass(frozen=True)
class Failed:
    """An item that could not be read: its index in the input and why."""

    index: int
    path: str
    reason: str


def failed_to_json(failed: Sequence[Failed]) -> str:
    """``failed`` as JSON text, for the partial results of a resumable job."""
    return json.dumps([[f.index, f.path, f.reason] for f in failed])


def failed_from_json(text: str) -> list[Failed]:
    """The records :func:`failed_to_json` wrote."""
    return [Failed(int(i), str(p), str(r)) for i, p, r in json.loads(text)]


def reason_of(error: Exception, path: str | os.PathLike) -> str:
    """Why an image could not be read, without the path (reports print the path beside it)."""
    return str(error).removeprefix(f"{os.fspath(path)}: ")


class ImageDataset(Dataset):
    """Decodes ``paths[i]`` and applies ``transform`` (uint8 3xHxW RGB -> anything).

    Returns ``(i, transformed)`` or ``(i, Failed)``; never raises for a bad image.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable[[torch.Tensor], Any] | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            image = to_uint8_chw(self.paths[i])
            return i, (self.transform(image) if self.transform else image)
        except (ImageError, OSError, ValueError, RuntimeError) as e:
            return i, Failed(i, self.paths[i], reason_of(e, self.paths[i]))


def collate_skipping(batch: list[tuple[int, Any]]) -> tuple[list[int], Any, list[Failed]]:
    """Stack the good items (tensors of one shape, or lists kept as lists), set aside failures."""
    good = [(i, x) for i, x in batch if not isinstance(x, Failed)]
    failed = [x for _, x in batch if isinstance(x, Failed)]
    indices = [i for i, _ in good]
    items = [x for _, x in good]
    if items and all(isinstance(x, torch.Tensor) for x in items) and len({tuple(x.shape) for x in items}) == 1:
        return indices, torch.stack(items), failed
    return indices, items, failed


def loader(
    dataset: Dataset,
    batch_size: int,
    workers: int | None = None,
    indices: Iterable[int] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``indices`` (default all) in order, decoding in worker processes."""
    workers = default_workers(workers)
    subset: Dataset = torch.utils.data.Subset(dataset, list(indices)) if indices is not None else dataset
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
