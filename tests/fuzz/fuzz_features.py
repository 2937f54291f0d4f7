"""Fuzz the features file reader (``verydeep.extract.writers.read_features``): what ``extract
--resume`` reads back from a finished output, and what users load their features with. The
first byte picks the format (.npz, or .npy with its OUT.paths.txt after a NUL byte)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

SUFFIXES = {b"z": ".npz", b"y": ".npy"}


def seeds(folder: Path) -> list[bytes]:
    """An .npz of two layers and an .npy of one, as ``extract`` writes them."""
    from verydeep.extract.writers import Features, write_features

    rng = np.random.default_rng(0)
    shapes = {"fc7": (4,), "pool5": (2, 1, 1)}
    rows = {t: rng.standard_normal((3, *s), dtype=np.float32) for t, s in shapes.items()}
    names = ["a.jpg", "b.jpg", "c.jpg"]

    def chunks(keys):
        yield names, {k: rows[k] for k in keys}

    out = []
    for key, layers in ((b"z", ["fc7", "pool5"]), (b"y", ["fc7"])):
        path = folder / f"f{SUFFIXES[key]}"
        write_features(path, Features(3, layers, {t: shapes[t] for t in layers}, {}, chunks))
        listing = path.with_name(path.name + ".paths.txt")
        out.append(key + path.read_bytes() + (b"\0" + listing.read_bytes() if listing.exists() else b""))
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.extract.writers import read_features

    suffix = SUFFIXES.get(data[:1], ".npz")
    body, _, listing = data[1:].partition(b"\0") if suffix == ".npy" else (data[1:], b"", b"")
    path = folder / f"features{suffix}"
    path.write_bytes(body)
    paths_txt = path.with_name(path.name + ".paths.txt")
    paths_txt.unlink(missing_ok=True)
    if listing:
        paths_txt.write_bytes(listing)
    read_features(path)
    read_features(path, ["fc7"])


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.extract.writers"])
