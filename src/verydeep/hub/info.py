"""What ``verydeep info`` reports: layers, output shapes, parameters, FLOPs, file format."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep.configs import CROP, NetSpec
from verydeep.errors import VerydeepError
from verydeep.formats.caffe import CaffeGraph, read_caffemodel, read_prototxt, vgg_spec
from verydeep.formats.safetensors import read_metadata
from verydeep.hub.cache import cached_path, fetch
from verydeep.hub.loader import load
from verydeep.hub.registry import REGISTRY
from verydeep.models.build import build_vgg

PROTOTXT_SUFFIXES = (".prototxt", ".pbtxt", ".txt")


def layer_table(model: nn.Module, size: int = CROP) -> tuple[list[dict[str, Any]], int]:
    """Per-layer output shape and parameter count at a 1x3xsize x size input, and the FLOPs
    (2 x multiply-adds of convolutions and inner products), measured with forward hooks."""
    rows: list[dict[str, Any]] = []
    flops = 0

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            nonlocal flops
            if isinstance(module, nn.Conv2d):
                flops += (
                    2
                    * output.numel()
                    * module.in_channels
                    // module.groups
                    * module.kernel_size[0]
                    * module.kernel_size[1]
                )
            elif isinstance(module, nn.Linear):
                flops += 2 * module.in_features * module.out_features * output.shape[0]
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append({"name": name, "type": type(module).__name__, "output": list(shape), "params": params})

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_children() if not list(m.children())]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return rows, flops


def prototxt_version(text: str) -> str:
    """V1 deploy files use ``layers {`` blocks with enum types; V2 ``layer {``."""
    return "V1" if re.search(r"^\s*layers\s*\{", text, re.M) else "V2"


def summarize(source: str | os.PathLike[str], prototxt: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a weights file, a deploy prototxt or a registry model."""
    text = str(source)
    path = Path(text)
    info: dict[str, Any] = {"source": text}
    if path.suffix.lower() in PROTOTXT_SUFFIXES:
        if not path.exists():
            raise VerydeepError(f"{path}: no such file")
        net = read_prototxt(path)
        info["format"] = f"Caffe deploy prototxt ({prototxt_version(path.read_text(errors='replace'))})"
        spec = vgg_spec(net)
        model: nn.Module = build_vgg(spec) if spec else CaffeGraph(net, source=str(path))
        if spec:
            model = model.to_empty(device="cpu")
    elif text in REGISTRY and not cached_path(text).exists():  # the registry knows the net: no download
        entry = REGISTRY[text]
        info["format"] = f"registry entry {text} (weights not downloaded: {entry.filename}, {entry.size:,} bytes)"
        model = build_vgg(NetSpec(entry.config, entry.num_classes)).to_empty(device="cpu")
    else:
        if text in REGISTRY:
            path = fetch(text)
        if path.suffix.lower() == ".caffemodel":
            info["format"] = f"Caffe binary caffemodel ({read_caffemodel(path).version})"
        elif path.suffix.lower() == ".safetensors":
            meta = read_metadata(path)
            info["format"] = "safetensors" + (" (verydeep)" if "config" in meta else "")
        else:
            info["format"] = path.suffix.lstrip(".") or "unknown"
        model = load(path, prototxt)
    if hasattr(model, "config"):
        info.update(config=model.config, width=model.width, num_classes=model.num_classes)
    rows, flops = layer_table(model)
    info["layers"] = rows
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["flops_224"] = flops
    return info
