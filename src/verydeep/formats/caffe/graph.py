"""Run a Caffe deploy net of the supported layer types as a PyTorch module, with Caffe's semantics.

This is the fallback for nets that are not a Table 1 VGG (a fine-tuned variant with renamed or
extra layers, a small custom net); Table 1 nets map onto :class:`verydeep.models.vgg.VGG` instead.
Blobs live in a dict keyed by Caffe's blob names, so in-place layers (``top == bottom``) simply
rebind the name. Parameters are registered under the layer names (``conv1_1.weight``), so
``state_dict()`` reads like the caffemodel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verydeep.errors import CaffeFormatError
from verydeep.formats.caffe import caffe_pb2 as pb
from verydeep.formats.caffe.prototxt import (
    INPUT_TYPES,
    NetParameter,
    active_layers,
    conv_geometry,
    format_prototxt,
    pool_geometry,
    read_prototxt,
    upgrade,
    validate,
)
from verydeep.models.build import format_shape, shape_fits

Shape = tuple[int, ...]
#: Shape assumed for an input the net does not size (a Data layer): one 224x224 colour image.
DEFAULT_INPUT = (1, 3, 224, 224)


# ----------------------------------------------------------------------------- layers


class _Layer(nn.Module):
    """One Caffe layer: ``forward(*bottoms)`` -> tuple of tops; ``shapes`` does the same for shapes."""

    def shapes(self, bottoms: list[Shape]) -> list[Shape]:
        return [bottoms[0]]


class Convolution(_Layer):
    def __init__(self, layer: pb.LayerParameter, bottoms: list[Shape]) -> None:
        super().__init__()
        p = layer.convolution_param
        g = conv_geometry(p)
        self.kernel, self.stride, self.pad, self.dilation = g["kernel"], g["stride"], g["pad"], g["dilation"]
        if p.axis != 1 or len(bottoms[0]) != 4:
            raise ValueError(f"only 2-D convolution over axis 1 is supported (axis {p.axis}, input {bottoms[0]})")
        self.groups, channels = p.group, bottoms[0][1]
        if channels % p.group or p.num_output % p.group:
            raise ValueError(f"group {p.group} does not divide {channels} input / {p.num_output} output channels")
        self.weight = nn.Parameter(torch.zeros(p.num_output, channels // p.group, *self.kernel))
        self.bias = nn.Parameter(torch.zeros(p.num_output)) if p.bias_term else None

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.groups),)

    def shapes(self, bottoms: list[Shape]) -> list[Shape]:
        n, _, h, w = bottoms[0]
        out = [
            (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.pad, self.dilation)
        ]
        return [(n, self.weight.shape[0], *out)]


class InnerProduct(_Layer):
    """Flattens from ``axis`` (C,H,W row-major for axis 1); weights (out, in), or (in, out) if transposed."""

    def __init__(self, layer: pb.LayerParameter, bottoms: list[Shape]) -> None:
        super().__init__()
        p = layer.inner_product_param
        self.axis, self.transpose, self.outputs = p.axis % len(bottoms[0]), p.transpose, p.num_output
        inputs = math.prod(bottoms[0][self.axis :])
        shape = (inputs, p.num_output) if p.transpose else (p.num_output, inputs)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(p.num_output)) if p.bias_term else None

    def forward(self, x: Tensor) -> tuple[Tensor]:
        weight = self.weight.t() if self.transpose else self.weight
        return (F.linear(x.flatten(self.axis), weight, self.bias),)

    def shapes(self, bottoms: list[Shape]) -> list[Shape]:
        return [(*bottoms[0][: self.axis], self.outputs)]


class Pooling(_Layer):
    """MAX/AVE pooling with Caffe's output size: rounded up, the last window starting inside the
    input (or its top/left padding); AVE divides by the window's size clipped to input + padding."""

    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        p = layer.pooling_param
        g = pool_geometry(p)
        self.kernel, self.stride, self.pad = g["kernel"], g["stride"], g["pad"]
        self.max, self.is_global = p.pool == pb.PoolingParameter.MAX, p.global_pooling
        self.ceil = p.round_mode == pb.PoolingParameter.CEIL

    def _geometry(self, h: int, w: int) -> tuple[tuple[int, int], ...]:
        if self.is_global:
            return (h, w), (1, 1), (0, 0)
        return self.kernel, self.stride, self.pad

    def _size(self, size: int, k: int, s: int, p: int) -> int:
        span = size + 2 * p - k
        out = (-(-span // s) if self.ceil else span // s) + 1
        if p and (out - 1) * s >= size + p:
            out -= 1
        return out

    def shapes(self, bottoms: list[Shape]) -> list[Shape]:
        *lead, h, w = bottoms[0]
        (kh, kw), (sh, sw), (ph, pw) = self._geometry(h, w)
        return [(*lead, self._size(h, kh, sh, ph), self._size(w, kw, sw, pw))]

    def forward(self, x: Tensor) -> tuple[Tensor]:
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self._geometry(h, w)
        oh, ow = self._size(h, kh, sh, ph), self._size(w, kw, sw, pw)
        # Pad explicitly so that exactly the oh x ow windows exist: -inf never wins a max; for AVE
        # the sum is taken over zeros and divided by Caffe's own count.
        extra_h, extra_w = max(0, (oh - 1) * sh + kh - h - 2 * ph), max(0, (ow - 1) * sw + kw - w - 2 * pw)
        pads = (pw, pw + extra_w, ph, ph + extra_h)
        if self.max:
            x = F.pad(x, pads, value=-math.inf) if any(pads) else x
            return (F.max_pool2d(x, (kh, kw), (sh, sw))[..., :oh, :ow],)
        x = F.pad(x, pads) if any(pads) else x
        sums = F.avg_pool2d(x, (kh, kw), (sh, sw), divisor_override=1)[..., :oh, :ow]
        counts = [  # window extent within [-pad, size + pad), per output row / column
            [min(i * s - p + k, size + p) - (i * s - p) for i in range(n)]
            for n, size, k, s, p in ((oh, h, kh, sh, ph), (ow, w, kw, sw, pw))
        ]
        return (sums / torch.outer(*(torch.tensor(c, dtype=sums.dtype, device=sums.device) for c in counts)),)


class LRN(_Layer):
    """ACROSS_CHANNELS: x / (k + alpha/size * sum of x^2 over ``size`` channels)^beta (Caffe divides
    alpha by the window size, as does torch); WITHIN_CHANNEL: over a size x size window, k = 1."""

    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        p = layer.lrn_param
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.across = p.norm_region == pb.LRNParameter.ACROSS_CHANNELS

    def forward(self, x: Tensor) -> tuple[Tensor]:
        if self.across:
            return (F.local_response_norm(x, self.size, self.alpha, self.beta, self.k),)
        mean = F.avg_pool2d(x * x, self.size, 1, self.size // 2, count_include_pad=True)
        return (x * (1 + self.alpha * mean).pow(-self.beta),)


class ReLU(_Layer):
    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        self.slope = layer.relu_param.negative_slope

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (F.leaky_relu(x, self.slope) if self.slope else F.relu(x),)


class Dropout(_Layer):
    """Identity in eval mode; in training drops and rescales like Caffe (and torch)."""

    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        self.ratio = layer.dropout_param.dropout_ratio

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (F.dropout(x, self.ratio, self.training),)


class Softmax(_Layer):
    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        self.axis = layer.softmax_param.axis

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (F.softmax(x, self.axis),)


class Concat(_Layer):
    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        p = layer.concat_param
        self.axis = p.concat_dim if p.HasField("concat_dim") and not p.HasField("axis") else p.axis

    def forward(self, *xs: Tensor) -> tuple[Tensor]:
        return (torch.cat(xs, self.axis),)

    def shapes(self, bottoms: list[Shape]) -> list[Shape]:
        axis = self.axis % len(bottoms[0])
        out = list(bottoms[0])
        out[axis] = sum(s[axis] for s in bottoms)
        return [tuple(out)]


class Eltwise(_Layer):
    def __init__(self, layer: pb.LayerParameter, bottoms: list[Shape]) -> None:
        super().__init__()
        p = layer.eltwise_param
        self.op = p.operation
        if p.coeff and len(p.coeff) != len(bottoms):
            raise ValueError(f"{len(p.coeff)} coeff for {len(bottoms)} bottoms")
        if p.coeff and self.op != pb.EltwiseParameter.SUM:
            raise ValueError("coeff is only for operation SUM")
        self.coeff = list(p.coeff)

    def forward(self, *xs: Tensor) -> tuple[Tensor]:
        if self.op == pb.EltwiseParameter.SUM:
            coeff = self.coeff or [1.0] * len(xs)
            out = coeff[0] * xs[0]
            for c, x in zip(coeff[1:], xs[1:]):
                out = out + c * x
            return (out,)
        out = xs[0]
        for x in xs[1:]:
            out = out * x if self.op == pb.EltwiseParameter.PROD else torch.maximum(out, x)
        return (out,)


class Flatten(_Layer):
    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        self.axis, self.end_axis = layer.flatten_param.axis, layer.flatten_param.end_axis

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (x.flatten(self.axis, self.end_axis),)

    def shapes(self, bottoms: list[Shape]) -> list[Shape]:
        shape = bottoms[0]
        a, e = self.axis % len(shape), self.end_axis % len(shape)
        return [(*shape[:a], math.prod(shape[a : e + 1]), *shape[e + 1 :])]


def _build(layer: pb.LayerParameter, bottoms: list[Shape]) -> _Layer:
    if layer.type == "Convolution":
        return Convolution(layer, bottoms)
    if layer.type == "InnerProduct":
        return InnerProduct(layer, bottoms)
    if layer.type == "Eltwise":
        return Eltwise(layer, bottoms)
    simple = {
        "Pooling": Pooling,
        "LRN": LRN,
        "ReLU": ReLU,
        "Dropout": Dropout,
        "Softmax": Softmax,
        "Concat": Concat,
        "Flatten": Flatten,
    }
    return simple[layer.type](layer)


# ----------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class _Step:
    name: str  # Caffe layer name
    attr: str  # attribute of the module holding it
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]


class CaffeGraph(nn.Module):
    """A deploy net (V1 or V2, normalised on the way in) as a module.

    ``input_shape`` sizes the first input when the net does not (or to override it); it matters
    only for InnerProduct layers, whose input size is fixed. Parameters start at zero (build under
    ``torch.device("meta")`` to skip even that) and are filled by :meth:`load_blobs`. The module
    starts in eval mode, as a deploy net runs in Caffe's TEST phase.
    """

    def __init__(self, net: NetParameter, input_shape: Sequence[int] | None = None, source: str = "<net>") -> None:
        super().__init__()
        net = upgrade(net, source)
        validate(net, source)
        self.net, self.source = net, source
        shapes = _input_shapes(net, input_shape)
        self.inputs: list[str] = list(shapes)
        self.blob_shapes: dict[str, Shape] = dict(shapes)
        self.steps: list[_Step] = []
        self.param_layers: dict[str, str] = {}  # Caffe layer name -> attribute (names with '/' or '.')
        for layer in active_layers(net):
            if layer.type in INPUT_TYPES:
                continue
            bottoms = [self.blob_shapes[b] for b in layer.bottom]
            try:
                module = _build(layer, bottoms)
                tops = module.shapes(bottoms)
            except (ValueError, IndexError, ZeroDivisionError) as e:
                where = f"{source}: layer {layer.name!r} ({layer.type})"
                raise CaffeFormatError(f"{where}: {e} (inputs {bottoms})") from None
            attr = self._attribute(layer.name)
            self.add_module(attr, module)
            if layer.type in ("Convolution", "InnerProduct"):
                self.param_layers[layer.name] = attr
            self.steps.append(_Step(layer.name, attr, tuple(layer.bottom), tuple(layer.top)))
            self.blob_shapes.update(zip(layer.top, tops))
        if not self.steps:
            raise CaffeFormatError(f"{source}: the net has no layers to run")
        self.eval()  # a deploy net runs in Caffe's TEST phase: dropout off until .train()

    def _attribute(self, name: str) -> str:
        base = name.replace("/", "_").replace(".", "_") or "layer"
        attr, i = base, 0
        while hasattr(self, attr):
            i += 1
            attr = f"{base}_{i}"
        return attr

    @classmethod
    def from_files(
        cls,
        prototxt: str | os.PathLike[str],
        caffemodel: str | os.PathLike[str] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> CaffeGraph:
        """A graph for ``prototxt``, with the weights of ``caffemodel`` when given."""
        from verydeep.formats.caffe.caffemodel import read_caffemodel

        graph = cls(read_prototxt(prototxt), input_shape, source=os.fspath(prototxt))
        if caffemodel is not None:
            graph.load_blobs(read_caffemodel(caffemodel).blobs, origin=os.fspath(caffemodel))
        return graph

    # ---- weights

    def load_blobs(self, blobs: Mapping[str, Sequence[np.ndarray]], origin: str = "<blobs>") -> None:
        """Fill parameters from Caffe blobs (layer name -> [weight, bias]), checking each shape.

        Caffe's legacy 4-D shapes (fc 1x1xOUTxIN, bias 1x1x1xOUT) are accepted, and fc weights load
        into a convolution of the same size (the dense net) and back.
        """
        for name, attr in self.param_layers.items():
            module = getattr(self, attr)
            params = [(k, p) for k, p in (("weight", module.weight), ("bias", module.bias)) if p is not None]
            expected = ", ".join(f"{k} {format_shape(p.shape)}" for k, p in params)
            arrays = blobs.get(name)
            if arrays is None:
                raise CaffeFormatError(f"{origin}: layer {name!r}: no weights in the file (expected {expected})")
            if len(arrays) != len(params):
                raise CaffeFormatError(
                    f"{origin}: layer {name!r}: expected {len(params)} blobs ({expected}), found {len(arrays)}"
                )
            for (kind, param), array in zip(params, arrays):
                array = np.asarray(array, dtype=np.float32)
                if not shape_fits(array.shape, tuple(param.shape)):
                    raise CaffeFormatError(
                        f"{origin}: layer {name!r}: {kind}: expected shape {format_shape(param.shape)}, "
                        f"found {format_shape(array.shape)}"
                    )
                value = torch.from_numpy(array.reshape(param.shape))
                if param.is_meta:  # built on the meta device: adopt the array without a copy
                    setattr(module, kind, nn.Parameter(value, requires_grad=param.requires_grad))
                else:
                    with torch.no_grad():
                        param.copy_(value)

    def meta(self) -> dict[str, Any]:
        """What :meth:`from_saved` needs besides the state dict (JSON-serialisable)."""
        return {
            "kind": "caffe-graph",
            "prototxt": format_prototxt(self.net),
            "input_shapes": {k: list(self.blob_shapes[k]) for k in self.inputs},
        }

    @classmethod
    def from_saved(cls, meta: Mapping[str, Any], state: Mapping[str, Tensor], source: str = "<saved>") -> CaffeGraph:
        """Rebuild a graph saved as :meth:`meta` + ``state_dict()``."""
        net = read_prototxt(meta["prototxt"])
        first = next(iter(meta.get("input_shapes", {}).values()), None)
        with torch.device("meta"):
            graph = cls(net, first, source=source)
        try:
            graph.load_state_dict(dict(state), strict=True, assign=True)
        except RuntimeError as e:
            raise CaffeFormatError(f"{source}: parameters do not fit the saved net: {e}") from None
        return graph

    # ---- running

    def forward(
        self, x: Tensor | Mapping[str, Tensor], outputs: Sequence[str] | None = None
    ) -> Tensor | dict[str, Tensor]:
        """Run the net on ``x`` (the first input, or a dict input name -> tensor).

        Returns the last layer's top, or with ``outputs`` a dict of those blobs (their final value,
        after in-place layers) or layer outputs (a layer name that is not a blob: its top right
        after it ran); stops after the last one needed.
        """
        blobs = dict(x) if isinstance(x, Mapping) else {self.inputs[0]: x}
        stop, layer_taps = self._plan(outputs)
        taken: dict[str, Tensor] = {}
        for step in self.steps[:stop]:
            try:
                bottoms = [blobs[b] for b in step.bottoms]
            except KeyError as e:
                raise ValueError(f"input blob {e.args[0]!r} not given; the net's inputs are {self.inputs}") from None
            tops = getattr(self, step.attr)(*bottoms)
            blobs.update(zip(step.tops, tops))
            if step.name in layer_taps:
                taken[step.name] = tops[0]
        if outputs is None:
            return blobs[self.steps[-1].tops[0]]
        return {name: taken[name] if name in layer_taps else blobs[name] for name in outputs}

    def _plan(self, outputs: Sequence[str] | None) -> tuple[int, set[str]]:
        """How many steps to run for ``outputs``, and which of them are layer (not blob) names."""
        if outputs is None:
            return len(self.steps), set()
        last_write = {name: -1 for name in self.inputs}
        for i, step in enumerate(self.steps):
            last_write.update(dict.fromkeys(step.tops, i))
        layer_index = {step.name: i for i, step in enumerate(self.steps)}
        stop, layers = 0, set()
        for name in outputs:
            if name in last_write:
                stop = max(stop, last_write[name] + 1)
            elif name in layer_index:
                stop = max(stop, layer_index[name] + 1)
                layers.add(name)
            else:
                raise KeyError(f"{name!r} is neither a blob nor a layer of {self.source}")
        return stop, layers


def _input_shapes(net: NetParameter, override: Sequence[int] | None) -> dict[str, Shape]:
    """Every input blob (net inputs, tops of Input/Data layers) with its shape, declared or assumed."""
    shapes: dict[str, Shape | None] = {}
    for i, name in enumerate(net.input):
        shapes[name] = tuple(net.input_shape[i].dim) if i < len(net.input_shape) else None
    for layer in active_layers(net):
        if layer.type not in INPUT_TYPES:
            continue
        declared = _layer_input_shapes(layer)
        for i, top in enumerate(layer.top):
            shapes[top] = declared[i] if i < len(declared) else declared[0] if len(declared) == 1 else None
    out: dict[str, Shape] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if i == 0 and override is not None:
            shape = tuple(override)
        out[name] = shape if shape is not None else DEFAULT_INPUT
    return out


def _layer_input_shapes(layer: pb.LayerParameter) -> list[Shape]:
    if layer.type == "Input":
        return [tuple(s.dim) for s in layer.input_param.shape]
    if layer.type == "DummyData":
        p = layer.dummy_data_param
        if p.shape:
            return [tuple(s.dim) for s in p.shape]
        return [tuple(d) for d in zip(p.num, p.channels, p.height, p.width)]
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)]
    crop = layer.transform_param.crop_size
    return [(1, 3, crop, crop), (1,)] if crop else []
