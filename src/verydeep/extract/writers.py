"""Feature files by suffix, written chunk by chunk (one chunk in memory), and read back.

``.npy`` (one layer; the row order's paths in ``OUT.paths.txt``), ``.npz`` (one array per layer
plus ``path``), ``.parquet`` (a ``path`` column and one fixed-size-list column per layer, shapes
in the schema metadata), ``.h5``/``.hdf5`` (a dataset per layer plus ``path``). Every file is
written atomically: a reader sees the earlier file or the whole new one.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from verydeep.core.atomic import atomic_path, write_text
from verydeep.core.store import check_npz
from verydeep.data.images import reason
from verydeep.errors import VerydeepError

#: The rows, chunk by chunk in input order: given the layers to load, yields (image paths, {layer: rows}).
Chunks = Callable[[Sequence[str]], Iterator[tuple[list[str], dict[str, np.ndarray]]]]
#: Fixed zip timestamps: an .npz's bytes depend on its data only.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Features:
    """What a writer writes: ``rows`` rows of each of ``layers`` (``shapes`` per row), read from
    ``chunks``; ``meta`` (the run's manifest and shapes) goes into formats with metadata."""

    rows: int
    layers: list[str]
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any]
    chunks: Chunks


def write_features(out: Path, features: Features) -> list[str]:
    """Write ``out`` in the format its suffix names; return it and any sidecar files written."""
    writer = WRITERS[out.suffix.lower()]
    with atomic_path(out) as tmp:
        extra = writer(tmp, out, features)
    return [str(out), *extra]


