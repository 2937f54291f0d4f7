"""Training data: ImageFolder scanning, the per-epoch order, and a loader that skips bad images.

The order of an epoch is a permutation drawn from (seed, epoch); step k of the epoch takes the
global batch ``perm[k*B:(k+1)*B]``; each rank takes its contiguous share of it and cuts that
into micro-batches for gradient accumulation. So the images of a step, and (with the
per-image seeds of :mod:`verydeep.data.augment`) their crops, are the same for any number of
ranks, accumulation steps or workers, and a resumed run knows where to restart from the step
number alone. The last incomplete global batch of an epoch is dropped, as the paper's fixed
batch of 256 implies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from verydeep.core.distributed import Context, shard
from verydeep.data.images import TRANSFORM_ERRORS, Failed, find_images, reason_of
from verydeep.data.preprocess import to_uint8_chw
from verydeep.errors import VerydeepError


@dataclass(frozen=True)
class ImageFolder:
    """``root/<class>/**/<image>``: class names are the sorted sub-folder names."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index)

    def __len__(self) -> int:
        return len(self.samples)


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolder:
    """Index an ImageFolder. With ``classes`` (the training set's), labels follow that order and
    every sub-folder must be one of them (a validation set may hold a subset)."""
    root = Path(root)
    if not root.is_dir():
        raise VerydeepError(f"{root}: not a folder (expected an ImageFolder: one sub-folder of images per class)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise VerydeepError(f"{root}: no class sub-folders (expected {root}/<class>/<image>.jpg)")
    names = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in names]
    if unknown:
        raise VerydeepError(f"{root}: class folder {unknown[0]!r} is not a class of the training set")
    index = {c: i for i, c in enumerate(names)}
    samples = [(str(p), index[c]) for c in found for p in find_images(root / c)]
    if not samples:
        raise VerydeepError(f"{root}: no images in the class folders")
    return ImageFolder(root, names, samples)


@dataclass(frozen=True)
class Item:
    """One decoded, transformed training image."""

    crop: torch.Tensor  # uint8 3 x crop x crop RGB
    shift: torch.Tensor  # float32 RGB colour shift, added on the device
    label: int


class LabelledImages(Dataset):
    """Keys are ``(epoch, index)`` so the transform can seed its random numbers per image.

    Returns ``(index, Item)`` or ``(index, Failed)``: an unreadable image never raises here.
    """

    def __init__(self, folder: ImageFolder, transform: Callable[[torch.Tensor, int, int], tuple]):
        self.samples = folder.samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Item | Failed]:
        epoch, i = key
        path, label = self.samples[i]
        try:
            crop, shift = self.transform(to_uint8_chw(path), epoch, i)
            return i, Item(crop, shift, label)
        except TRANSFORM_ERRORS as e:  # a bad image or a failed transform: a Failed record
            return i, Failed(i, path, reason_of(e, path))


@dataclass(frozen=True)
class Batch:
    indices: list[int]
    crops: torch.Tensor  # uint8 N x 3 x c x c
    shifts: torch.Tensor  # float32 N x 3
    labels: torch.Tensor  # int64 N
    failed: list[Failed] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    def pin_memory(self) -> Batch:
        return Batch(
            self.indices, self.crops.pin_memory(), self.shifts.pin_memory(), self.labels.pin_memory(), self.failed
        )


def collate(items: list[tuple[int, Item | Failed]], crop: int) -> Batch:
    good = [(i, x) for i, x in items if isinstance(x, Item)]
    failed = [x for _, x in items if isinstance(x, Failed)]
    if not good:
        return Batch(
            [],
            torch.empty(0, 3, crop, crop, dtype=torch.uint8),
            torch.empty(0, 3),
            torch.empty(0, dtype=torch.long),
            failed,
        )
    return Batch(
        [i for i, _ in good],
        torch.stack([x.crop for _, x in good]),
        torch.stack([x.shift for _, x in good]),
        torch.tensor([x.label for _, x in good], dtype=torch.long),
        failed,
    )


class _Collate:
    """Picklable collate function (workers may be spawned)."""

    def __init__(self, crop: int):
        self.crop = crop

    def __call__(self, items: list) -> Batch:
        return collate(items, self.crop)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training set in ``epoch``: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def accumulation(batch_size: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) so that micro * steps * ranks = batch_size."""
    if batch_size % world_size:
        raise VerydeepError(f"batch_size: {batch_size} is not divisible by the {world_size} ranks")
    per_rank = batch_size // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise VerydeepError(
            f"micro_batch: {micro} does not divide the per-rank batch {per_rank} "
            f"(batch_size {batch_size} / {world_size} ranks)"
        )
    return micro, per_rank // micro


def micro_batches(
    n: int, batch_size: int, micro: int, ctx: Context, seed: int, epoch: int, start_step: int = 0
) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of ``(epoch, index)`` keys for steps ``start_step..`` of ``epoch``."""
    perm = epoch_permutation(n, seed, epoch).tolist()
    per_rank = batch_size // ctx.world_size
    out = []
    for step in range(start_step, steps_per_epoch(n, batch_size)):
        mine = perm[step * batch_size + ctx.rank * per_rank :][:per_rank]
        out += [[(epoch, i) for i in mine[j : j + micro]] for j in range(0, per_rank, micro)]
    return out


def val_batches(n: int, batch: int, ctx: Context) -> list[list[tuple[int, int]]]:
    """This rank's contiguous share of the validation set, in batches (every image once)."""
    mine = list(shard(n, ctx))
    return [[(0, i) for i in mine[j : j + batch]] for j in range(0, len(mine), batch)]


def make_loader(
    dataset: Dataset, batches: list[list[tuple[int, int]]], crop: int, workers: int, pin_memory: bool
) -> DataLoader:
    """Decode in ``workers`` processes, in the given order, ``prefetch`` batches ahead each."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_Collate(crop),
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
