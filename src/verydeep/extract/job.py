"""Feature extraction for many images: batched, resumable, sharded under torchrun.

The job is cut into *chunks* of consecutive input images. Each chunk's features are written to
``OUT.parts/chunk-NNNNNNN.npz`` (atomically) as soon as it is done, so a killed run loses at
most the chunk in flight and ``resume=True`` continues with the missing chunks. Under torchrun
every rank takes a contiguous range of chunks (:func:`verydeep.core.distributed.shard`); rank 0 then
merges all chunks in input order into ``OUT`` (streaming, one chunk in memory at a time) and
removes the parts. Batches never straddle chunks, so the batches, and therefore the numbers,
are the same whether a run was interrupted, resumed or sharded.

An image that cannot be decoded is skipped: its row is absent (never a row of zeros), and it is
listed in the result and in ``OUT.failed.tsv``.

Output by suffix: ``.npy`` (one layer; the row order's paths in ``OUT.paths.txt``), ``.npz``
(one array per layer plus ``path``), ``.parquet`` (a ``path`` column and one fixed-size-list
column per layer, shapes in the schema metadata), ``.h5`` (a dataset per layer plus ``path``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from verydeep.configs import CROP
from verydeep.core import distributed
from verydeep.data.images import Failed, ImageDataset, collate_skipping
from verydeep.data.preprocess import RESIZE, center_crop_caffe
from verydeep.errors import VerydeepError

#: Spatial pooling of 4-D taps (conv/relu/pool maps) to one vector per image.
POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda t: t,
    "avg": lambda t: t.mean(dim=(2, 3)),
    "max": lambda t: t.amax(dim=(2, 3)),
}
#: Size a chunk aims for when not given (features held in memory before writing).
CHUNK_BYTES = 256 << 20
MAX_CHUNK = 4096
_PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MANIFEST = "manifest.json"


@dataclass
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
    inputs: Sequence[str | os.PathLike],
    layers: Sequence[str],
    out: str | os.PathLike,
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
) -> ExtractResult | None:
    """Features of ``layers`` (Caffe names) for the images ``inputs`` into ``out``.

    Images are preprocessed like classification: shorter side to ``size``, central ``crop``
    square, Caffe space. ``pool`` reduces 4-D maps to vectors (fc layers are vectors already).
    Returns the result on rank 0 (None on other ranks). See the module docstring for files.
    """
    out = Path(out)
    layers = list(dict.fromkeys(layers))
    _check_request(model, layers, out, pool, precision)
    paths = [str(p) for p in inputs]
    if not paths:
        raise VerydeepError("no input images")
    ctx = ctx or distributed.Context()
    parts = _parts_dir(out)
    if resume and out.exists() and not parts.exists():
        return _finished(out, layers, len(paths))  # an earlier run completed: nothing to do
    dev = torch.device(distributed.device_for(ctx, device))
    model = model.to(dev).eval()
    shapes = _row_shapes(model, layers, pool, crop, dev)
    manifest = {
        "version": 1,
        "inputs": len(paths),
        "inputs_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "layers": layers,
        "pool": pool,
        "size": size,
        "crop": crop,
        "precision": precision,
        "weights": _fingerprint(model),
        "output": out.suffix.lower(),
        "chunk": chunk_size or _auto_chunk(shapes, batch_size),
    }
    if ctx.is_main:
        _prepare(out, parts, manifest, resume, overwrite)
    _barrier(ctx)
    manifest = _agree(parts, manifest)
    chunk = manifest["chunk"]
    n_chunks = math.ceil(len(paths) / chunk)
    mine = [k for k in distributed.shard(n_chunks, ctx) if not _chunk_path(parts, k).exists()]
    reused = n_chunks - len(mine) if not ctx.distributed else 0
    _run_chunks(
        model,
        paths,
        layers,
        pool,
        parts,
        mine,
        chunk,
        batch_size,
        workers,
        size,
        crop,
        dev,
        precision,
        progress and ctx.is_main,
    )
    _barrier(ctx)
    if not ctx.is_main:
        return None
    result = merge(out, parts, paths, layers, shapes, n_chunks)
    result.chunks_reused = reused
    return result


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
    if precision not in _PRECISION:
        raise VerydeepError(f"unknown precision {precision!r}; use {', '.join(_PRECISION)}")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:07d}.npz"


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


def _fingerprint(model: Any) -> str:
    """A cheap identity of the weights: shapes and a strided sample of every tensor."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).numpy()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _prepare(out: Path, parts: Path, manifest: dict[str, Any], resume: bool, overwrite: bool) -> None:
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    elif parts.exists() and not resume:
        raise VerydeepError(
            f"{parts}: an earlier run's partial results; pass --resume to continue or --overwrite to start over"
        )
    elif out.exists() and not resume:
        raise VerydeepError(f"{out}: exists; pass --overwrite to replace it")
    parts.mkdir(parents=True, exist_ok=True)
    if not (parts / _MANIFEST).exists():
        _atomic_write_text(parts / _MANIFEST, json.dumps(manifest, indent=1))


