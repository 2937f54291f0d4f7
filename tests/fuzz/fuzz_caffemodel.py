"""Fuzz the caffemodel reader (``verydeep.formats.caffe.caffemodel.read_caffemodel``) and the
loader behind it (``load_caffemodel``: the file's own net built as a VGG or a CaffeGraph and
filled with its blobs, each checked against the net)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_prototxt import BRANCHY_NET
from harness import main


def seeds(folder: Path) -> list[bytes]:
    """Blobs alone, and the branchy deploy net with its weights, each as V1 and V2."""
    import torch

    from verydeep.formats.caffe.caffemodel import write_caffemodel
    from verydeep.formats.caffe.graph import CaffeGraph
    from verydeep.formats.caffe.prototxt import parse_prototxt

    rng = np.random.default_rng(0)
    blobs = {
        "conv1_1": [rng.standard_normal((4, 3, 3, 3), dtype=np.float32), rng.standard_normal(4, dtype=np.float32)],
        "fc8": [rng.standard_normal((5, 16), dtype=np.float32), rng.standard_normal(5, dtype=np.float32)],
    }
    net = parse_prototxt(BRANCHY_NET)
    with torch.device("meta"):
        graph = CaffeGraph(net)
    net_blobs = {
        name: [rng.standard_normal(tuple(p.shape), dtype=np.float32) for p in getattr(graph, attr).parameters()]
        for name, attr in graph.param_layers.items()
    }
    out = []
    for version in ("V1", "V2"):
        for kind, arrays, with_net in (("blobs", blobs, None), ("net", net_blobs, net)):
            path = folder / f"{kind}_{version}.caffemodel"
            write_caffemodel(path, arrays, with_net, version=version)
            out.append(path.read_bytes())
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.formats.caffe.caffemodel import read_caffemodel
    from verydeep.formats.caffe.load import load_caffemodel

    path = folder / "input.caffemodel"
    path.write_bytes(data)
    if read_caffemodel(path).net.layer:
        load_caffemodel(path)


if __name__ == "__main__":
    main(seeds, one_input, ["verydeep.formats.caffe.caffemodel", "verydeep.formats.caffe.load"])
