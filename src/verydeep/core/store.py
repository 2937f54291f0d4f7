"""The resumable chunk store: a long job's partial results, one file per finished chunk.

A job that runs for hours (``evaluate``, ``extract``) cuts its input into numbered *chunks*
and writes each finished one to ``FOLDER/<prefix>-NNNNNNN.npz``, atomically
(:mod:`verydeep.core.atomic`), beside a manifest JSON that records what the run computes. A kill
at any moment loses at most the chunks not yet written; a resumed run reads the manifest,
refuses to continue a run that asked for something else (its numbers would differ), and
computes only the missing chunks. What a chunk's arrays hold is the job's business.

Under torchrun every rank reads the folder before any rank writes to it, so all ranks decide
alike; rank 0 then prepares it (removes it for ``overwrite``, clears temporary files of killed
writes, writes the manifest) while the others wait.

One run at a time per output: a job holds :func:`output_lock` (``OUT.lock``, on rank 0) from
before it looks at the store until its output is written, so a second run on the same output
refuses at once instead of sharing (or deleting) the first run's parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import zipfile
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from verydeep.core import distributed
from verydeep.core.atomic import atomic_file, file_lock, make_dirs, remove_stale, write_json
from verydeep.errors import VerydeepError

#: The most bytes a member of an .npz verydeep reads back may expand to per byte of the file:
#: chunks and features are written uncompressed (1); a user's ``np.savez_compressed`` of float
#: features gets ~1.1, and deflate's own limit (~1032) would turn 3 MB into 3 GB.
MAX_NPZ_RATIO = 100
#: The longest .npy header of a member verydeep reads (a dict literal of ~100 bytes); numpy's own default.
MAX_HEADER_BYTES = 10_000
#: Values sampled from each tensor by :func:`model_fingerprint`.
FINGERPRINT_SAMPLES = 4096


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights: each tensor's name, shape and dtype, and a strided
    sample of its values (hashing all 528 MB of VGG-16 would cost more than a resumed chunk)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].to("cpu", torch.float64).numpy()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def output_lock(
    out: str | os.PathLike[str], ctx: distributed.Context | None = None, *, remedy: str = "choose another output"
) -> AbstractContextManager[None]:
    """Hold ``OUT.lock`` for a job's whole run (on rank 0): a second run on the same output
    refuses at once, naming the process that holds it and ending "wait for it or <remedy>".
    Refusing rather than waiting: the waiting run would only find the first one's finished
    output (or its parts) and stop there."""
    out = Path(out)

    def busy(holder: str) -> str:
        return f"{out} is being written by another verydeep process ({holder}); wait for it or {remedy}"

    lock = out.with_name(out.name + ".lock")
    return distributed.held_by_main_rank(
        lambda: file_lock(lock, busy, wait=False, target=out), ctx or distributed.Context()
    )


def check_same_run(
    saved: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    where: str,
    remedy: str,
    adopt: Collection[str] = (),
    options: Mapping[str, str] | None = None,
) -> None:
    """Refuse to continue (or report) a run whose record differs from the one asked for, naming
    the first key that differs, its saved and its requested value; ``adopt`` keys may differ.
    ``options`` maps keys to the command-line flags that set them (``"layers": "--layer"``):
    those are named as the user typed them."""
    flags = options or {}
    for key in [*wanted, *(k for k in saved if k not in wanted)]:
        if key in adopt or saved.get(key) == wanted.get(key):
            continue
        flag = flags.get(key)
        if flag is None:
            what = f"{key} was {json.dumps(saved.get(key))}, now {json.dumps(wanted.get(key))}"
        else:
            what = f"it was started with {flag} {_shown(saved.get(key))}, now {flag} {_shown(wanted.get(key))}"
        raise VerydeepError(f"{where}: cannot resume: {what}; use a new output or the same options, or {remedy}")


def _shown(value: Any) -> str:
    """An option's value as a user typed it (``fc7 pool5`` for a list)."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "(not given)" if value is None else str(value)


