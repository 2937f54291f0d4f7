"""Caffe's text format (``deploy.prototxt``): read V1 or V2, normalise to V2, validate, write.

Everything downstream (graph, loader, VGG recognition) sees one form, the *normalised V2*
NetParameter: ``layer {}`` entries with string types, inputs as ``input`` + ``input_shape``.
V1 files (``layers {}``, enum types, ``input_dim``) are upgraded on reading the way Caffe's own
``UpgradeNetAsNeeded`` does, and can be written back for tools that only read V1.

This module also builds the Table 1 deploy nets (:func:`vgg_net`) and recognises them
(:func:`vgg_spec`), so a prototxt can be mapped onto the project's VGG module.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format

from verydeep import configs
from verydeep.core.atomic import write_text
from verydeep.errors import CaffeFormatError
from verydeep.formats.caffe import caffe_pb2 as pb
from verydeep.models.build import format_shape

NetParameter = pb.NetParameter
LayerParameter = pb.LayerParameter

#: V1 enum name -> V2 type string (Caffe's UpgradeV1LayerType).
V1_TO_V2: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}
V2_TO_V1: dict[str, str] = {v: k for k, v in V1_TO_V2.items() if v}

#: Layer types a deploy net may use (see :mod:`verydeep.formats.caffe.graph`).
COMPUTE_TYPES = (
    "Convolution",
    "ReLU",
    "Pooling",
    "LRN",
    "InnerProduct",
    "Dropout",
    "Softmax",
    "Concat",
    "Eltwise",
    "Flatten",
)
#: Layers that only feed data in; at deploy their first top is an input of the net.
INPUT_TYPES = ("Input", "Data", "ImageData", "DummyData", "MemoryData", "HDF5Data", "WindowData")
SUPPORTED_TYPES = COMPUTE_TYPES + INPUT_TYPES

_SEQUENCE_FIELDS = ("include", "exclude", "loss_weight", "blobs")


# ----------------------------------------------------------------------------- reading

#: Largest prototxt read, in bytes. VGG-16's deploy file is 4 KB and even the deepest model-zoo
#: nets' prototxts stay well under 1 MB; protobuf's Python text parser reads about 1.5 MB/s, so
#: this bounds a parse to a few seconds and the text held in memory to a few MB.
MAX_PROTOTXT_BYTES = 4 << 20
#: Most axes a blob may have: Caffe's own limit (``kMaxBlobAxes``).
MAX_BLOB_AXES = 32
#: Most elements in one blob (a declared input or any layer's output). The largest blob of
#: VGG-16's published deploy net (10 x 3 x 224 x 224 input) is conv1's 10 x 64 x 224 x 224 = 32M;
#: 2^30 (4 GiB of float32) still admits dense evaluation of one 4096 x 4096 image (conv1:
#: 64 x 4096 x 4096 = 2^30), and refuses inputs that no memory holds.
MAX_BLOB_ELEMENTS = 1 << 30


def read_prototxt(source: str | os.PathLike[str]) -> NetParameter:
    """Parse a V1 or V2 prototxt (a path, or the text itself) into a validated, normalised V2 net.

    A ``str`` containing a newline or ``{`` is taken as the text; anything else as a path.
    Errors are :class:`CaffeFormatError` naming the file and the line (syntax) or the layer.
    """
    return parse_prototxt(*_load_text(source))


def parse_prototxt(text: str, name: str = "<prototxt text>") -> NetParameter:
    """:func:`read_prototxt` of a text (never a path); ``name`` is what errors call it."""
    if len(text) > MAX_PROTOTXT_BYTES:
        raise CaffeFormatError(f"{name}: {_too_long(len(text))}")
    net = upgrade(_parse(text, name), name)
    validate(net, name)
    return net


def _load_text(source: str | os.PathLike[str]) -> tuple[str, str]:
    """The text and the name errors give it; UTF-8 and at most :data:`MAX_PROTOTXT_BYTES`."""
    if isinstance(source, str) and ("\n" in source or "{" in source):
        return source, "<prototxt text>"
    path = os.fspath(source)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block open() or never end
            raise CaffeFormatError(f"{path}: not a regular file; expected a prototxt")
        with open(path, "rb") as file:
            data = file.read(MAX_PROTOTXT_BYTES + 1)
    except FileNotFoundError:
        raise CaffeFormatError(f"{path}: no such prototxt file") from None
    except OSError as e:
        raise CaffeFormatError(f"{path}: cannot read prototxt: {e.strerror or e}") from None
    except ValueError as e:  # a NUL character in the path
        raise CaffeFormatError(f"{path!r}: not a usable path ({e})") from None
    if len(data) > MAX_PROTOTXT_BYTES:
        raise CaffeFormatError(f"{path}: {_too_long(os.path.getsize(path))}")
    try:
        return data.decode("utf-8"), path
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        binary = b"\0" in data[:1024]
        hint = "binary data (a .caffemodel? give it as the weights)" if binary else "text in another encoding"
        raise CaffeFormatError(
            f"{path}:{line}:{column}: expected UTF-8 text, found byte 0x{data[e.start]:02x} ({hint})"
        ) from None


def _too_long(size: int) -> str:
    return f"{size:,} bytes is larger than the {MAX_PROTOTXT_BYTES:,} a prototxt may have (a deploy net is a few KB)"


def _parse(text: str, name: str) -> NetParameter:
    """Strict parse; a syntax error inside a layer whose type verydeep does not know (its parameters
    are missing from the schema, or a V1 enum name is) is reported as that layer's type."""
    net = NetParameter()
    try:
        text_format.Parse(text, net)  # the schema nests 3 deep, so the parser's recursion is bounded
        return net
    except text_format.ParseError as err:
        line, col = err.GetLine(), err.GetColumn()
        detail = str(err).split(" : ", 1)[-1] if line is not None else str(err)
        lines = text.split("\n")  # as protobuf's tokenizer counts them
        if line is not None and line <= len(lines):  # it quotes the whole line; line:column says where
            detail = detail.removeprefix(f"'{lines[line - 1]}': ")
        detail = _clip(detail.replace("verydeep.caffe.", "caffe."))
        where = f"{name}:{line}:{col}" if line else name
        blamed = _block_at(text, line) if line else None
    if blamed is not None and blamed.type is not None and not _type_known(blamed.type, blamed.v1):
        raise CaffeFormatError(_unsupported(name, blamed.name, blamed.type, blamed.v1))
    raise CaffeFormatError(f"{where}: syntax error: {detail}")


#: Longest quote of protobuf's error detail: the reason and the token, not a whole line of input.
_DETAIL_CHARS = 200


def _clip(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + " ..."


def _type_known(token: str, v1: bool) -> bool:
    """Whether a layer's ``type`` token names a type verydeep runs (V1: an enum name)."""
    return (V1_TO_V2.get(token) if v1 else token) in SUPPORTED_TYPES


def _unsupported(source: str, layer: str | None, found: str, v1: bool) -> str:
    """The one message for a layer type verydeep does not run."""
    names = [V2_TO_V1[t] for t in SUPPORTED_TYPES if t in V2_TO_V1] if v1 else list(SUPPORTED_TYPES)
    what = f"layer {layer!r}" if layer is not None else "a layer"
    kind = f"type {_clip(found)}" if found else "no type"
    return f"{source}: {what}: {kind} is not supported (supported: {', '.join(names)})"


@dataclass
class _LayerBlock:
    """A top-level ``layer {}`` / ``layers {}`` block as the text spells it, found without the schema."""

    v1: bool
    first: int  # lines, 1-based
    last: int
    name: str | None = None
    type: str | None = None


#: The text format's tokens, enough to follow blocks: strings never span lines, comments run to the
#: end of the line, messages open with ``{`` or ``<``.
_TOKEN = re.compile(
    r"""(?P<space>\s+)|(?P<comment>\#[^\n]*)"""
    r"""|(?P<string>"(?:[^"\\\n]|\\[^\n])*"|'(?:[^'\\\n]|\\[^\n])*')"""
    r"""|(?P<open>[{<])|(?P<close>[}>])|(?P<word>[^\s{}<>:;,\[\]\#"']+)|(?P<other>.)"""
)


def _block_at(text: str, line: int) -> _LayerBlock | None:
    """The top-level layer block spanning ``line``, with its name and type: one pass over the
    tokens (no recursion, so any nesting is safe), stopping once past ``line``."""
    depth, at, block = 0, 1, None
    key: str | None = None  # the field name whose value comes next
    for m in _TOKEN.finditer(text):
        kind, token = m.lastgroup, m.group()
        if kind == "space":
            at += token.count("\n")
            if block is None and at > line:
                return None
            continue
        if kind == "comment" or token == ":":
            continue
        if kind == "open":
            if depth == 0 and key in ("layer", "layers"):
                block = _LayerBlock(v1=key == "layers", first=at, last=at)
            depth, key = depth + 1, None
        elif kind == "close":
            depth, key = max(depth - 1, 0), None
            if depth == 0 and block is not None:
                if block.first <= line <= at:
                    block.last = at
                    return block
                block = None
        elif key is None and kind == "word":
            key = token
        else:
            if block is not None and depth == 1 and key in ("name", "type") and getattr(block, key) is None:
                setattr(block, key, token[1:-1] if kind == "string" else token)
            key = None
    return block if block is not None and block.first <= line else None


# ----------------------------------------------------------------------------- V1 <-> V2


def upgrade(net: NetParameter, source: str = "<net>") -> NetParameter:
    """A normalised V2 copy of ``net`` (V1 layers and ``input_dim`` upgraded as Caffe does)."""
    if net.layer and net.layers:
        raise CaffeFormatError(f"{source}: mixes V1 'layers' and V2 'layer' entries; use one format")
    out = NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    if net.input_dim:
        if net.input_shape or len(net.input_dim) != 4 * len(net.input):
            raise CaffeFormatError(
                f"{source}: expected 4 input_dim per input ({len(net.input)} inputs), found {len(net.input_dim)}"
            )
        out.ClearField("input_dim")
        for i in range(len(net.input)):
            out.input_shape.add().dim.extend(net.input_dim[4 * i : 4 * i + 4])
    for v1 in net.layers:
        out.layer.append(_upgrade_layer(v1))
    return out


def _upgrade_layer(v1: pb.V1LayerParameter) -> LayerParameter:
    enum = pb.V1LayerParameter.LayerType.Name(v1.type)
    layer = LayerParameter(name=v1.name, type=V1_TO_V2[enum], bottom=v1.bottom, top=v1.top)
    for field in _SEQUENCE_FIELDS:
        getattr(layer, field).extend(getattr(v1, field))
    for i in range(max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay))):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for field, value in v1.ListFields():
        if field.name.endswith("_param"):
            getattr(layer, field.name).CopyFrom(value)
    return layer


