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
    concat_axis,
    conv_geometry,
    format_prototxt,
    parse_prototxt,
    pool_geometry,
    read_prototxt,
    shape_problem,
    upgrade,
    validate,
)
from verydeep.models.build import checked_tensor, format_shape, shape_fits

Shape = tuple[int, ...]
#: Shape assumed for an input the net does not size (a Data layer): one 224x224 colour image.
DEFAULT_INPUT = (1, 3, 224, 224)
#: Most parameters (weight and bias elements) a net may declare: 2^29, 2 GiB of float32. That is
#: 3.7 times VGG-19's 144M (the largest net of the paper) and leaves room for fine-tuned heads
#: (an ImageNet-21k fc8 adds 89M), while a prototxt alone can make verydeep allocate at most 2 GiB
#: of zeros (a graph built under ``torch.device("meta")`` allocates nothing).
MAX_PARAMS = 1 << 29

#: What :meth:`_Layer.infer` returns: the shapes of the parameters (``weight``, ``bias``) and tops.
Inferred = tuple[dict[str, Shape], list[Shape]]


def _canonical_axis(name: str, axis: int, shape: Shape) -> int:
    """Caffe's ``CanonicalAxisIndex``: ``axis`` in [-ndim, ndim), negative counting from the end."""
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{name} {axis} is out of range for the {len(shape)}-axis input {format_shape(shape)}")
    return axis % len(shape)


def _four_d(shape: Shape) -> Shape:
    if len(shape) != 4:
        raise ValueError(f"expected an N x C x H x W input, found {format_shape(shape)}")
    return shape


# ----------------------------------------------------------------------------- layers


class _Layer(nn.Module):
    """One Caffe layer: ``forward(*bottoms)`` -> tuple of tops.

    Built in two steps so that nothing is allocated for a net that does not fit: the constructor
    reads the parameters, :meth:`infer` computes the shapes in plain integers (ValueError: the
    layer does not fit its inputs), and :meth:`allocate` creates the parameters.
    """

    def infer(self, bottoms: list[Shape]) -> Inferred:
        return {}, [bottoms[0]]

    def allocate(self, params: Mapping[str, Shape]) -> None:
        for kind, shape in params.items():
            setattr(self, kind, nn.Parameter(torch.zeros(shape)))


