"""Feature extraction for many images: batched, resumable, sharded under torchrun.

The job is cut into *chunks* of consecutive input images. Each chunk's features go to the run's
:class:`~verydeep.core.store.ChunkStore`, ``OUT.parts/chunk-NNNNNNN.npz`` (atomically), as soon
as it is done, so a killed run loses at most the chunk in flight and ``resume=True`` continues
with the missing chunks. Under torchrun every rank takes a contiguous range of chunks
(:func:`verydeep.core.distributed.shard`); rank 0 then merges all chunks in input order into
``OUT`` (streaming, one chunk in memory at a time, :mod:`.writers`) and removes the parts.
Batches never straddle chunks, so the batches, and therefore the numbers, are the same whether
a run was interrupted, resumed or sharded.

An image that cannot be decoded is skipped: its row is absent (never a row of zeros), and it is
listed in the result and in ``OUT.failed.tsv``.

One run per output: a run holds ``OUT.lock`` (:func:`verydeep.core.store.output_lock`) from before
it looks at ``OUT`` until it has written it, so a second run on the same output refuses at once
rather than sharing (or deleting) the first one's parts. The request is checked first: the crop
the layers can use (fc6 and later need pool5 at 7x7), a ``size`` that covers the crop.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from verydeep.configs import CROP, POOL5_SIZE
from verydeep.core import distributed
from verydeep.core.atomic import write_json, write_text
from verydeep.core.defaults import check_inference_precision, default_workers
from verydeep.core.store import ChunkStore, check_same_run, model_fingerprint, output_lock
from verydeep.data.images import Failed, ImageDataset, collate_skipping, failed_from_json, failed_to_json
from verydeep.data.preprocess import RESIZE, center_crop_caffe
from verydeep.errors import VerydeepError
from verydeep.extract.writers import WRITERS, Features, read_features, write_features

#: Spatial pooling of 4-D taps (conv/relu/pool maps) to one vector per image.
POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda t: t,
    "avg": lambda t: t.mean(dim=(2, 3)),
    "max": lambda t: t.amax(dim=(2, 3)),
}
#: Size a chunk aims for when not given (features held in memory before writing).
CHUNK_BYTES = 256 << 20
MAX_CHUNK = 4096
#: The run's manifest keys as users know them (the flags that set them; see check_same_run).
OPTIONS = {
    "layers": "--layer",
    "pool": "--pool",
    "size": "--size",
    "crop": "--crop",
    "precision": "--precision",
}
#: Keys of a stored chunk besides its layers: the rows' input positions, and the failures.
_INDEX, _FAILED = "__index__", "__failed__"


@dataclass(frozen=True)
class ExtractResult:
    output: str
    images: int  # inputs
    rows: int  # rows written (images - failed)
    shapes: dict[str, tuple[int, ...]]  # per row, by layer
    failed: list[Failed] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # everything written (output and sidecars)
    chunks_reused: int = 0  # chunks found done by an earlier run (resume)

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "images": self.images,
            "rows": self.rows,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "failed": [{"path": f.path, "reason": f.reason} for f in self.failed],
            "files": self.files,
            "chunks_reused": self.chunks_reused,
        }


# -- the job ------------------------------------------------------------------------------------
def extract(
    model: Any,
    inputs: Sequence[str | os.PathLike[str]],
    layers: Sequence[str],
    out: str | os.PathLike[str],
    *,
    pool: str = "none",
    batch_size: int = 32,
    workers: int | None = None,
    size: int = RESIZE,
    crop: int = CROP,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    precision: str = "fp32",
    chunk_size: int | None = None,
    ctx: distributed.Context | None = None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
) -> ExtractResult | None:
    """Features of ``layers`` (Caffe names) for the images ``inputs`` into ``out``.

    Images are preprocessed like classification: shorter side to ``size``, central ``crop``
    square, Caffe space. ``pool`` reduces 4-D maps to vectors (fc layers are vectors already).
    ``precision="int8"`` needs ``calibration`` (Caffe-space images, see ``model.optimized``).
    Returns the result on rank 0 (None on other ranks). See the module docstring for files.
    """
    out = Path(out)
    layers = list(dict.fromkeys(layers))
    _check_request(model, layers, out, pool, precision)
    _check_geometry(model, layers, size, crop)
    paths = [str(p) for p in inputs]
    if not paths:
        raise VerydeepError("no input images")
    ctx = ctx or distributed.Context()
    with output_lock(out, ctx):  # one run per output: a second one refuses at once
        store = parts_store(out)
        if out.exists() and not (resume or overwrite or store.exists()):
            raise VerydeepError(f"{out}: exists; pass --resume to report it (same run), or --overwrite to replace it")
        dev = torch.device(distributed.device_for(ctx, device))
        model = model.to(dev).eval()
        shapes = _row_shapes(model, layers, pool, crop, dev)
        manifest: dict[str, Any] = {
            "version": 1,
            "inputs": len(paths),
            "inputs_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
            "layers": layers,
            "pool": pool,
            "size": size,
            "crop": crop,
            "precision": precision,
            "weights": model_fingerprint(model),
            "output": out.suffix.lower(),
            "chunk": chunk_size or _auto_chunk(shapes, batch_size),
        }
        if resume and out.exists() and not store.exists() and not overwrite:  # an earlier run completed
            saved = _run_record(out)
            check_same_run(
                saved,
                manifest,
                where=str(out),
                adopt=("chunk",),
                remedy="pass --overwrite to replace it",
                options=OPTIONS,
            )
            return _finished(out, layers, len(paths))
        # The chunk size of the earlier run wins: the chunks already written fix it.
        manifest = store.begin(manifest, resume=resume, overwrite=overwrite, ctx=ctx, adopt=("chunk",))
        chunk = int(manifest["chunk"])
        n_chunks = math.ceil(len(paths) / chunk)
        done = store.done()
        mine = [k for k in distributed.shard(n_chunks, ctx) if k not in done]
        _run_chunks(
            model,
            paths,
            layers,
            store,
            mine,
            chunk=chunk,
            batch_size=batch_size,
            workers=default_workers(workers),
            size=size,
            crop=crop,
            pool=pool,
            dev=dev,
            precision=precision,
            calibration=calibration,
            progress=progress and ctx.is_main,
        )
        store.synchronize(ctx)
        if not ctx.is_main:
            return None
        reused = n_chunks - len(mine) if not ctx.distributed else 0
        return merge(out, store, paths, layers, shapes, n_chunks=n_chunks, manifest=manifest, reused=reused)


def parts_store(out: Path) -> ChunkStore:
    """Where a run writing ``out`` keeps its chunks: ``OUT.parts/``."""
    return ChunkStore(
        out.with_name(out.name + ".parts"), start_over="pass --overwrite to start over", name=str(out), options=OPTIONS
    )


def _check_request(model: Any, layers: list[str], out: Path, pool: str, precision: str) -> None:
    if not layers:
        raise VerydeepError("give at least one --layer (e.g. fc7, pool5, relu4_3)")
    names = getattr(model, "layer_names", None)
    if names is None:
        raise VerydeepError(f"feature extraction needs a Table 1 VGG; found a {type(model).__name__}")
    unknown = [t for t in layers if t not in names]
    if unknown:
        raise VerydeepError(f"unknown layer {unknown[0]!r}; layers: {', '.join(names)}")
    if out.suffix.lower() not in WRITERS:
        raise VerydeepError(f"{out}: unknown output format {out.suffix or '(no suffix)'!r}; use {', '.join(WRITERS)}")
    if out.suffix.lower() == ".npy" and len(layers) != 1:
        raise VerydeepError(f"{out}: a .npy file holds one layer, {len(layers)} requested; use .npz, .parquet or .h5")
    if pool not in POOLS:
        raise VerydeepError(f"unknown pooling {pool!r}; use {', '.join(POOLS)}")
    check_inference_precision(precision)


def _check_geometry(model: Any, layers: list[str], size: int, crop: int) -> None:
    """The crop the layers can use, and a rescaled image that covers it (no padding)."""
    lo, hi, why = _crop_range(model, layers)
    if not lo <= crop <= hi:
        allowed = f"{lo}..{hi}" if hi < sys.maxsize else f"at least {lo}"
        raise VerydeepError(f"--crop {crop}: {why} needs a crop of {allowed}")
    if size < crop:
        raise VerydeepError(
            f"--size {size} is smaller than --crop {crop}: the crop would be mostly padding; "
            f"use --size {crop} or more (the shorter side before cropping)"
        )


def _crop_range(model: Any, layers: list[str]) -> tuple[int, int, str]:
    """(smallest, largest crop, which layer sets them): fc6 and the layers after it take pool5 at
    exactly 7x7, so the crop must round up to 7 through the pools before it (193..224 for
    Table 1's five); convolutions and pools take any size of at least one pixel."""
    specs = list(getattr(model, "specs", []))
    kinds = [s.kind for s in specs]
    if "fc" not in kinds:
        return 1, sys.maxsize, "every layer"
    names = [s.name for s in specs] + ["prob"]
    first_fc = kinds.index("fc")
    needs_fc = [t for t in layers if t in names and names.index(t) >= first_fc]
    if not needs_fc:
        return 1, sys.maxsize, "every layer"
    scale = 2 ** kinds[:first_fc].count("pool")  # Caffe's pools round up: ceil(crop / scale)
    return (POOL5_SIZE - 1) * scale + 1, POOL5_SIZE * scale, f"layer {needs_fc[0]} (fc6 takes pool5 at 7x7)"


def _row_shapes(model: Any, layers: list[str], pool: str, crop: int, dev: torch.device) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of each layer at ``crop`` (one zero image through the net)."""
    with torch.inference_mode():
        feats = model.features(torch.zeros(1, 3, crop, crop, device=dev), taps=layers)
    return {k: tuple(_pooled(v, pool).shape[1:]) for k, v in feats.items()}


def _pooled(t: torch.Tensor, pool: str) -> torch.Tensor:
    return POOLS[pool](t) if t.dim() == 4 else t


def _auto_chunk(shapes: dict[str, tuple[int, ...]], batch_size: int) -> int:
    per_image = 4 * sum(math.prod(s) for s in shapes.values())
    return max(batch_size, min(MAX_CHUNK, CHUNK_BYTES // max(1, per_image)))


# -- the loop -------------------------------------------------------------------------------------
def _run_chunks(
    model: Any,
    paths: list[str],
    layers: list[str],
    store: ChunkStore,
    wanted: list[int],
    *,
    chunk: int,
    batch_size: int,
    workers: int,
    size: int,
    crop: int,
    pool: str,
    dev: torch.device,
    precision: str,
    calibration: torch.Tensor | None,
    progress: bool,
) -> None:
    """Compute and write the chunks ``wanted``; batches are cut within each chunk."""
    from tqdm.auto import tqdm

    plan: list[tuple[int, bool]] = []  # (chunk, last batch of it) per batch
    batches: list[list[int]] = []
    for k in wanted:
        idx = list(range(k * chunk, min(len(paths), (k + 1) * chunk)))
        cut = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        batches += cut
        plan += [(k, i == len(cut) - 1) for i in range(len(cut))]
    if not batches:
        return
    dataset = ImageDataset(paths, partial(center_crop_caffe, size=size, crop=crop))
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_skipping, pin_memory=dev.type == "cuda"
    )
    # fp32: the exact path; bf16/fp16/int8: the fast path (:mod:`verydeep.runtime`), which computes the taps itself
    exact = precision == "fp32" or not hasattr(model, "optimized")
    run = model if exact else model.optimized(precision, device=dev, calibration=calibration)
    bar = tqdm(
        total=sum(len(b) for b in batches),
        unit="img",
        desc="extract",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    indices: list[int] = []
    feats: dict[str, list[np.ndarray]] = {t: [] for t in layers}
    failed: list[Failed] = []
    with bar:
        for (k, last), (idx, x, bad) in zip(plan, loader):
            failed += bad
            if idx:
                with torch.inference_mode():
                    got = run.features(x.to(dev, non_blocking=True), taps=layers)
                for t in layers:
                    feats[t].append(_pooled(got[t], pool).float().cpu().numpy())
                indices += idx
            bar.update(len(idx) + len(bad))
            if last:
                _write_chunk(store, k, indices, feats, failed)
                indices, feats, failed = [], {t: [] for t in layers}, []


def _write_chunk(
    store: ChunkStore, k: int, indices: list[int], feats: dict[str, list[np.ndarray]], failed: list[Failed]
) -> None:
    arrays = {t: np.concatenate(v) if v else np.zeros((0,), np.float32) for t, v in feats.items()}
    arrays[_INDEX] = np.asarray(indices, dtype=np.int64)
    arrays[_FAILED] = np.asarray(failed_to_json(failed))
    store.write(k, arrays)


# -- merging ------------------------------------------------------------------------------------
def merge(
    out: Path,
    store: ChunkStore,
    paths: list[str],
    layers: list[str],
    shapes: dict[str, tuple[int, ...]],
    *,
    n_chunks: int,
    manifest: dict[str, Any],
    reused: int = 0,
) -> ExtractResult:
    """Write every chunk, in input order, into ``out``; remove the parts. Needs all chunks."""
    missing = store.missing(n_chunks)
    if missing:
        raise VerydeepError(
            f"{store.path_of(missing[0])}: missing ({len(missing)} of {n_chunks} chunks); "
            "a rank did not finish: run the same command with --resume"
        )
    chunk = int(manifest["chunk"])
    rows, failed = 0, []
    for k in range(n_chunks):
        images = range(k * chunk, min(len(paths), (k + 1) * chunk))
        index, bad = _chunk_contents(store, k, store.read(k, (_INDEX, _FAILED)), images)
        rows += len(index)
        failed += bad
    if rows == 0:
        raise VerydeepError(
            f"none of the {len(paths)} images could be read (first: {failed[0].path}: {failed[0].reason})"
        )

    def chunks(keys: Sequence[str]) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
        for k in range(n_chunks):
            z = store.read(k, (_INDEX, *keys))
            index = z[_INDEX]
            if len(index):
                for t in keys:
                    if z[t].dtype.kind != "f" or z[t].shape != (len(index), *shapes[t]):
                        raise store.refuse(k, f"layer {t} has {z[t].dtype} rows of {z[t].shape}, expected float")
                yield [paths[i] for i in index], {t: z[t] for t in keys}

    meta = {**manifest, "shapes": {k: list(v) for k, v in shapes.items()}}
    files = write_features(out, Features(rows, layers, shapes, meta, chunks))
    failed_list = out.with_name(out.name + ".failed.tsv")
    if failed:
        write_text(failed_list, "".join(f"{f.path}\t{' '.join(f.reason.split())}\n" for f in failed))
        files.append(str(failed_list))
    else:
        failed_list.unlink(missing_ok=True)
    write_json(_run_record_path(out), manifest)  # what a later --resume checks the finished file against
    files.append(str(_run_record_path(out)))
    store.remove()
    return ExtractResult(str(out), len(paths), rows, shapes, failed, files, chunks_reused=reused)


def _chunk_contents(
    store: ChunkStore, k: int, z: dict[str, np.ndarray], images: range
) -> tuple[np.ndarray, list[Failed]]:
    """A stored chunk's row index and failures, checked to cover exactly its ``images``."""
    index = z[_INDEX]
    try:
        failed = failed_from_json(str(z[_FAILED]))
    except (ValueError, TypeError, RecursionError) as e:
        raise store.refuse(k, f"its list of unreadable images is not JSON records ({type(e).__name__})") from None
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise store.refuse(k, f"its row index is {index.dtype} of shape {index.shape}, not image numbers")
    if sorted([*index.tolist(), *(f.index for f in failed)]) != list(images):
        raise store.refuse(k, f"its rows and failures are not images {images.start}..{images.stop - 1}")
    return index, failed


def _run_record_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def _run_record(out: Path) -> dict[str, Any]:
    """The manifest of the run that wrote ``out`` (a JSON file beside it)."""
    path = _run_record_path(out)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON
        raise VerydeepError(
            f"{out}: exists without {path.name}, the record of the run that wrote it; pass --overwrite to replace it"
        ) from None
    if not isinstance(saved, dict):
        raise VerydeepError(f"{path}: not a run record (a JSON object); pass --overwrite to replace {out}")
    return saved


def _finished(out: Path, layers: list[str], n: int) -> ExtractResult:
    paths, arrays = read_features(out, layers)
    failed_list = out.with_name(out.name + ".failed.tsv")
    failed = []
    if failed_list.exists():
        for line in failed_list.read_text(encoding="utf-8", errors="replace").splitlines():
            p, _, reason = line.partition("\t")
            failed.append(Failed(-1, p, reason))
    shapes = {k: tuple(v.shape[1:]) for k, v in arrays.items()}
    return ExtractResult(str(out), n, len(paths), shapes, failed, [str(out)])