def downgrade(net: NetParameter, source: str = "<net>") -> NetParameter:
    """A V1 copy of ``net`` (any form): enum types, ``input_dim``, ``blobs_lr``/``weight_decay``.

    V1 has no Input layer: Input layers become net inputs. Types or parameters V1 cannot express
    are a :class:`CaffeFormatError`.
    """
    v2 = upgrade(net, source)
    out = NetParameter()
    out.CopyFrom(v2)
    for field in ("layer", "input", "input_shape"):
        out.ClearField(field)
    inputs = list(zip(v2.input, v2.input_shape))
    for layer in v2.layer:
        if layer.type == "Input":
            shapes = list(layer.input_param.shape)
            inputs += [(top, shapes[i if len(shapes) > 1 else 0]) for i, top in enumerate(layer.top)]
        else:
            out.layers.append(_downgrade_layer(layer, source))
    for name, shape in inputs:
        if len(shape.dim) != 4:
            raise CaffeFormatError(f"{source}: input {name!r}: V1 needs 4 input dims, found {list(shape.dim)}")
        out.input.append(name)
        out.input_dim.extend(shape.dim)
    return out


def _downgrade_layer(layer: LayerParameter, source: str) -> pb.V1LayerParameter:
    if layer.type not in V2_TO_V1:
        raise CaffeFormatError(f"{source}: layer {layer.name!r}: type {layer.type!r} has no V1 equivalent")
    v1 = pb.V1LayerParameter(name=layer.name, bottom=layer.bottom, top=layer.top)
    v1.type = pb.V1LayerParameter.LayerType.Value(V2_TO_V1[layer.type])
    for field in _SEQUENCE_FIELDS:
        getattr(v1, field).extend(getattr(layer, field))
    for spec in layer.param:
        if spec.HasField("name"):
            v1.param.append(spec.name)
    if any(s.HasField("lr_mult") for s in layer.param):
        v1.blobs_lr.extend(s.lr_mult for s in layer.param)
    if any(s.HasField("decay_mult") for s in layer.param):
        v1.weight_decay.extend(s.decay_mult for s in layer.param)
    v1_fields = pb.V1LayerParameter.DESCRIPTOR.fields_by_name
    for field, value in layer.ListFields():
        if field.name.endswith("_param") and field.name != "param":
            if field.name not in v1_fields:
                raise CaffeFormatError(f"{source}: layer {layer.name!r}: {field.name} has no V1 equivalent")
            getattr(v1, field.name).CopyFrom(value)
    return v1


