"""Fuzz the resumable chunk store (``verydeep.core.store``) and what the jobs read from it on
``--resume``: an earlier run's manifest, and a stored chunk as ``extract`` merges it (rows,
failures and features into the output file) and as ``evaluate`` reads it back (indices,
soft-max rows, failures). The first byte picks which; the rest is the file."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

#: What the fuzzed chunks belong to: extract's run of 3 images, one chunk, fc7 of 4 values.
PATHS = ["a.jpg", "b.jpg", "c.jpg"]
EXTRACT_MANIFEST = {"version": 1, "inputs": 3, "layers": ["fc7"], "chunk": 3}
#: evaluate's run: 3 images in one chunk, 5 classes.
EVAL_STATE = {"images": 3, "batch_size": 3}
KINDS = (b"m", b"x", b"e")  # manifest, extract's chunk, evaluate's chunk


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def seeds(folder: Path) -> list[bytes]:
    """A manifest, and a chunk of each job as the jobs write them (one image failed in each)."""
    import json

    from verydeep.data.images import Failed, failed_to_json

    rng = np.random.default_rng(0)
    failed = np.asarray(failed_to_json([Failed(1, "b.jpg", "cannot identify image file")]))
    extract_chunk = _npz(
        fc7=rng.standard_normal((2, 4), dtype=np.float32), __index__=np.array([0, 2]), __failed__=failed
    )
    probs = rng.dirichlet(np.ones(5), size=2).astype(np.float32)
    eval_chunk = _npz(indices=np.array([0, 2]), probs=probs, failed=failed)
    return [
        KINDS[0] + json.dumps(EXTRACT_MANIFEST).encode(),
        KINDS[1] + extract_chunk,
        KINDS[2] + eval_chunk,
    ]


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.core.store import ChunkStore
    from verydeep.evaluate.run import read_chunks
    from verydeep.extract.job import merge, parts_store

    kind, body = data[:1], data[1:]
    out = folder / "out.npz"
    for leftover in folder.iterdir():
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    if kind == KINDS[2]:
        store = ChunkStore(folder / "scores.parts", manifest="state.json", prefix="chunks")
        store.begin(EVAL_STATE, resume=False)
        store.path_of(0).write_bytes(body)
        read_chunks(store, {0}, [[0, 1, 2]], num_classes=5)
        return
    store = parts_store(out)
    if kind == KINDS[0]:
        store.folder.mkdir()
        store.manifest_path.write_bytes(body)
        store.begin(EXTRACT_MANIFEST, resume=True, adopt=("chunk",))
        return
    store.begin(EXTRACT_MANIFEST, resume=False)
    store.path_of(0).write_bytes(body)
    merge(out, store, PATHS, ["fc7"], {"fc7": (4,)}, n_chunks=1, manifest=EXTRACT_MANIFEST)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.core.store", "verydeep.extract.job", "verydeep.evaluate.run"])
