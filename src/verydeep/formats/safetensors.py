"""safetensors files: verydeep's own weights format, and plain state dicts in Caffe names.

A verydeep file records, in the header's metadata (JSON values), everything needed to rebuild
the net without guessing: the Table 1 configuration, width, classes, LRN k, the input space and
the class names; a Caffe graph records its prototxt. Files without that metadata are recognised
from their parameter shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep.configs import NetSpec
from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError, WeightsError
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.formats.checks import ExportReport, ExportRequest, fail
from verydeep.models.build import build_vgg, default_class_names, vgg_spec_from_shapes
from verydeep.models.vgg import VGG

#: Metadata key that marks files written by verydeep.
FORMAT = "verydeep-weights-1"


def save_safetensors(model: nn.Module, path: str | os.PathLike[str], **metadata: Any) -> Path:
    """Write ``model``'s parameters and what is needed to rebuild it; atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta: dict[str, str] = {"format": FORMAT}
    if isinstance(model, VGG):
        for key, value in model.meta().items():
            meta[key] = json.dumps(value)
    else:
        graph_meta = getattr(model, "meta", None)
        if graph_meta is None:
            raise WeightsError(f"{path}: cannot save a {type(model).__name__}: not a verydeep model")
        meta.update({k: json.dumps(v) for k, v in graph_meta().items()})
    meta.update({k: json.dumps(v) for k, v in metadata.items() if v is not None})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a safetensors file (values JSON-decoded where verydeep wrote them)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        return dict(raw)
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_safetensors(path: str | os.PathLike[str]) -> VGG | CaffeGraph:
    """Map a safetensors file onto a VGG (or a CaffeGraph when it was saved from one)."""
    from safetensors.torch import load_file as st_load

    path = Path(path)
    meta = read_metadata(path)
    state = st_load(str(path))
    if meta.get("kind") == "caffe-graph":
        return CaffeGraph.from_saved(meta, state, source=str(path))
    if "config" in meta:
        spec = NetSpec(**{k: meta[k] for k in ("config", "num_classes", "width", "lrn_k") if k in meta})
        names = meta.get("class_names")
    else:
        found = vgg_spec_from_shapes({k: tuple(v.shape) for k, v in state.items()})
        if found is None:
            raise WeightsError(
                f"{path}: parameters do not form a Table 1 VGG in Caffe names (conv1_1.weight ... fc8.bias)"
            )
        spec, names = found, default_class_names(found.num_classes)
    return build_vgg(spec, state, origin=str(path), class_names=names)


def write_safetensors(request: ExportRequest) -> ExportReport:
    """Write verydeep's own file and read it back: the parameters must be bitwise the same."""
    model, out, space, dense = request.model, request.out, request.space, request.dense
    if space != "caffe":
        raise VerydeepError(
            f"--input {space}: a safetensors file holds verydeep's own VGG, whose input is Caffe space; "
            "for other input spaces use --format onnx or caffe (exact) or torchvision"
        )
    save_safetensors(model, out)
    back = load_safetensors(out)
    mine, theirs = model.state_dict(), back.state_dict()
    same = mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine)
    if not same:
        fail([out], f"{out}: reading the file back did not give the same parameters")
    notes = [f"load with verydeep.load({str(out)!r}); dense: load then model.dense()"] if dense else []
    return ExportReport("safetensors", [str(out)], space, "verydeep.load (bitwise)", 0.0, True, notes)