# ----------------------------------------------------------------------------- writing


def format_prototxt(net: NetParameter, version: str = "V2") -> str:
    """The text of ``net`` as a V2 (``layer {}``) or V1 (``layers {}``) prototxt."""
    if version not in ("V1", "V2"):
        raise ValueError(f"version must be 'V1' or 'V2', not {version!r}")
    net = downgrade(net) if version == "V1" else upgrade(net)
    layers, key = (net.layers, "layers") if version == "V1" else (net.layer, "layer")
    head = NetParameter()
    head.CopyFrom(net)
    head.ClearField(key)
    parts = [text_format.MessageToString(head)]  # net fields first, then the layers in order
    for layer in layers:
        body = text_format.MessageToString(layer)
        parts.append(f"{key} {{\n" + "".join(f"  {line}\n" for line in body.splitlines()) + "}\n")
    return "".join(parts)


def write_prototxt(net: NetParameter, path: str | os.PathLike[str], version: str = "V2") -> None:
    """Write ``net`` as a V2 or V1 prototxt file (atomically: a reader never sees half a net)."""
    write_text(path, format_prototxt(net, version))


# ----------------------------------------------------------------------------- validation


def active_layers(net: NetParameter) -> list[LayerParameter]:
    """The layers Caffe instantiates for ``net``'s state (TEST phase unless the net says otherwise)."""
    phase = net.state.phase if net.HasField("state") else pb.TEST
    level = net.state.level
    stages = set(net.state.stage)

    def meets(rule: pb.NetStateRule) -> bool:
        return (
            (not rule.HasField("phase") or rule.phase == phase)
            and (not rule.HasField("min_level") or level >= rule.min_level)
            and (not rule.HasField("max_level") or level <= rule.max_level)
            and all(s in stages for s in rule.stage)
            and not any(s in stages for s in rule.not_stage)
        )

    def included(layer: LayerParameter) -> bool:
        if layer.include:
            return any(meets(r) for r in layer.include)
        return not any(meets(r) for r in layer.exclude)

    return [layer for layer in net.layer if included(layer)]


