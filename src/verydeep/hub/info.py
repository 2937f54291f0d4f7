"""What ``verydeep info`` reports: layers, output shapes, parameters, FLOPs, file format.

Every figure comes from a :class:`~verydeep.formats.caffe.graph.CaffeGraph` built on the meta
device: its shape inference gives each layer's output at the net's declared input (a Table 1
VGG at 1x3x224x224) and its parameter shapes, so nothing is run and no parameter or activation is
allocated, whatever size the file asks for (the graph's caps bound what it may declare).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from verydeep.configs import NetSpec
from verydeep.errors import VerydeepError
from verydeep.formats.caffe import CaffeGraph, read_caffemodel, read_prototxt, vgg_net, vgg_spec
from verydeep.formats.safetensors import read_metadata
from verydeep.hub.cache import cached_path, fetch
from verydeep.hub.download import is_url
from verydeep.hub.loader import load
from verydeep.hub.registry import REGISTRY

PROTOTXT_SUFFIXES = (".prototxt", ".pbtxt", ".txt")
#: The paper's input: FLOPs at it are also reported as ``flops_224``, the figure Table 1 readers compare.
PAPER_INPUT = (1, 3, 224, 224)


def layer_table(graph: CaffeGraph) -> tuple[list[dict[str, Any]], int]:
    """Per-layer Caffe type, output shape and parameter count at the graph's input shapes, and the
    FLOPs (2 x multiply-adds of convolutions and inner products), from shapes alone."""
    rows: list[dict[str, Any]] = []
    flops = 0
    for step in graph.steps:
        module = getattr(graph, step.attr)
        params = sum(p.numel() for p in module.parameters(recurse=False))
        out = step.shapes[0]
        weight = getattr(module, "weight", None)
        if weight is not None:  # each output value takes one multiply-add per weight of its channel
            flops += 2 * weight.numel() * (math.prod(out) // module.num_output)
        rows.append({"name": step.name, "type": step.type, "output": list(out), "params": params})
    return rows, flops


def prototxt_version(text: str) -> str:
    """V1 deploy files use ``layers {`` blocks with enum types; V2 ``layer {``."""
    return "V1" if re.search(r"^\s*layers\s*\{", text, re.M) else "V2"


def _meta_graph(net: Any, source: str) -> CaffeGraph:
    with torch.device("meta"):
        return CaffeGraph(net, source=source)


def _table1_graph(spec: NetSpec) -> CaffeGraph:
    """The deploy net of a Table 1 VGG at the paper's input, as the graph every table is read from."""
    return _meta_graph(vgg_net(spec.config, spec.width, spec.num_classes, lrn_k=spec.lrn_k), f"VGG {spec.config}")


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".caffemodel":
        return f"Caffe binary caffemodel ({read_caffemodel(path).version})"
    if suffix == ".safetensors":
        return "safetensors" + (" (verydeep)" if "config" in read_metadata(path) else "")
    return suffix.lstrip(".") or "unknown"


def summarize(source: str | os.PathLike[str], prototxt: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a weights file or URL, a deploy prototxt or a registry model.

    A prototxt is described at the input it declares (a Table 1 VGG's figures are also the
    paper's when that is 1x3x224x224); any other source at 1x3x224x224 for a VGG, at its net's
    declared input for another Caffe net.
    """
    text = os.fspath(source)
    info: dict[str, Any] = {"source": text}  # as given: a URL must not pass through Path
    spec: NetSpec | None = None
    if is_url(text):
        suffix = Path(urlsplit(text).path).suffix.lower()
        if suffix in PROTOTXT_SUFFIXES:
            raise VerydeepError(f"{text}: verydeep reads a prototxt from a local file; download it first")
        info["format"] = f"{suffix.lstrip('.') or 'unknown'} file from a URL"
        model = load(text, prototxt)
    elif Path(text).suffix.lower() in PROTOTXT_SUFFIXES:
        net = read_prototxt(Path(text))  # a Path: a str holding "{" would be read as the text itself
        info["format"] = f"Caffe deploy prototxt ({prototxt_version(Path(text).read_text(errors='replace'))})"
        model = graph = _meta_graph(net, text)
        spec = vgg_spec(net)
        if spec is not None and sum(p.numel() for p in graph.parameters()) != spec.num_params():
            spec = None  # a Table 1 layout at another input: fc6's size, so its parameters, differ
    elif text in REGISTRY and not cached_path(text).exists():  # the registry knows the net: no download
        entry = REGISTRY[text]
        info["format"] = f"registry entry {text} (weights not downloaded: {entry.filename}, {entry.size:,} bytes)"
        spec = NetSpec(entry.config, entry.num_classes)
        model = _table1_graph(spec)
    else:
        path = fetch(text) if text in REGISTRY else Path(text)
        model = load(path, prototxt)
        info["format"] = _file_format(path)
    if isinstance(model, CaffeGraph):
        graph = model
    else:  # a VGG: its Table 1 deploy net at the paper's input
        spec = NetSpec(model.config, model.num_classes, model.width, model.lrn_k)
        graph = _table1_graph(spec)
    if spec is not None:
        info.update(config=spec.config, width=spec.width, num_classes=spec.num_classes)
    rows, flops = layer_table(graph)
    info["inputs"] = {name: list(graph.blob_shapes[name]) for name in graph.inputs}
    info["layers"] = rows
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["flops"] = flops
    if [tuple(shape) for shape in info["inputs"].values()] == [PAPER_INPUT]:
        info["flops_224"] = flops
    return info
