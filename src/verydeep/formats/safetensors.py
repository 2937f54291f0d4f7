"""safetensors files: verydeep's own weights format, and plain state dicts in Caffe names.

A verydeep file records, in the header's metadata (JSON values), everything needed to rebuild
the net without guessing: the Table 1 configuration, width, classes, LRN k, the input space and
the class names; a Caffe graph records its prototxt. Files without that metadata are recognised
from their parameter shapes.

Nothing in a file is trusted: the header's size is checked against :data:`MAX_HEADER_BYTES` and
the file's size before the library parses it, every metadata value against :data:`METADATA`
(key -> what it must be), the net the metadata describes against the bytes the file holds, and
every tensor against the parameter it fills (:func:`verydeep.models.build.state_from_arrays`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from verydeep import configs
from verydeep.configs import NetSpec
from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError, WeightsError
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.formats.checks import ExportReport, ExportRequest, fail
from verydeep.models.build import (
    build_vgg,
    default_class_names,
    error_reason,
    format_shape,
    quote,
    vgg_spec_from_shapes,
)
from verydeep.models.vgg import VGG

#: Metadata key that marks files written by verydeep.
FORMAT = "verydeep-weights-1"
#: The input space every verydeep file's VGG takes (what :meth:`VGG.meta` records).
CAFFE_INPUT = "caffe-bgr-0-255-mean-subtracted"

#: Largest header (tensor table plus metadata, JSON) verydeep reads. The largest it writes is a
#: Caffe graph's: the prototxt (a few hundred KB for the deepest model-zoo nets) and about 100
#: bytes per tensor; 1000 class names take 30 KB. 16 MiB leaves ample room and keeps the parse
#: well under a second (the safetensors library alone would take 100 MB).
MAX_HEADER_BYTES = 16 * 2**20
#: Caffe's kMaxBlobAxes, and its element count is an int: the bounds of a saved input shape.
MAX_AXES = 32
MAX_BLOB_COUNT = 2**31 - 1

Check = Callable[[Any], bool]


def _integer(low: int) -> Check:
    return lambda v: type(v) is int and v >= low  # type(): JSON true/false are not counts


def _positive(v: Any) -> bool:
    if type(v) is int:  # JSON integers have no size limit; beyond 2**53 no float holds them exactly
        return 0 < v <= 2**53
    return type(v) is float and math.isfinite(v) and v > 0


def _config(v: Any) -> bool:
    try:
        return isinstance(v, str) and bool(configs.canonical(v))
    except ValueError:
        return False


def _names(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v))


def _input_shapes(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(s, list)
        and 0 < len(s) <= MAX_AXES
        and all(type(d) is int and d >= 1 for d in s)
        and math.prod(s) <= MAX_BLOB_COUNT
        for s in v.values()
    )


def _text(v: Any) -> bool:
    return isinstance(v, str)


#: Metadata key -> (what its JSON value must be, the check). Keys verydeep does not know are
#: kept as found (JSON-decoded when they are JSON): they are notes, nothing is built from them.
METADATA: dict[str, tuple[str, Check]] = {
    "config": (f"a Table 1 configuration ({', '.join(configs.TABLE_1)})", _config),
    "num_classes": ("a positive integer", _integer(1)),
    "width": ("a positive finite number", _positive),
    "lrn_k": ("a positive finite number (Caffe's LRN divides by a power of k + ...)", _positive),
    "input_space": (repr(CAFFE_INPUT), lambda v: v == CAFFE_INPUT),
    "class_names": ("a list of strings, or null", _names),
    "kind": ("'caffe-graph'", lambda v: v == "caffe-graph"),
    # A string without '{' would be read as a file name by read_prototxt, not as the net's text.
    "prototxt": ("the net's prototxt text", lambda v: isinstance(v, str) and "{" in v),
    "input_shapes": (f"an object: input name -> 1 to {MAX_AXES} positive dimensions", _input_shapes),
    "source": ("a string", _text),
    "source_sha256": ("a string", _text),
    "license": ("a string", _text),
    "trained_by": ("a string", _text),
    "epochs": ("a non-negative integer", _integer(0)),
    "steps": ("a non-negative integer", _integer(0)),
}


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
    validate_metadata(meta, str(path))  # never write a file that would not load
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


T = TypeVar("T")


def _library(path: Path, what: str, call: Callable[[], T]) -> T:
    """``call()`` into the safetensors library; whatever it raises becomes one WeightsError."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # SafetensorError, and a Rust panic arrives as pyo3's PanicException (a BaseException)
        raise WeightsError(f"{path}: {what} ({error_reason(e)})") from None