def validate(net: NetParameter, source: str = "<net>") -> None:
    """Check a normalised net can run in :class:`~verydeep.formats.caffe.graph.CaffeGraph`:
    supported types, the blobs each layer takes and gives, every bottom produced earlier, declared
    input shapes, and each layer's parameters in the range the graph computes with. What depends
    on blob shapes (a kernel larger than its input, an axis past a blob's last) is checked when the
    graph is built."""
    _check_types(net, source)
    if len(net.input_shape) > len(net.input):
        raise CaffeFormatError(f"{source}: {len(net.input_shape)} input_shape entries for {len(net.input)} inputs")
    for name, shape in zip(net.input, net.input_shape):
        problem = shape_problem(shape.dim)
        if problem:
            raise CaffeFormatError(f"{source}: input {name!r}: shape {format_shape(shape.dim)} {problem}")
    blobs = set(net.input)
    weighted: set[str] = set()
    for layer in active_layers(net):
        where = f"{source}: layer {layer.name!r} ({layer.type})"
        problem = _blob_count_problem(layer)
        if problem:
            raise CaffeFormatError(f"{where}: {problem}")
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise CaffeFormatError(f"{where}: bottom {bottom!r} is not produced by an earlier layer or a net input")
        problem = next(_PARAMETER_CHECKS.get(layer.type, _no_problems)(layer), None)
        if problem:
            raise CaffeFormatError(f"{where}: {problem}")
        if layer.type in ("Convolution", "InnerProduct"):
            if layer.name in weighted:
                raise CaffeFormatError(f"{where}: a second layer of this name with weights (they are matched by name)")
            weighted.add(layer.name)
        blobs.update(layer.top)


def _check_types(net: NetParameter, source: str) -> None:
    for layer in active_layers(net):
        if layer.type not in SUPPORTED_TYPES:
            raise CaffeFormatError(_unsupported(source, layer.name, layer.type, v1=False))


def shape_problem(dims: Sequence[object]) -> str | None:
    """Why a blob of shape ``dims`` cannot be built (None if it can): 1 to :data:`MAX_BLOB_AXES`
    positive whole dims, at most :data:`MAX_BLOB_ELEMENTS` elements."""
    if not 1 <= len(dims) <= MAX_BLOB_AXES:
        return f"has {len(dims)} axes; expected 1 to {MAX_BLOB_AXES}"
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        return "has a dim that is not a positive whole number"
    elements = math.prod(dims)  # type: ignore[arg-type]  # ints, checked above
    if elements > MAX_BLOB_ELEMENTS:
        return f"has {elements:,} elements, more than the {MAX_BLOB_ELEMENTS:,} verydeep allows in one blob"
    return None


