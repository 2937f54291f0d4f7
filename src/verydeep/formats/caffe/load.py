"""A caffemodel (with or without a deploy prototxt) as a torch module.

Table 1 nets become :class:`verydeep.models.vgg.VGG` (the fast path, the dense view, feature
taps by Caffe name); any other deploy net of the supported layers becomes a
:class:`verydeep.formats.caffe.graph.CaffeGraph`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from verydeep.errors import WeightsError
from verydeep.formats.caffe.caffemodel import read_caffemodel
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.formats.caffe.prototxt import read_prototxt, vgg_spec
from verydeep.models.build import build_vgg, default_class_names, vgg_spec_from_shapes
from verydeep.models.vgg import VGG


def caffe_arrays(blobs: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Caffe's per-layer blob lists -> ``<layer>.weight`` / ``<layer>.bias`` arrays."""
    out: dict[str, np.ndarray] = {}
    for layer, arrays in blobs.items():
        for kind, array in zip(("weight", "bias"), arrays):
            out[f"{layer}.{kind}"] = array
    return out


def load_caffemodel(path: str | os.PathLike[str], prototxt: str | os.PathLike[str] | None = None) -> VGG | CaffeGraph:
    """A caffemodel (V1 or V2) as a VGG when the net is a Table 1 VGG, else as a CaffeGraph.

    Memory stays bounded by the file: the reader's arrays hold exactly the bytes the file has, and
    the model adopts them after checking each one's shape against the net (built on the meta
    device, so a prototxt claiming more parameters than the file holds allocates nothing).
    """
    path = Path(path)
    cm = read_caffemodel(path)
    net = read_prototxt(prototxt) if prototxt is not None else None
    arrays = caffe_arrays(cm.blobs)
    origin = f"{path}" + (f" (with {prototxt})" if prototxt is not None else "")
    spec = vgg_spec(net) if net is not None else (vgg_spec(cm.net) if cm.net.layer else None)
    if spec is None and net is None:
        spec = vgg_spec_from_shapes({k: tuple(v.shape) for k, v in arrays.items()})
    if spec is not None:
        return build_vgg(spec, arrays, origin=origin, class_names=default_class_names(spec.num_classes))
    graph_net = net if net is not None else cm.net
    if not graph_net.layer:
        raise WeightsError(
            f"{path}: not a known VGG and the file holds no net definition; pass --prototxt deploy.prototxt"
        )
    return CaffeGraph.with_blobs(graph_net, cm.blobs, origin, source=str(prototxt or path))