def _header_size(path: Path) -> int:
    """The file's size, once its 8-byte header length is within bounds (read before the library
    is asked to parse it, so that a claimed 100 MB header costs nothing)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or error_reason(e)})") from None
    unreadable = f"{path}: not a readable safetensors file"
    if len(head) < 8:
        raise WeightsError(f"{unreadable}: {size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(head, "little")
    if length > MAX_HEADER_BYTES:
        raise WeightsError(f"{unreadable}: a header of {length:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed")
    if 8 + length > size:
        raise WeightsError(f"{unreadable}: truncated: the header claims {length:,} bytes, {size - 8:,} follow")
    return size


def validate_metadata(raw: Mapping[str, str], origin: str) -> dict[str, Any]:
    """The metadata of a verydeep file, JSON-decoded and checked against :data:`METADATA`; any
    other file's metadata as found (strings), since nothing is built from it."""
    found = raw.get("format")
    if found != FORMAT:
        if isinstance(found, str) and found.startswith("verydeep-weights-"):
            raise WeightsError(f"{origin}: format {quote(found)}: this verydeep reads {FORMAT!r} (a newer file?)")
        return dict(raw)
    meta: dict[str, Any] = {"format": FORMAT}
    for key, text in raw.items():
        if key == "format":
            continue
        spec = METADATA.get(key)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            if spec is not None:
                raise WeightsError(
                    f"{origin}: metadata {quote(key)}: expected {spec[0]} in JSON, found {quote(text)}"
                ) from None
            value = text
        if spec is not None and not spec[1](value):
            raise WeightsError(f"{origin}: metadata {quote(key)}: expected {spec[0]}, found {quote(text)}")
        meta[key] = value
    names, classes = meta.get("class_names"), meta.get("num_classes", NetSpec.num_classes)
    if names is not None and len(names) != classes:
        raise WeightsError(
            f"{origin}: metadata 'class_names': expected {classes} names (num_classes), found {len(names)}"
        )
    return meta


def _contents(path: Path) -> tuple[int, dict[str, Any], dict[str, tuple[int, ...]]]:
    """The file's size, its checked metadata, and its tensors' shapes; no tensor data is read."""
    from safetensors import safe_open

    size = _header_size(path)

    def header() -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    raw, shapes = _library(path, "not a readable safetensors file", header)
    return size, validate_metadata(raw, str(path)), shapes


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a safetensors file (values JSON-decoded and checked where verydeep
    wrote them)."""
    return _contents(Path(path))[1]


def _spec(path: Path, size: int, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> NetSpec:
    """The net verydeep's metadata names, or else the one the shapes form. A described net is
    refused when the file is too small to hold its parameters (a byte each at least), before
    anything is built for it."""
    if "config" not in meta:
        found = vgg_spec_from_shapes(shapes)
        if found is None:
            sample = ", ".join(f"{k} {format_shape(s)}" for k, s in list(shapes.items())[:3]) or "no tensors"
            raise WeightsError(
                f"{path}: parameters do not form a Table 1 VGG in Caffe names (conv1_1.weight ... fc8.bias); "
                f"found {sample}"
            )
        return found
    try:
        spec = NetSpec(**{k: meta[k] for k in ("config", "num_classes", "width", "lrn_k") if k in meta})
    except (ValueError, OverflowError) as e:  # a width NetSpec refuses
        raise WeightsError(f"{path}: metadata: {error_reason(e)}") from None
    count = spec.num_params()
    if count > size:
        raise WeightsError(
            f"{path}: metadata describes VGG-{spec.config} (width {spec.width:g}, {spec.num_classes} classes) with "
            f"{count:,} parameters; the file has {size:,} bytes"
        )
    return spec


def load_safetensors(path: str | os.PathLike[str]) -> VGG | CaffeGraph:
    """Map a safetensors file onto a VGG (or a CaffeGraph when it was saved from one)."""
    from safetensors.torch import load_file as st_load

    path = Path(path)
    size, meta, shapes = _contents(path)
    ours = meta.get("format") == FORMAT  # only verydeep's metadata describes the net
    if ours and meta.get("kind") == "caffe-graph":
        if "prototxt" not in meta:
            raise WeightsError(f"{path}: metadata: a Caffe graph's file without its 'prototxt'")
        state = _library(path, "cannot read its tensors", lambda: st_load(str(path)))
        return CaffeGraph.from_saved(meta, state, source=str(path))
    spec = _spec(path, size, meta if ours else {}, shapes)
    state = _library(path, "cannot read its tensors", lambda: st_load(str(path)))
    names = meta.get("class_names") if ours and "config" in meta else default_class_names(spec.num_classes)
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