#: (fewest, most) bottoms and (fewest, most) tops of each type; None: no limit. Input layers take
#: none and give one or more (data, label, ...).
_BLOB_COUNTS: dict[str, tuple[tuple[int, int | None], tuple[int, int | None]]] = {
    **{t: ((1, 1), (1, 1)) for t in ("Convolution", "InnerProduct", "Pooling", "LRN", "ReLU", "Dropout")},
    **{t: ((1, 1), (1, 1)) for t in ("Softmax", "Flatten")},
    "Concat": ((1, None), (1, 1)),
    "Eltwise": ((2, None), (1, 1)),
    **{t: ((0, 0), (1, None)) for t in INPUT_TYPES},
}


def _blob_count_problem(layer: LayerParameter) -> str | None:
    for what, found, (least, most) in zip(("bottoms", "tops"), (layer.bottom, layer.top), _BLOB_COUNTS[layer.type]):
        if len(found) < least or (most is not None and len(found) > most):
            expected = str(least) if least == most else f"at least {least}" if most is None else f"{least} to {most}"
            return f"{what}: expected {expected}, found {len(found)}"
    return None


Problems = Iterator[str]


def _no_problems(layer: LayerParameter) -> Problems:
    yield from ()


def _size_problems(p: Any, name: str, field: str, minimum: int, required: bool = False) -> Problems:
    """A 2-D size (``kernel``, ``pad``, ``stride``) given as ``field`` (1 or 2 values) or as
    ``<name>_h`` + ``<name>_w``, each at least ``minimum``."""
    h, w = f"{name}_h", f"{name}_w"
    value = getattr(p, field)
    count = int(p.HasField(field)) if isinstance(value, int) else len(value)
    has_h, has_w = p.HasField(h), p.HasField(w)
    if count > 2:
        yield f"{field} has {count} values; verydeep runs 2-D layers (1 or 2 values)"
    elif count and (has_h or has_w):
        yield f"give {field} or {h}/{w}, not both"
    elif required and not (count or has_h or has_w):
        yield f"{field} is missing"
    elif name == "kernel" and has_h != has_w:
        yield f"{h} and {w} go together"
    else:
        pair = _pair(p, name, minimum)
        if min(pair) < minimum:
            yield f"{name} must be at least {minimum}, found {format_shape(pair)}"


def _num_output_problems(p: Any) -> Problems:
    if not p.HasField("num_output"):
        yield "num_output is missing"
    elif p.num_output < 1:
        yield f"num_output must be at least 1, found {p.num_output}"


def _axis_problems(name: str, axis: int) -> Problems:
    if not -MAX_BLOB_AXES <= axis < MAX_BLOB_AXES:
        yield f"{name} {axis} is out of range (a blob has at most {MAX_BLOB_AXES} axes)"


def _finite_problems(p: Any, *fields: str) -> Problems:
    for field in fields:
        value = getattr(p, field)
        if not math.isfinite(value):
            yield f"{field} must be a finite number, found {value}"


def _shape_problems(shapes: Sequence[Sequence[int]], tops: int, what: str) -> Problems:
    if len(shapes) not in (0, 1, tops):
        yield f"{what}: expected one shape, or one per top ({tops}), found {len(shapes)}"
    for dims in shapes:
        problem = shape_problem(dims)
        if problem:
            yield f"{what}: shape {format_shape(dims)} {problem}"


def _convolution_problems(layer: LayerParameter) -> Problems:
    p = layer.convolution_param
    yield from _num_output_problems(p)
    yield from _size_problems(p, "kernel", "kernel_size", 1, required=True)
    yield from _size_problems(p, "pad", "pad", 0)
    yield from _size_problems(p, "stride", "stride", 1)
    if len(p.dilation) > 2:
        yield f"dilation has {len(p.dilation)} values; verydeep runs 2-D layers (1 or 2 values)"
    if any(d < 1 for d in p.dilation):
        yield f"dilation must be at least 1, found {format_shape(p.dilation)}"
    if p.group < 1:
        yield "group must be at least 1, found 0"
    elif p.num_output % p.group:
        yield f"group {p.group} does not divide num_output {p.num_output}"
    if p.axis != 1:
        yield f"axis must be 1 (the channels of an N x C x H x W input), found {p.axis}"