def check_npz(path: Path, *, stored: bool = False) -> None:
    """Refuse (ValueError) an .npz whose members would expand beyond :data:`MAX_NPZ_RATIO` times
    the file (a deflate bomb), or whose .npy headers declare more (or less) data than their
    member holds, before numpy reads any; ``stored``: only uncompressed members."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if stored and info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {info.filename} is compressed")
            if info.file_size > (1 if stored else MAX_NPZ_RATIO) * size:
                raise ValueError(f"member {info.filename} claims {info.file_size:,} bytes in a file of {size:,}")
            with z.open(info) as f:
                is_npy = f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
            if is_npy:  # np.load reads any other member as bytes, which the size above bounds
                npy_header(z, info)


def npy_header(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the .npy header of the member ``info``; ValueError when
    the data it declares is not what the member holds, so a 300-byte file claiming a 37 GiB array
    is refused before numpy allocates it. Object arrays (pickles, whose length no header
    declares) are left to ``allow_pickle=False``."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f, max_header_size=MAX_HEADER_BYTES)
        offset = f.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and offset + nbytes != info.file_size:
        raise ValueError(
            f"member {info.filename}: its header declares {shape} {dtype} ({nbytes:,} bytes), the member holds "
            f"{max(info.file_size - offset, 0):,}"
        )
    return shape, fortran, dtype


class ChunkStore:
    """``folder/``: ``manifest`` (what the run computes) and ``<prefix>-NNNNNNN.npz`` per chunk.

    ``start_over`` completes the refusals ("..., or <start_over>"): how a user discards the
    partial results (by default, deleting the folder); ``name`` and ``options`` say in them what
    the run is (its output) and which flag set each manifest key.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        manifest: str = "manifest.json",
        prefix: str = "chunk",
        start_over: str | None = None,
        name: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest_path = self.folder / manifest
        self.prefix = prefix
        self.start_over = start_over or f"delete {self.folder} to start over"
        self.name = name or str(self.folder)  # what messages call the run (its output)
        self.options = options  # manifest keys -> the flags that set them (check_same_run)
        self._name = re.compile(rf"{re.escape(prefix)}-(\d+)\.npz")

    def exists(self) -> bool:
        """Whether an earlier run left partial results here."""
        return self.manifest_path.exists()

    def begin(
        self,
        manifest: Mapping[str, Any],
        *,
        resume: bool,
        overwrite: bool = False,
        ctx: distributed.Context | None = None,
        adopt: Collection[str] = (),
    ) -> dict[str, Any]:
        """Start or continue the run ``manifest`` describes; return the run's manifest.

        Partial results of an earlier run need ``resume`` (and the same manifest, except the keys
        in ``adopt``, whose saved values win) or ``overwrite`` (they are removed). Every rank
        calls this; rank 0 prepares the folder.
        """
        ctx = ctx or distributed.Context()
        wanted: dict[str, Any] = json.loads(json.dumps(manifest))  # as it reads back (tuples -> lists)
        saved = None if overwrite else self._saved()  # every rank, before anyone writes
        if saved is not None:
            if not resume:
                raise VerydeepError(
                    f"{self.folder}: partial results of an earlier run; pass --resume to continue it, "
                    f"or {self.start_over}"
                )
            self._check(saved, wanted, adopt)
        distributed.barrier(ctx)
        if ctx.is_main:
            if overwrite:
                shutil.rmtree(self.folder, ignore_errors=True)
            make_dirs(self.folder)
            remove_stale(self.folder)
            if saved is None:
                write_json(self.manifest_path, wanted, indent=1)
        distributed.barrier(ctx)
        if not self.exists():  # a rank started on its own (no process group): nobody prepared it
            write_json(self.manifest_path, wanted, indent=1)
        found = self.manifest()
        self._check(found, wanted, adopt)
        return found

    def manifest(self) -> dict[str, Any]:
        """The manifest the run was started with."""
        found = self._saved()
        if found is None:
            raise VerydeepError(f"{self.manifest_path}: no such file; the partial results are gone")
        return found

    def path_of(self, chunk: int) -> Path:
        return self.folder / f"{self.prefix}-{chunk:07d}.npz"

    def write(self, chunk: int, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write one chunk's arrays, atomically: the file is whole or absent, never partial."""
        path = self.path_of(chunk)
        with atomic_file(path) as f:
            np.savez(f, allow_pickle=False, **arrays)
        return path

    def done(self) -> set[int]:
        """The chunks written so far (temporary files of killed writes do not count)."""
        found = (self._name.fullmatch(p.name) for p in self.folder.glob(f"{self.prefix}-*.npz"))
        return {int(m[1]) for m in found if m}

    def missing(self, n: int) -> list[int]:
        """Which of chunks ``0..n-1`` are not written yet."""
        done = self.done()
        return [k for k in range(n) if k not in done]

    def read(self, chunk: int, keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """A written chunk's arrays (only ``keys`` when given). A chunk is an uncompressed .npz
        (:meth:`write`): a compressed member, one larger than the file or one whose header claims
        other than it holds is not one, and is refused before numpy allocates what it claims."""
        path = self.path_of(chunk)
        try:
            check_npz(path, stored=True)
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in keys or () if k not in z.files]
                if missing:
                    raise ValueError(f"no array {missing[0]!r}")
                arrays = {k: z[k] for k in (z.files if keys is None else keys)}
            loose = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]  # a member not .npy
            if loose:
                raise ValueError(f"member {loose[0]!r} is not an array")
            return arrays
        except Exception as e:  # zipfile and numpy raise a dozen kinds (NotImplementedError, struct.error, ...)
            why = " ".join(str(e).split()) or type(e).__name__
            raise VerydeepError(
                f"{path}: unreadable part of an earlier run ({why}); delete it to recompute its chunk"
            ) from None

    def refuse(self, chunk: int, why: str) -> VerydeepError:
        """The error for a chunk file whose arrays are not what this run writes (``why``)."""
        return VerydeepError(f"{self.path_of(chunk)}: not a part of this run ({why}); delete it to recompute its chunk")

    def synchronize(self, ctx: distributed.Context) -> None:
        """Wait until every rank has written its chunks (before rank 0 merges them)."""
        distributed.barrier(ctx)

    def remove(self) -> None:
        """Delete the partial results (once the job has written its output)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _saved(self) -> dict[str, Any] | None:
        try:
            found = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # no run yet (a file in the way is begin's to report)
            return None
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
            why = " ".join(str(e).split()) or type(e).__name__
            raise VerydeepError(f"{self.manifest_path}: unreadable ({why}); {self.start_over}") from None
        if not isinstance(found, dict):
            raise VerydeepError(f"{self.manifest_path}: not a manifest (a JSON object); {self.start_over}")
        return found

    def _check(self, saved: Mapping[str, Any], wanted: Mapping[str, Any], adopt: Collection[str]) -> None:
        check_same_run(saved, wanted, where=self.name, adopt=adopt, remedy=self.start_over, options=self.options)
