"""What a run produces: per-image soft-max outputs, their errors, the scores file, fusion, CSV.

Scores files are .npz (``verydeep-scores-1``): soft-max rows, labels, image ids, the skipped
images and a JSON ``meta`` (protocol, run, metrics), so runs can be fused later
(:func:`combine`, the paper's multi-crop & dense and multi-net results) without the images.
"""

from __future__ import annotations

import csv
import json
import lzma
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from verydeep.core.atomic import atomic_file, atomic_path
from verydeep.core.store import MAX_HEADER_BYTES, MAX_NPZ_RATIO, npy_header
from verydeep.data.images import quoted, reason
from verydeep.errors import VerydeepError

SCORES_FORMAT = "verydeep-scores-1"


def topk_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each label is among the ``k`` highest scores (ties broken by class index)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


@dataclass
class EvalResult:
    """Per-image soft-max outputs and the summary of one run (or of fused runs)."""

    protocol: dict[str, Any]
    ids: list[str]
    probs: np.ndarray  # N x C float32, images in the set's order
    labels: np.ndarray | None  # N int64, or None when unlabeled
    failed: list[dict[str, str]] = field(default_factory=list)  # {"id", "path", "reason"}
    wall_s: float = 0.0
    computed: int = 0  # images computed in this session (resumed runs compute fewer)
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.ids)

    @property
    def skipped(self) -> int:
        return len(self.failed)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.wall_s if self.wall_s > 0 else 0.0

    def metrics(self) -> dict[str, float] | None:
        """Top-1/top-5 error and accuracy in percent over the evaluated labelled images."""
        if self.labels is None or self.images == 0:
            return None
        top1 = float(topk_correct(self.probs, self.labels, 1).mean()) * 100
        top5 = float(topk_correct(self.probs, self.labels, 5).mean()) * 100
        return {
            "top1_error_pct": 100 - top1,
            "top5_error_pct": 100 - top5,
            "top1_accuracy_pct": top1,
            "top5_accuracy_pct": top5,
        }

    def predictions(self, k: int = 5, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Top-``k`` classes of each image."""
        k = min(k, self.probs.shape[1]) if self.probs.size else 0
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        out = []
        for n, image_id in enumerate(self.ids):
            top = [int(c) for c in order[n]]
            entry: dict[str, Any] = {
                "id": image_id,
                "top": top,
                "probabilities": [float(self.probs[n, c]) for c in top],
            }
            if class_names:
                entry["names"] = [class_names[c] for c in top]
            if self.labels is not None:
                entry["label"] = int(self.labels[n])
            out.append(entry)
        return out

    def summary(self) -> dict[str, Any]:
        """What the table and ``--json`` show."""
        return {
            "protocol": self.protocol,
            "images": self.images,
            "skipped": self.skipped,
            "metrics": self.metrics(),
            "wall_s": round(self.wall_s, 3),
            "images_computed": self.computed,
            "images_per_s": round(self.images_per_s, 3),
            "failed": self.failed,
            "run": self.run,
        }


def save_scores(result: EvalResult, path: str | os.PathLike) -> Path:
    """Write ``result`` as an .npz (probs, labels, ids, failed, meta JSON), atomically.

    Timing stays out of the file, so a resumed run writes the same file as an uninterrupted one.
    """
    meta = {"format": SCORES_FORMAT, "protocol": result.protocol, "run": result.run, "metrics": result.metrics()}
    labels = result.labels if result.labels is not None else np.full(result.images, -1, dtype=np.int64)
    with atomic_file(path) as f:
        np.savez(
            f,
            probs=result.probs.astype(np.float32, copy=False),
            labels=labels.astype(np.int64, copy=False),
            ids=np.array(result.ids, dtype=str),
            failed_ids=np.array([x["id"] for x in result.failed], dtype=str),
            failed_paths=np.array([x["path"] for x in result.failed], dtype=str),
            failed_reasons=np.array([x["reason"] for x in result.failed], dtype=str),
            meta=np.array(json.dumps(meta)),
        )
    return Path(path)


#: The arrays of a scores file: member -> (dtype kinds allowed, dimensions). ``probs`` is images x
#: classes; ``labels`` and ``ids`` one per image; ``failed_*`` one per skipped image; ``meta`` JSON.
MEMBERS: dict[str, tuple[str, int]] = {
    "probs": ("f", 2),
    "labels": ("iu", 1),
    "ids": ("U", 1),
    "failed_ids": ("U", 1),
    "failed_paths": ("U", 1),
    "failed_reasons": ("U", 1),
    "meta": ("U", 0),
}
#: Small members (meta, an empty failure list) may expand beyond the ratio up to this many bytes.
RATIO_FLOOR = 2**16
#: The most bytes the arrays of one scores file may hold: ILSVRC-2012's 50,000 validation
#: images x 1000 classes are 200 MB of float32; 8 GiB is its 1.28M training images, with room.
MAX_SCORES_BYTES = 2**33


def load_scores(path: str | os.PathLike) -> EvalResult:
    """Read a scores file written by :func:`save_scores`.

    The zip directory and each array's .npy header are checked before any array is read:
    what they declare must fit the file (no member expands more than
    :data:`~verydeep.core.store.MAX_NPZ_RATIO`-fold: save_scores stores, np.savez_compressed gets
    ~1.1 on soft-max rows and ~10-40 on padded id strings; no two share bytes), agree with
    ``probs``' images x classes, and stay under :data:`MAX_SCORES_BYTES`; object arrays (pickles)
    are refused. A bad file is one :class:`VerydeepError` line naming it.
    """
    path = Path(path)
    z = _read_npz(path)
    try:
        meta = json.loads(str(z["meta"]))
    except (ValueError, RecursionError) as e:
        raise VerydeepError(f"{path}: not a verydeep scores file (meta is not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SCORES_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise VerydeepError(f"{path}: expected format {SCORES_FORMAT}, found {quoted(found)}")
    for key in ("protocol", "run"):
        if not isinstance(meta.get(key, {}), dict):
            raise VerydeepError(f"{path}: meta {key}: expected a JSON object, found {quoted(meta[key])}")
    if "protocol" not in meta:
        raise VerydeepError(f"{path}: meta has no protocol")
    probs, labels = z["probs"], z["labels"].astype(np.int64)
    classes = probs.shape[1]
    if not np.isfinite(probs).all():
        raise VerydeepError(f"{path}: probs: {int((~np.isfinite(probs)).sum())} values are not finite")
    outside = (labels < -1) | (labels >= classes)
    if outside.any():
        raise VerydeepError(
            f"{path}: labels: {int(labels[outside][0])} is not a class index of {classes} classes (or -1: unlabeled)"
        )
    ids = [str(i) for i in z["ids"]]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise VerydeepError(f"{path}: ids: image {twice!r} is listed twice")
    return EvalResult(
        protocol=meta["protocol"],
        ids=ids,
        probs=probs.astype(np.float32, copy=False),
        labels=None if labels.size and (labels < 0).all() else labels,
        failed=[
            {"id": str(i), "path": str(p), "reason": str(r)}
            for i, p, r in zip(z["failed_ids"], z["failed_paths"], z["failed_reasons"])
        ],
        run=meta.get("run", {}),
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of :data:`MEMBERS` from the .npz at ``path``, every declared size checked first."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise VerydeepError(f"{path}: no such scores file") from None
    except IsADirectoryError:
        raise VerydeepError(f"{path}: is a folder, expected an .npz scores file") from None
    except (OSError, ValueError) as e:
        raise VerydeepError(f"{path}: cannot read the scores file ({getattr(e, 'strerror', None) or e})") from None
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise VerydeepError(f"{path}: not an .npz score file (found {_kind_of(head)})")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            missing = [name for name in MEMBERS if f"{name}.npy" not in infos]
            if missing:
                raise VerydeepError(f"{path}: not a verydeep scores file (no {', '.join(missing)} array)")
            members = {name: infos[f"{name}.npy"] for name in MEMBERS}
            _check_directory(path, size, members)
            headers = {name: _header(zf, info, path, name) for name, info in members.items()}
            _check_headers(path, headers)
            return {name: _array(zf, members[name]) for name in MEMBERS}
    except VerydeepError:
        raise
    except _UNREADABLE as e:
        raise VerydeepError(f"{path}: not a verydeep scores file ({reason(e)})") from None


#: What zipfile, its decompressors and numpy's header parser raise on damaged bytes: a bad
#: directory or CRC, an encrypted or unsupported member, a broken deflate/bzip2/LZMA stream, a
#: header numpy rejects, a number too large for a struct field.
_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    RuntimeError,
    NotImplementedError,
)


def _kind_of(head: bytes) -> str:
    """What the first bytes of a file that is not a zip look like, for the error message."""
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickled data"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at 512 bytes is still text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return "binary data"


def _check_directory(path: Path, size: int, members: dict[str, zipfile.ZipInfo]) -> None:
    """What the zip directory declares must fit the file: no member expands beyond
    :data:`~verydeep.core.store.MAX_NPZ_RATIO`, no two share compressed bytes, the whole stays
    under :data:`MAX_SCORES_BYTES`."""
    spans = sorted(
        (info.header_offset, info.header_offset + info.compress_size, name) for name, info in members.items()
    )
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise VerydeepError(f"{path}: not a verydeep scores file (members {name} and {other} overlap)")
    for name, info in members.items():
        if info.compress_size > size:
            raise VerydeepError(
                f"{path}: {name}: the zip directory claims {info.compress_size:,} bytes in a file of {size:,}"
            )
        if info.file_size > max(MAX_NPZ_RATIO * info.compress_size, RATIO_FLOOR):
            raise VerydeepError(
                f"{path}: {name}: {info.compress_size:,} compressed bytes claim to expand to {info.file_size:,} "
                f"(more than {MAX_NPZ_RATIO}x: a decompression bomb, not scores)"
            )
    total = sum(info.file_size for info in members.values())
    if total > MAX_SCORES_BYTES:
        raise VerydeepError(f"{path}: holds {total:,} bytes of arrays; scores files are at most {MAX_SCORES_BYTES:,}")


def _header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, name: str
) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a member's .npy header, checked against the member's
    size (:func:`~verydeep.core.store.npy_header`) and against what :data:`MEMBERS` allows."""
    shape, fortran, dtype = npy_header(zf, info)
    kinds, ndim = MEMBERS[name]
    if dtype.hasobject:
        raise VerydeepError(f"{path}: {name}: holds Python objects (pickled data), which scores files never do")
    if dtype.kind not in kinds or len(shape) != ndim or dtype.subdtype is not None:
        raise VerydeepError(
            f"{path}: {name}: expected a {ndim}-d array of kind {kinds!r}, found shape {shape} dtype {dtype}"
        )
    return shape, fortran, dtype


def _check_headers(path: Path, headers: dict[str, tuple]) -> None:
    """One row of labels and ids per row of probs; as many failed ids as paths and reasons."""
    images = headers["probs"][0][0]
    for name in ("labels", "ids"):
        if headers[name][0] != (images,):
            raise VerydeepError(
                f"{path}: {name}: expected {images} entries (one per row of probs), found {headers[name][0]}"
            )
    failed = {headers[name][0] for name in ("failed_ids", "failed_paths", "failed_reasons")}
    if len(failed) != 1:
        raise VerydeepError(f"{path}: failed_ids, failed_paths and failed_reasons differ in length: {sorted(failed)}")


def _array(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """A member's data; its header was checked to declare exactly what the member holds."""
    with zf.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
        f.read(1)  # reach the end, where zipfile checks the CRC
    return array


def combine(paths: Sequence[str | os.PathLike]) -> EvalResult:
    """Average the soft-max outputs of saved runs (protocols, nets), as the paper fuses them.

    Images are matched by id; an image missing from (or skipped by) any run is skipped.
    """
    if len(paths) < 2:
        raise VerydeepError("--combine needs at least two scores files")
    runs = [load_scores(p) for p in paths]
    classes = {r.probs.shape[1] for r in runs if r.images}
    if len(classes) > 1:
        raise VerydeepError(f"scores files have different numbers of classes: {sorted(classes)}")
    common = set(runs[0].ids)
    for r in runs[1:]:
        common &= set(r.ids)
    ids = [i for i in runs[0].ids if i in common]
    probs = np.zeros((len(ids), classes.pop() if classes else 0), dtype=np.float64)
    labels = None
    for path, r in zip(paths, runs):
        where = {image_id: n for n, image_id in enumerate(r.ids)}
        rows = [where[i] for i in ids]
        probs += r.probs[rows]
        if r.labels is not None:
            these = r.labels[rows]
            if labels is not None and not np.array_equal(labels, these):
                bad = ids[int(np.flatnonzero(labels != these)[0])]
                raise VerydeepError(f"{path}: image {bad} has a different label than in {paths[0]}")
            labels = these
    failed: dict[str, dict[str, str]] = {}
    for path, r in zip(paths, runs):
        for x in r.failed:
            failed.setdefault(x["id"], x)
        for image_id in r.ids:
            if image_id not in common and image_id not in failed:
                failed[image_id] = {"id": image_id, "path": "", "reason": f"not in every scores file (has: {path})"}
    return EvalResult(
        protocol={"name": "fusion", "inputs": [str(p) for p in paths], "parts": [r.protocol for r in runs]},
        ids=ids,
        probs=(probs / len(runs)).astype(np.float32),
        labels=labels,
        failed=sorted(failed.values(), key=lambda x: x["id"]),
        run={"combined": [r.run for r in runs]},
    )


def write_predictions(
    result: EvalResult, path: str | os.PathLike, class_names: Sequence[str] | None = None, *, k: int = 5
) -> Path:
    """A CSV with each image's top-``k`` classes and probabilities (and label when known)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "top", "probabilities", "top1_name"])
        for p in result.predictions(k, class_names):
            w.writerow(
                [
                    p["id"],
                    p.get("label", ""),
                    " ".join(map(str, p["top"])),
                    " ".join(f"{v:.6g}" for v in p["probabilities"]),
                    p["names"][0] if p.get("names") else "",
                ]
            )
    return Path(path)