def _npy_header(shape: tuple[int, ...], dtype: np.dtype | type) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _rows(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _write_npy(tmp: Path, final: Path, features: Features) -> list[str]:
    (layer,) = features.layers
    names: list[str] = []
    with open(tmp, "wb") as f:
        f.write(_npy_header((features.rows, *features.shapes[layer]), np.float32))
        for p, arrays in features.chunks([layer]):
            f.write(_rows(arrays[layer]))
            names += p
    listing = final.with_name(final.name + ".paths.txt")
    write_text(listing, "".join(f"{p}\n" for p in names))
    return [str(listing)]


def _write_npz(tmp: Path, final: Path, features: Features) -> list[str]:
    """An uncompressed .npz written member by member, chunk by chunk (np.load reads it as usual)."""
    flat = [p for ps, _ in features.chunks([]) for p in ps]
    width = max(1, max(len(p) for p in flat))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open(zipfile.ZipInfo("path.npy", date_time=_ZIP_TIME), "w", force_zip64=True) as f:
            f.write(_npy_header((features.rows,), np.dtype(f"<U{width}")))
            f.write(np.asarray(flat, dtype=f"<U{width}").tobytes())
        for layer in features.layers:
            with z.open(zipfile.ZipInfo(f"{layer}.npy", date_time=_ZIP_TIME), "w", force_zip64=True) as f:
                f.write(_npy_header((features.rows, *features.shapes[layer]), np.float32))
                for _, arrays in features.chunks([layer]):
                    f.write(_rows(arrays[layer]))
    return []


def _needs(module: str, package: str, final: Path) -> ModuleType:
    """An optional dependency of one format, or an error saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VerydeepError(f"{final}: writing {final.suffix} needs {package} (pip install {package})") from None


def _write_parquet(tmp: Path, final: Path, features: Features) -> list[str]:
    pa = _needs("pyarrow", "pyarrow", final)
    pq = _needs("pyarrow.parquet", "pyarrow", final)
    layers = features.layers
    dims = {t: math.prod(features.shapes[t]) for t in layers}
    schema = pa.schema(
        [pa.field("path", pa.string())] + [pa.field(t, pa.list_(pa.float32(), dims[t])) for t in layers],
        metadata={"verydeep": json.dumps(features.meta)},
    )
    with pq.ParquetWriter(str(tmp), schema) as writer:
        for p, arrays in features.chunks(layers):
            columns = [pa.array(p, pa.string())]
            for t in layers:
                values = pa.array(np.ascontiguousarray(arrays[t], dtype=np.float32).reshape(-1))
                columns.append(pa.FixedSizeListArray.from_arrays(values, dims[t]))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return []


def _write_h5(tmp: Path, final: Path, features: Features) -> list[str]:
    h5py = _needs("h5py", "h5py", final)
    shapes = features.shapes
    with h5py.File(tmp, "w") as f:
        f.attrs["verydeep"] = json.dumps(features.meta)
        names = f.create_dataset("path", (features.rows,), dtype=h5py.string_dtype())
        sets = {
            t: f.create_dataset(t, (features.rows, *shapes[t]), dtype="f4", chunks=(1, *shapes[t]))
            for t in features.layers
        }
        at = 0
        for p, arrays in features.chunks(features.layers):
            names[at : at + len(p)] = p
            for t in features.layers:
                sets[t][at : at + len(p)] = arrays[t]
            at += len(p)
    return []


#: Output suffix -> writer (temporary path, final path, features) -> sidecar files written.
WRITERS: dict[str, Callable[[Path, Path, Features], list[str]]] = {
    ".npy": _write_npy,
    ".npz": _write_npz,
    ".parquet": _write_parquet,
    ".h5": _write_h5,
    ".hdf5": _write_h5,
}


# -- reading back ---------------------------------------------------------------------------------
def read_features(
    path: str | os.PathLike[str], layers: Sequence[str] | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """(image paths, {layer: N x ... array}) from any file :func:`write_features` writes.

    A file that is not one (damaged, another program's, without a requested layer, with a path
    per row missing) is one :class:`VerydeepError` line naming it."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise VerydeepError(f"{path}: unknown features file {path.suffix!r}; expected {', '.join(WRITERS)}")
    try:
        names, arrays = reader(path, layers)
    except VerydeepError:
        raise
    except KeyError as e:
        raise VerydeepError(f"{path}: holds no layer {e.args[0]!r}") from None
    except Exception as e:  # numpy, zipfile, pyarrow and h5py each raise their own kinds
        raise VerydeepError(f"{path}: not a features file verydeep wrote ({reason(e)})") from None
    listed = bool(names) or path.suffix.lower() != ".npy"  # a .npy may travel without its OUT.paths.txt
    for layer, array in arrays.items():
        if not isinstance(array, np.ndarray):  # np.load gives the bytes of a member that is not .npy
            raise VerydeepError(f"{path}: layer {layer} is not an array")
        if array.ndim < 1 or (listed and len(array) != len(names)):
            raise VerydeepError(
                f"{path}: layer {layer} has {len(array) if array.ndim else 0} rows for {len(names)} paths"
            )
    return names, arrays


def _read_npy(path: Path, layers: Sequence[str] | None) -> tuple[list[str], dict[str, np.ndarray]]:
    array = np.load(path, allow_pickle=False)
    listing = path.with_name(path.name + ".paths.txt")
    names = listing.read_text(encoding="utf-8").splitlines() if listing.exists() else []
    return names, {(layers or ["features"])[0]: array}


def _read_npz(path: Path, layers: Sequence[str] | None) -> tuple[list[str], dict[str, np.ndarray]]:
    check_npz(path)
    with np.load(path, allow_pickle=False) as z:
        keys = layers or [k for k in z.files if k != "path"]
        names = z["path"]
        if not isinstance(names, np.ndarray) or names.ndim != 1 or names.dtype.kind != "U":
            raise ValueError("its path member is not a list of image paths")
        return [str(p) for p in names], {k: z[k] for k in keys}


def _read_parquet(path: Path, layers: Sequence[str] | None) -> tuple[list[str], dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"verydeep"])
    keys = layers or [n for n in table.column_names if n != "path"]
    out = {}
    for k in keys:
        flat = table.column(k).combine_chunks().flatten().to_numpy()
        out[k] = flat.reshape(table.num_rows, *meta["shapes"][k])
    return table.column("path").to_pylist(), out


def _read_h5(path: Path, layers: Sequence[str] | None) -> tuple[list[str], dict[str, np.ndarray]]:
    import h5py

    with h5py.File(path, "r") as f:
        keys = layers or [k for k in f.keys() if k != "path"]
        names = [p.decode() if isinstance(p, bytes) else p for p in f["path"][:]]
        return names, {k: f[k][:] for k in keys}


#: Features file suffix -> its reader (path, layers or None for all) -> (paths, arrays).
READERS: dict[str, Callable[[Path, Sequence[str] | None], tuple[list[str], dict[str, np.ndarray]]]] = {
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".parquet": _read_parquet,
    ".h5": _read_h5,
    ".hdf5": _read_h5,
}