def _pooling_problems(layer: LayerParameter) -> Problems:
    p = layer.pooling_param
    if p.pool == pb.PoolingParameter.STOCHASTIC:
        yield "STOCHASTIC pooling is not supported (MAX and AVE are)"
    geometry = pool_geometry(p)
    if p.global_pooling:
        if any(p.HasField(f) for f in ("kernel_size", "kernel_h", "kernel_w")):
            yield "global_pooling takes no kernel size (the kernel is the whole input)"
        elif geometry["pad"] != (0, 0) or geometry["stride"] != (1, 1):
            yield "global_pooling needs pad 0 and stride 1"
        return
    yield from _size_problems(p, "kernel", "kernel_size", 1, required=True)
    yield from _size_problems(p, "pad", "pad", 0)
    yield from _size_problems(p, "stride", "stride", 1)
    if any(pad >= k for pad, k in zip(geometry["pad"], geometry["kernel"])):
        yield f"pad {format_shape(geometry['pad'])} must be smaller than the kernel {format_shape(geometry['kernel'])}"


def _inner_product_problems(layer: LayerParameter) -> Problems:
    yield from _num_output_problems(layer.inner_product_param)
    yield from _axis_problems("axis", layer.inner_product_param.axis)


def _lrn_problems(layer: LayerParameter) -> Problems:
    p = layer.lrn_param
    if p.local_size % 2 == 0:
        yield f"local_size must be odd, found {p.local_size}"
    yield from _finite_problems(p, "alpha", "beta", "k")


def _dropout_problems(layer: LayerParameter) -> Problems:
    ratio = layer.dropout_param.dropout_ratio
    if not 0 <= ratio < 1:
        yield f"dropout_ratio must be in [0, 1), found {ratio:g}"


def _concat_problems(layer: LayerParameter) -> Problems:
    p = layer.concat_param
    if p.HasField("axis") and p.HasField("concat_dim"):
        yield "give axis or concat_dim, not both"
    yield from _axis_problems("axis", concat_axis(p))


def _eltwise_problems(layer: LayerParameter) -> Problems:
    p = layer.eltwise_param
    if p.coeff and p.operation != pb.EltwiseParameter.SUM:
        yield "coeff is only for operation SUM"
    if p.coeff and len(p.coeff) != len(layer.bottom):
        yield f"coeff: expected one per bottom ({len(layer.bottom)}), found {len(p.coeff)}"
    if not all(math.isfinite(c) for c in p.coeff):
        yield f"coeff must be finite numbers, found {list(p.coeff)}"


def _flatten_problems(layer: LayerParameter) -> Problems:
    yield from _axis_problems("axis", layer.flatten_param.axis)
    yield from _axis_problems("end_axis", layer.flatten_param.end_axis)


def _dummy_data_problems(layer: LayerParameter) -> Problems:
    p = layer.dummy_data_param
    legacy = [list(d) for d in zip(p.num, p.channels, p.height, p.width)]
    yield from _shape_problems([list(s.dim) for s in p.shape] or legacy, len(layer.top), "dummy_data_param")


def _memory_data_problems(layer: LayerParameter) -> Problems:
    p = layer.memory_data_param
    yield from _shape_problems([[p.batch_size, p.channels, p.height, p.width]], 1, "memory_data_param")


#: The parameter checks of each type (types without parameters the graph uses have none).
_PARAMETER_CHECKS: dict[str, Callable[[LayerParameter], Problems]] = {
    "Convolution": _convolution_problems,
    "Pooling": _pooling_problems,
    "InnerProduct": _inner_product_problems,
    "LRN": _lrn_problems,
    "Dropout": _dropout_problems,
    "ReLU": lambda layer: _finite_problems(layer.relu_param, "negative_slope"),
    "Softmax": lambda layer: _axis_problems("axis", layer.softmax_param.axis),
    "Concat": _concat_problems,
    "Eltwise": _eltwise_problems,
    "Flatten": _flatten_problems,
    "Input": lambda layer: _shape_problems(
        [list(s.dim) for s in layer.input_param.shape], len(layer.top), "input_param"
    ),
    "DummyData": _dummy_data_problems,
    "MemoryData": _memory_data_problems,
}


# ----------------------------------------------------------------------------- geometry