def _agree(parts: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The run's manifest; a resumed run must ask for exactly what the earlier one did."""
    path = parts / _MANIFEST
    if not path.exists():  # a rank started on its own (no process group): it may create it
        parts.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, json.dumps(manifest, indent=1))
    found = json.loads(path.read_text())
    for key, value in manifest.items():
        if key != "chunk" and found.get(key) != value:
            raise VerydeepError(
                f"{path}: the earlier run used {key}={found.get(key)!r}, this one {value!r}; "
                "use the same inputs and options to resume, or --overwrite to start over"
            )
    return found


def _barrier(ctx: distributed.Context) -> None:
    if ctx.distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _run_chunks(
    model: Any,
    paths: list[str],
    layers: list[str],
    pool: str,
    parts: Path,
    chunks: list[int],
    chunk: int,
    batch_size: int,
    workers: int | None,
    size: int,
    crop: int,
    dev: torch.device,
    precision: str,
    progress: bool,
) -> None:
    """Compute and write the given chunks; batches are cut within each chunk."""
    from tqdm.auto import tqdm

    plan: list[tuple[int, bool]] = []  # (chunk, last batch of it) per batch
    batches: list[list[int]] = []
    for k in chunks:
        idx = list(range(k * chunk, min(len(paths), (k + 1) * chunk)))
        cut = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        batches += cut
        plan += [(k, i == len(cut) - 1) for i in range(len(cut))]
    if not batches:
        return
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    dataset = ImageDataset(paths, partial(center_crop_caffe, size=size, crop=crop))
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_skipping, pin_memory=dev.type == "cuda"
    )
    # fp32: the exact path; bf16/fp16: the fast path (:mod:`verydeep.runtime`), which computes the taps itself
    run = model if precision == "fp32" or not hasattr(model, "optimized") else model.optimized(precision, device=dev)
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
                _write_chunk(_chunk_path(parts, k), indices, feats, failed)
                indices, feats, failed = [], {t: [] for t in layers}, []


