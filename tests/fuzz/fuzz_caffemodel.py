"""Fuzz the caffemodel reader (``verydeep.formats.caffe.caffemodel.read_caffemodel``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import main


def seeds(folder: Path) -> list[bytes]:
    from verydeep.formats.caffe.caffemodel import write_caffemodel

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = {
        "conv1_1": [rng.standard_normal((4, 3, 3, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)],
        "fc8": [rng.standard_normal((5, 16), dtype=np.float32), rng.standard_normal(5, dtype=np.float32)],
    }
    out = []
    for version in ("V1", "V2"):
        path = folder / f"net_{version}.caffemodel"
        write_caffemodel(path, blobs, version=version)
        out.append(path.read_bytes())
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.formats.caffe.caffemodel import read_caffemodel

    path = folder / "input.caffemodel"
    path.write_bytes(data)
    read_caffemodel(path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.formats.caffe.caffemodel"])