def _pair(param: Any, name: str, default: int) -> tuple[int, int]:
    """Caffe's 2-D reading of a size field (``pad``, ``stride``, ``kernel``) with ``_h``/``_w`` overrides."""
    h, w = f"{name}_h", f"{name}_w"
    if param.HasField(h) or param.HasField(w):
        return getattr(param, h), getattr(param, w)
    field = "kernel_size" if name == "kernel" else name
    value = getattr(param, field)
    values = list(value) if not isinstance(value, int) else ([value] if param.HasField(field) else [])
    if not values:
        return default, default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def conv_geometry(p: pb.ConvolutionParameter) -> dict[str, tuple[int, int]]:
    """Kernel, stride, pad and dilation (each as (h, w)) of a Convolution layer."""
    dilation = list(p.dilation) or [1]
    return {
        "kernel": _pair(p, "kernel", 0),
        "stride": _pair(p, "stride", 1),
        "pad": _pair(p, "pad", 0),
        "dilation": (dilation[0], dilation[-1]),
    }


def concat_axis(p: pb.ConcatParameter) -> int:
    """The axis a Concat layer joins along (``concat_dim`` is the legacy spelling)."""
    return p.concat_dim if p.HasField("concat_dim") and not p.HasField("axis") else p.axis


def pool_geometry(p: pb.PoolingParameter) -> dict[str, tuple[int, int]]:
    """Kernel, stride and pad (each as (h, w)) of a Pooling layer; ignore for ``global_pooling``."""
    return {"kernel": _pair(p, "kernel", 0), "stride": _pair(p, "stride", 1), "pad": _pair(p, "pad", 0)}


# ----------------------------------------------------------------------------- Table 1 nets

#: Names of the published deploy files' nets.
_PUBLISHED_NAMES = {"D": "VGG_ILSVRC_16_layers", "E": "VGG_ILSVRC_19_layers"}
#: Dense (fully convolutional) kernel of each fc layer: fc6 sees pool5 as 7x7.
_DENSE_KERNEL = {"fc6": configs.POOL5_SIZE, "fc7": 1, "fc8": 1}