def _write_chunk(path: Path, indices: list[int], feats: dict[str, list[np.ndarray]], failed: list[Failed]) -> None:
    arrays = {t: np.concatenate(v) if v else np.zeros((0,), np.float32) for t, v in feats.items()}
    arrays["__index__"] = np.asarray(indices, dtype=np.int64)
    arrays["__failed__"] = np.asarray(json.dumps([[f.index, f.path, f.reason] for f in failed]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


# -- merging ------------------------------------------------------------------------------------


def merge(
    out: Path, parts: Path, paths: list[str], layers: list[str], shapes: dict[str, tuple[int, ...]], n_chunks: int
) -> ExtractResult:
    """Write every chunk, in input order, into ``out``; remove the parts. Needs all chunks."""
    missing = [k for k in range(n_chunks) if not _chunk_path(parts, k).exists()]
    if missing:
        raise VerydeepError(
            f"{_chunk_path(parts, missing[0])}: missing ({len(missing)} of {n_chunks} chunks); "
            "a rank did not finish: run the same command with --resume"
        )
    rows, failed = 0, []
    for k in range(n_chunks):
        with np.load(_chunk_path(parts, k)) as z:
            rows += len(z["__index__"])
            failed += [Failed(*f) for f in json.loads(str(z["__failed__"]))]
    if rows == 0:
        raise VerydeepError(
            f"none of the {len(paths)} images could be read (first: {failed[0].path}: {failed[0].reason})"
        )

    def chunks(keys: Sequence[str]) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
        for k in range(n_chunks):
            with np.load(_chunk_path(parts, k)) as z:
                idx = z["__index__"]
                if len(idx):
                    yield [paths[i] for i in idx], {t: z[t] for t in keys}

    suffix = out.suffix.lower()
    meta = json.loads((parts / _MANIFEST).read_text())
    meta["shapes"] = {k: list(v) for k, v in shapes.items()}
    tmp = out.with_name(out.name + ".tmp")
    files = WRITERS[suffix](tmp, out, rows, layers, shapes, meta, chunks)
    os.replace(tmp, out)
    files.insert(0, str(out))
    failed_list = out.with_name(out.name + ".failed.tsv")
    if failed:
        _atomic_write_text(failed_list, "".join(f"{f.path}\t{' '.join(f.reason.split())}\n" for f in failed))
        files.append(str(failed_list))
    else:
        failed_list.unlink(missing_ok=True)
    shutil.rmtree(parts)
    return ExtractResult(str(out), len(paths), rows, shapes, failed, files)


def _finished(out: Path, layers: list[str], n: int) -> ExtractResult:
    paths, arrays = read_features(out, layers)
    failed_list = out.with_name(out.name + ".failed.tsv")
    failed = []
    if failed_list.exists():
        for line in failed_list.read_text().splitlines():
            p, _, reason = line.partition("\t")
            failed.append(Failed(-1, p, reason))
    shapes = {k: tuple(v.shape[1:]) for k, v in arrays.items()}
    return ExtractResult(str(out), n, len(paths), shapes, failed, [str(out)])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- writers: (tmp, final, rows, layers, shapes, meta, chunks) -> extra files written -----------

Chunks = Callable[[Sequence[str]], Iterator[tuple[list[str], dict[str, np.ndarray]]]]


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _write_npy(
    tmp: Path, final: Path, rows: int, layers: list[str], shapes: dict, meta: dict, chunks: Chunks
) -> list[str]:
    (layer,) = layers
    names: list[str] = []
    with open(tmp, "wb") as f:
        f.write(_npy_header((rows, *shapes[layer]), np.float32))
        for p, arrays in chunks([layer]):
            f.write(np.ascontiguousarray(arrays[layer], dtype="<f4").tobytes())
            names += p
    listing = final.with_name(final.name + ".paths.txt")
    _atomic_write_text(listing, "".join(f"{p}\n" for p in names))
    return [str(listing)]


def _write_npz(
    tmp: Path, final: Path, rows: int, layers: list[str], shapes: dict, meta: dict, chunks: Chunks
) -> list[str]:
    """An uncompressed .npz written member by member, chunk by chunk (np.load reads it as usual);
    fixed timestamps make the bytes depend on the data only."""
    all_paths = [p for p, _ in chunks([])]
    flat = [p for ps in all_paths for p in ps]
    width = max(1, max(len(p) for p in flat))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        info = zipfile.ZipInfo("path.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with z.open(info, "w", force_zip64=True) as f:
            f.write(_npy_header((rows,), np.dtype(f"<U{width}")))
            f.write(np.asarray(flat, dtype=f"<U{width}").tobytes())
        for layer in layers:
            info = zipfile.ZipInfo(f"{layer}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                f.write(_npy_header((rows, *shapes[layer]), np.float32))
                for _, arrays in chunks([layer]):
                    f.write(np.ascontiguousarray(arrays[layer], dtype="<f4").tobytes())
    return []


def _write_parquet(
    tmp: Path, final: Path, rows: int, layers: list[str], shapes: dict, meta: dict, chunks: Chunks
) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise VerydeepError(f"{final}: writing .parquet needs pyarrow (pip install pyarrow)") from None
    dims = {t: math.prod(shapes[t]) for t in layers}
    schema = pa.schema(
        [pa.field("path", pa.string())] + [pa.field(t, pa.list_(pa.float32(), dims[t])) for t in layers],
        metadata={"verydeep": json.dumps(meta)},
    )
    with pq.ParquetWriter(str(tmp), schema) as writer:
        for p, arrays in chunks(layers):
            columns = [pa.array(p, pa.string())]
            for t in layers:
                values = pa.array(np.ascontiguousarray(arrays[t], dtype=np.float32).reshape(-1))
                columns.append(pa.FixedSizeListArray.from_arrays(values, dims[t]))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return []


def _write_h5(
    tmp: Path, final: Path, rows: int, layers: list[str], shapes: dict, meta: dict, chunks: Chunks
) -> list[str]:
    try:
        import h5py
    except ImportError:
        raise VerydeepError(f"{final}: writing .h5 needs h5py (pip install h5py)") from None
    with h5py.File(tmp, "w") as f:
        f.attrs["verydeep"] = json.dumps(meta)
        names = f.create_dataset("path", (rows,), dtype=h5py.string_dtype())
        sets = {t: f.create_dataset(t, (rows, *shapes[t]), dtype="f4", chunks=(1, *shapes[t])) for t in layers}
        at = 0
        for p, arrays in chunks(layers):
            names[at : at + len(p)] = p
            for t in layers:
                sets[t][at : at + len(p)] = arrays[t]
            at += len(p)
    return []


WRITERS: dict[str, Callable[..., list[str]]] = {
    ".npy": _write_npy,
    ".npz": _write_npz,
    ".parquet": _write_parquet,
    ".h5": _write_h5,
    ".hdf5": _write_h5,
}


# -- reading back ---------------------------------------------------------------------------------


def read_features(
    path: str | os.PathLike, layers: Sequence[str] | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """(image paths, {layer: N x ... array}) from any file :func:`extract` writes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path)
        listing = path.with_name(path.name + ".paths.txt")
        names = listing.read_text().splitlines() if listing.exists() else []
        return names, {(layers or ["features"])[0]: array}
    if suffix == ".npz":
        with np.load(path) as z:
            keys = layers or [k for k in z.files if k != "path"]
            return [str(p) for p in z["path"]], {k: z[k] for k in keys}
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"verydeep"])
        keys = layers or [n for n in table.column_names if n != "path"]
        out = {}
        for k in keys:
            flat = table.column(k).combine_chunks().flatten().to_numpy()
            out[k] = flat.reshape(table.num_rows, *meta["shapes"][k])
        return table.column("path").to_pylist(), out
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            keys = layers or [k for k in f.keys() if k != "path"]
            return [p.decode() if isinstance(p, bytes) else p for p in f["path"][:]], {k: f[k][:] for k in keys}
    raise VerydeepError(f"{path}: unknown features file {suffix!r}")