class _Weighted(_Layer):
    """A layer with a weight and an optional bias (Convolution, InnerProduct)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, num_output: int, bias_term: bool) -> None:
        super().__init__()
        self.num_output, self.bias_term = num_output, bias_term
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def _params(self, weight: Shape) -> dict[str, Shape]:
        return {"weight": weight, **({"bias": (self.num_output,)} if self.bias_term else {})}


class Convolution(_Weighted):
    def __init__(self, layer: pb.LayerParameter) -> None:
        p = layer.convolution_param
        super().__init__(p.num_output, p.bias_term)
        g = conv_geometry(p)
        self.kernel, self.stride, self.pad, self.dilation = g["kernel"], g["stride"], g["pad"], g["dilation"]
        self.groups = p.group

    def infer(self, bottoms: list[Shape]) -> Inferred:
        n, channels, h, w = _four_d(bottoms[0])
        if channels % self.groups:
            raise ValueError(f"group {self.groups} does not divide the {channels} input channels")
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel, self.stride, self.pad, self.dilation):
            extent = d * (k - 1) + 1
            if extent > size + 2 * p:
                raise ValueError(
                    f"kernel {format_shape(self.kernel)} (dilation {format_shape(self.dilation)}) is larger than the "
                    f"{h}x{w} input padded by {format_shape(self.pad)}"
                )
            out.append((size + 2 * p - extent) // s + 1)
        weight = (self.num_output, channels // self.groups, *self.kernel)
        return self._params(weight), [(n, self.num_output, *out)]

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.groups),)


class InnerProduct(_Weighted):
    """Flattens from ``axis`` (C,H,W row-major for axis 1); weights (out, in), or (in, out) if transposed."""

    def __init__(self, layer: pb.LayerParameter) -> None:
        p = layer.inner_product_param
        super().__init__(p.num_output, p.bias_term)
        self.axis, self.transpose = p.axis, p.transpose

    def infer(self, bottoms: list[Shape]) -> Inferred:
        shape = bottoms[0]
        self.axis = _canonical_axis("axis", self.axis, shape)
        inputs = math.prod(shape[self.axis :])
        weight = (inputs, self.num_output) if self.transpose else (self.num_output, inputs)
        return self._params(weight), [(*shape[: self.axis], self.num_output)]

    def forward(self, x: Tensor) -> tuple[Tensor]:
        weight = self.weight.t() if self.transpose else self.weight
        return (F.linear(x.flatten(self.axis), weight, self.bias),)


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

    def infer(self, bottoms: list[Shape]) -> Inferred:
        n, c, h, w = _four_d(bottoms[0])
        (kh, kw), (sh, sw), (ph, pw) = self._geometry(h, w)
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ValueError(f"kernel {kh}x{kw} is larger than the {h}x{w} input padded by {ph}x{pw}")
        oh, ow = self._size(h, kh, sh, ph), self._size(w, kw, sw, pw)
        # forward pads the input to hold every window: that padded blob must fit like any other
        padded = (n, c, max(h + 2 * ph, (oh - 1) * sh + kh), max(w + 2 * pw, (ow - 1) * sw + kw))
        problem = shape_problem(padded)
        if problem:
            raise ValueError(f"the padded input {format_shape(padded)} the windows need {problem}")
        return {}, [(n, c, oh, ow)]

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
        counts = []  # window extent within [-pad, size + pad), per output row / column
        for n, size, k, s, p in ((oh, h, kh, sh, ph), (ow, w, kw, sw, pw)):
            start = torch.arange(n, device=sums.device) * s - p
            counts.append((torch.clamp(start + k, max=size + p) - start).to(sums.dtype))
        return (sums / torch.outer(*counts),)


class LRN(_Layer):
    """ACROSS_CHANNELS: x / (k + alpha/size * sum of x^2 over ``size`` channels)^beta (Caffe divides
    alpha by the window size, as does torch); WITHIN_CHANNEL: over a size x size window, k = 1."""

    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        p = layer.lrn_param
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.across = p.norm_region == pb.LRNParameter.ACROSS_CHANNELS

    def infer(self, bottoms: list[Shape]) -> Inferred:
        n, c, h, w = _four_d(bottoms[0])
        # A window wider than this reaches past every channel (row) from every position: it adds
        # only zeros, and forward would pad the input by its width.
        extent, what = (c, "channels") if self.across else (max(h, w), "rows and columns")
        if self.size > 2 * extent - 1:
            raise ValueError(
                f"local_size {self.size} is wider than {2 * extent - 1}, a window that already reaches all "
                f"{extent} {what} from each one"
            )
        return {}, [bottoms[0]]

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

    def infer(self, bottoms: list[Shape]) -> Inferred:
        self.axis = _canonical_axis("axis", self.axis, bottoms[0])
        return {}, [bottoms[0]]

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (F.softmax(x, self.axis),)


class Concat(_Layer):
    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        self.axis = concat_axis(layer.concat_param)

    def infer(self, bottoms: list[Shape]) -> Inferred:
        first = bottoms[0]
        self.axis = _canonical_axis("axis", self.axis, first)
        for shape in bottoms[1:]:
            if len(shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(shape, first)) if i != self.axis):
                raise ValueError(f"inputs must agree on every axis but {self.axis}")
        out = list(first)
        out[self.axis] = sum(s[self.axis] for s in bottoms)
        return {}, [tuple(out)]

    def forward(self, *xs: Tensor) -> tuple[Tensor]:
        return (torch.cat(xs, self.axis),)


class Eltwise(_Layer):
    def __init__(self, layer: pb.LayerParameter) -> None:
        super().__init__()
        p = layer.eltwise_param
        self.op, self.coeff = p.operation, list(p.coeff)

    def infer(self, bottoms: list[Shape]) -> Inferred:
        if any(shape != bottoms[0] for shape in bottoms):
            raise ValueError("inputs must have one shape")
        return {}, [bottoms[0]]

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

    def infer(self, bottoms: list[Shape]) -> Inferred:
        shape = bottoms[0]
        self.axis = _canonical_axis("axis", self.axis, shape)
        self.end_axis = _canonical_axis("end_axis", self.end_axis, shape)
        if self.axis > self.end_axis:
            raise ValueError(f"axis {self.axis} comes after end_axis {self.end_axis}")
        a, e = self.axis, self.end_axis
        return {}, [(*shape[:a], math.prod(shape[a : e + 1]), *shape[e + 1 :])]

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (x.flatten(self.axis, self.end_axis),)


#: The module of each compute type (validate() admits no other).
LAYERS: dict[str, type[_Layer]] = {
    "Convolution": Convolution,
    "InnerProduct": InnerProduct,
    "Pooling": Pooling,
    "LRN": LRN,
    "ReLU": ReLU,
    "Dropout": Dropout,
    "Softmax": Softmax,
    "Concat": Concat,
    "Eltwise": Eltwise,
    "Flatten": Flatten,
}


# ----------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class _Step:
    name: str  # Caffe layer name
    attr: str  # attribute of the module holding it
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    type: str  # Caffe layer type
    shapes: tuple[Shape, ...]  # of the tops, right after this layer


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
        for name, shape in shapes.items():
            problem = shape_problem(shape)
            if problem:
                raise CaffeFormatError(f"{source}: input {name!r}: shape {format_shape(shape)} {problem}")
        self.inputs: list[str] = list(shapes)
        self.blob_shapes: dict[str, Shape] = dict(shapes)
        self.steps: list[_Step] = []
        self.param_layers: dict[str, str] = {}  # Caffe layer name -> attribute (names with '/' or '.')
        self._suffixes: dict[str, int] = {}
        params = 0
        for layer in active_layers(net):
            if layer.type in INPUT_TYPES:
                continue
            where = f"{source}: layer {layer.name!r} ({layer.type})"
            bottoms = [self.blob_shapes[b] for b in layer.bottom]
            module = LAYERS[layer.type](layer)
            try:
                param_shapes, tops = module.infer(bottoms)
            except ValueError as e:
                raise CaffeFormatError(f"{where}: {e} (inputs {', '.join(map(format_shape, bottoms))})") from None
            for top in tops:
                problem = shape_problem(top)
                if problem:
                    raise CaffeFormatError(f"{where}: its output {format_shape(top)} {problem}")
            params += sum(math.prod(shape) for shape in param_shapes.values())
            if params > MAX_PARAMS:  # checked before anything is allocated
                raise CaffeFormatError(
                    f"{where}: the net declares {params:,} parameters up to here, more than the "
                    f"{MAX_PARAMS:,} verydeep builds (VGG-19 has 143,667,240)"
                )
            module.allocate(param_shapes)
            attr = self._attribute(layer.name)
            self.add_module(attr, module)
            if param_shapes:
                self.param_layers[layer.name] = attr
            self.steps.append(_Step(layer.name, attr, tuple(layer.bottom), tuple(layer.top), layer.type, tuple(tops)))
            self.blob_shapes.update(zip(layer.top, tops))
        if not self.steps:
            raise CaffeFormatError(f"{source}: the net has no layers to run")
        self.eval()  # a deploy net runs in Caffe's TEST phase: dropout off until .train()

    def _attribute(self, name: str) -> str:
        """A free attribute name for layer ``name`` (``/`` and ``.`` are not allowed in one)."""
        base = name.replace("/", "_").replace(".", "_") or "layer"
        i = self._suffixes.get(base, 0)  # the next suffix to try: n duplicate names cost O(n), not O(n^2)
        attr = base if i == 0 else f"{base}_{i}"
        while hasattr(self, attr):
            i += 1
            attr = f"{base}_{i}"
        self._suffixes[base] = i + 1
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

        net, source = read_prototxt(prototxt), os.fspath(prototxt)
        if caffemodel is None:
            return cls(net, input_shape, source=source)
        return cls.with_blobs(net, read_caffemodel(caffemodel).blobs, os.fspath(caffemodel), input_shape, source)

    @classmethod
    def with_blobs(
        cls,
        net: NetParameter,
        blobs: Mapping[str, Sequence[np.ndarray]],
        origin: str,
        input_shape: Sequence[int] | None = None,
        source: str = "<net>",
    ) -> CaffeGraph:
        """A graph for ``net`` holding ``blobs`` (:meth:`load_blobs`; errors name ``origin``), built
        on the meta device: the parameters become the blobs' arrays, nothing more is allocated."""
        with torch.device("meta"):
            graph = cls(net, input_shape, source=source)
        graph.load_blobs(blobs, origin=origin)
        return graph

    # ---- weights

    def load_blobs(self, blobs: Mapping[str, Sequence[np.ndarray]], origin: str = "<blobs>") -> None:
        """Fill parameters from Caffe blobs (layer name -> [weight, bias]), checking each shape and
        that every value is a finite number (:func:`~verydeep.models.build.checked_tensor`).

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
                if not shape_fits(tuple(array.shape), tuple(param.shape)):
                    raise CaffeFormatError(
                        f"{origin}: layer {name!r}: {kind}: expected shape {format_shape(param.shape)}, "
                        f"found {format_shape(array.shape)}"
                    )
                value = checked_tensor(origin, f"layer {name!r}: {kind}", array).reshape(param.shape)
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
        """Rebuild a graph saved as :meth:`meta` + ``state_dict()``, each value checked as
        :meth:`load_blobs` checks a blob (:func:`~verydeep.models.build.checked_tensor`)."""
        text, shapes = meta.get("prototxt"), meta.get("input_shapes", {})
        if not (
            isinstance(text, str) and isinstance(shapes, Mapping) and all(isinstance(s, list) for s in shapes.values())
        ):
            raise CaffeFormatError(f"{source}: the saved net's metadata is not a prototxt text with input shapes")
        net = parse_prototxt(text, source)  # text only: metadata never names a file to read
        first = next(iter(shapes.values()), None)
        with torch.device("meta"):
            graph = cls(net, first, source=source)
        checked = {k: checked_tensor(source, k, v) for k, v in state.items()}
        try:
            graph.load_state_dict(checked, strict=True, assign=True)
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
    crop = layer.transform_param.crop_size  # data layers: the images (cropped, or assumed), a label each
    return [(1, 3, crop, crop) if crop else DEFAULT_INPUT, (1,)]