def vgg_net(
    config: str,
    width: float = 1.0,
    num_classes: int = 1000,
    *,
    dense: bool = False,
    batch: int = 1,
    size: int = configs.CROP,
    version: str = "V2",
    lrn_k: float = configs.LRN_DEFAULTS["k"],
) -> NetParameter:
    """The deploy net of a Table 1 configuration, laid out and named like the published files.

    ``dense=True`` gives the fully convolutional net (fc6 a 7x7 convolution, fc7/fc8 1x1) with
    the same parameter names. ``version="V1"`` returns the V1 form (``layers``, ``input_dim``).
    """
    cfg = configs.canonical(config)
    net = NetParameter(name=_PUBLISHED_NAMES.get(cfg, f"VGG_{cfg}"), input=["data"])
    net.input_shape.add().dim.extend([batch, 3, size, size])
    blob = "data"
    for spec in configs.layer_specs(cfg, width, num_classes):
        layer = net.layer.add(name=spec.name, bottom=[blob])
        if spec.kind == "conv" or (spec.kind == "fc" and dense):
            kernel = spec.kernel if spec.kind == "conv" else _DENSE_KERNEL[spec.name]
            layer.type = "Convolution"
            layer.convolution_param.num_output = spec.out_channels
            if spec.kind == "conv" and kernel // 2:
                layer.convolution_param.pad.append(kernel // 2)
            layer.convolution_param.kernel_size.append(kernel)
        elif spec.kind == "fc":
            layer.type = "InnerProduct"
            layer.inner_product_param.num_output = spec.out_channels
        elif spec.kind == "relu":
            layer.type = "ReLU"
        elif spec.kind == "dropout":
            layer.type = "Dropout"
            layer.dropout_param.dropout_ratio = 0.5
        elif spec.kind == "lrn":
            layer.type = "LRN"
            lrn = configs.LRN_DEFAULTS
            layer.lrn_param.local_size = lrn["size"]
            layer.lrn_param.alpha = lrn["alpha"]
            layer.lrn_param.beta = lrn["beta"]
            layer.lrn_param.k = lrn_k
        elif spec.kind == "pool":
            layer.type = "Pooling"
            layer.pooling_param.pool = pb.PoolingParameter.MAX
            layer.pooling_param.kernel_size = 2
            layer.pooling_param.stride = 2
        else:
            raise AssertionError(f"unexpected layer kind {spec.kind!r}")
        if spec.kind not in ("relu", "dropout"):  # those work in place
            blob = spec.name
        layer.top.append(blob)
    net.layer.add(name="prob", type="Softmax", bottom=[blob], top=["prob"])
    return downgrade(net) if version == "V1" else net


def vgg_spec(net: NetParameter) -> configs.NetSpec | None:
    """The :class:`~verydeep.configs.NetSpec` of ``net`` when it is a Table 1 VGG, else None.

    The net must be the plain chain of :func:`vgg_net` (any batch/input size, V1 or V2, with or
    without dropout, the final Softmax, data layers and loss/accuracy heads) with Caffe's names on
    the conv and fc layers, so its parameters map onto the VGG module by name.
    """
    net = upgrade(net)
    layers = [l for l in active_layers(net) if not _ignored_by_vgg_spec(l)]
    if layers and layers[-1].type == "Softmax":
        layers.pop()
    if len(layers) < 2 or layers[0].name != "conv1_1" or layers[0].type != "Convolution":
        return None
    if not _is_chain(net, layers):
        return None
    num_outputs = {l.name: _num_output(l) for l in layers}
    num_classes, dense = num_outputs[layers[-1].name], layers[-1].type == "Convolution"
    # conv1_1 gives the width; fc6 (4096 wide) gives it more precisely when rounding hides it.
    widths = [num_outputs["conv1_1"] / configs.STAGE_CHANNELS[0], num_outputs.get("fc6", 0) / configs.FC_WIDTH]
    for width in dict.fromkeys(w for w in widths if w > 0):
        for config in configs.TABLE_1:
            specs = [s for s in configs.layer_specs(config, width, num_classes) if s.kind != "dropout"]
            if len(specs) == len(layers) and all(_is_table1_layer(l, s, dense) for l, s in zip(layers, specs)):
                lrn = [l.lrn_param.k for l in layers if l.type == "LRN"]
                k = lrn[0] if lrn else configs.LRN_DEFAULTS["k"]
                try:
                    return configs.NetSpec(config, num_classes, width, k, dense)
                except ValueError:  # a width NetSpec does not describe (thousands of times VGG's)
                    return None
    return None


def _ignored_by_vgg_spec(layer: LayerParameter) -> bool:
    """Inputs, dropout (identity at test) and the training heads a caffemodel's own net may carry."""
    return layer.type in INPUT_TYPES or layer.type in ("Dropout", "Accuracy") or layer.type.endswith("Loss")


def _num_output(layer: LayerParameter) -> int:
    return (layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param).num_output


def _is_chain(net: NetParameter, layers: list[LayerParameter]) -> bool:
    """Each layer reads the previous one's output, from a 3-channel input."""
    shapes = [s.dim for s in net.input_shape] + [
        s.dim for l in net.layer if l.type == "Input" for s in l.input_param.shape
    ]
    if any(len(dims) > 1 and dims[1] != 3 for dims in shapes):
        return False
    blob = layers[0].bottom[0] if len(layers[0].bottom) == 1 else None
    for layer in layers:
        if list(layer.bottom) != [blob] or len(layer.top) != 1:
            return False
        blob = layer.top[0]
    return True


def _is_table1_layer(layer: LayerParameter, spec: configs.LayerSpec, dense: bool) -> bool:
    """Whether ``layer`` is exactly the Table 1 layer ``spec`` (dense: fc as convolution)."""
    if spec.kind == "conv" or (spec.kind == "fc" and dense):
        p = layer.convolution_param
        k = spec.kernel if spec.kind == "conv" else _DENSE_KERNEL[spec.name]
        pad = k // 2 if spec.kind == "conv" else 0
        geometry = conv_geometry(p)
        return (
            layer.type == "Convolution"
            and layer.name == spec.name
            and p.num_output == spec.out_channels
            and geometry == {"kernel": (k, k), "stride": (1, 1), "pad": (pad, pad), "dilation": (1, 1)}
            and p.group == 1
            and p.bias_term
            and p.axis == 1
        )
    if spec.kind == "fc":
        p = layer.inner_product_param
        return (
            layer.type == "InnerProduct"
            and layer.name == spec.name
            and p.num_output == spec.out_channels
            and p.bias_term
            and p.axis == 1
            and not p.transpose
        )
    if spec.kind == "relu":
        return layer.type == "ReLU" and layer.relu_param.negative_slope == 0
    if spec.kind == "pool":
        p = layer.pooling_param
        return (
            layer.type == "Pooling"
            and p.pool == pb.PoolingParameter.MAX
            and not p.global_pooling
            and pool_geometry(p) == {"kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)}
            and p.round_mode == pb.PoolingParameter.CEIL
        )
    if spec.kind == "lrn":
        p, lrn = layer.lrn_param, configs.LRN_DEFAULTS
        return (
            layer.type == "LRN"
            and p.local_size == lrn["size"]
            and abs(p.alpha - lrn["alpha"]) < 1e-9
            and p.beta == lrn["beta"]
            and p.norm_region == pb.LRNParameter.ACROSS_CHANNELS
        )
    return False
