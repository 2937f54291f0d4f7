"""The nets as the explanation methods run them: layer by layer, every ReLU out of place.

Gradient methods need two things the modules' own forward passes do not give: the output of a
named layer kept intact while later layers run (a VGG's in-place ReLUs overwrite conv outputs,
and they break the module backward hooks other libraries use), and ReLUs whose backward pass
can be swapped (guided backpropagation). So the layers are run here, in order, from the model's
layer specs (a :class:`~verydeep.models.vgg.VGG`) or steps (a
:class:`~verydeep.formats.caffe.graph.CaffeGraph`), with the ReLUs as functions. Dropout is the
identity: an explanation is of the deterministic (test-phase) net.

The fully connected layers run as in the classic net when pool5 has the size fc6 was trained
on, and as convolutions (the dense view) otherwise; the class scores of a larger image are then
the spatial average of its score map, the paper's dense evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verydeep import configs
from verydeep.errors import VerydeepError
from verydeep.formats.caffe import graph as caffe_graph
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.models.vgg import VGG
from verydeep.runtime.executor import optimize

#: Layer kinds of a VGG whose output is a map Grad-CAM can weight.
SPATIAL_KINDS = ("conv", "relu", "lrn", "pool")


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward pass lets through only positive gradients at positive inputs
    (Springenberg et al., arXiv:1412.6806): ``grad_in = grad_out * (x > 0) * (grad_out > 0)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad.clamp_min(0) * (x > 0).to(grad.dtype)


def _guided_relu(x: Tensor) -> Tensor:
    out: Tensor = GuidedReLU.apply(x)
    return out


#: ReLU as each pass runs it: out of place, with the plain or the guided backward pass.
RELUS: dict[bool, Callable[[Tensor], Tensor]] = {False: F.relu, True: _guided_relu}


@dataclass(frozen=True)
class Pass:
    """One forward pass: class scores (N x classes; a score map's spatial average), the score map
    itself when the net ran densely (N x classes x h x w, else None) and the tapped layer's output."""

    scores: Tensor
    score_map: Tensor | None
    tapped: Tensor | None


class Net:
    """What the methods need of a model; :func:`as_net` picks the implementation."""

    module: nn.Module
    #: Layer names Grad-CAM accepts, in forward order, and its default (the last conv stage's ReLU).
    spatial_layers: list[str]
    default_layer: str
    #: Geometry of the dense view (input pixels per score-map position, window size), if known.
    dense_geometry: tuple[int, int] | None = None

    @property
    def class_names(self) -> list[str] | None:
        names = getattr(self.module, "class_names", None)
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def run(self, x: Tensor, *, guided: bool = False, tap: str | None = None) -> Pass:
        """Scores of Caffe-space ``x``; ReLUs guided or plain; ``tap`` a layer to keep."""
        raise NotImplementedError

    def dense_scores(self, x: Tensor, *, precision: str = "fp32", fast: nn.Module | None = None) -> Tensor:
        """N x classes x h x w score map without gradients, by the fastest path available
        (``fast``: that path built once by the caller, for many batches)."""
        raise NotImplementedError

    def check_layer(self, layer: str) -> str:
        if layer not in self.spatial_layers:
            raise VerydeepError(
                f"layer {layer!r}: Grad-CAM needs a convolution, ReLU, LRN or pooling layer of the net; "
                f"expected one of {', '.join(self.spatial_layers)}"
            )
        return layer

    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")


class VGGNet(Net):
    """A Table 1 VGG run from its layer specs."""

    def __init__(self, model: VGG) -> None:
        self.module = self.model = model
        self.spatial_layers = [s.name for s in model.specs if s.kind in SPATIAL_KINDS]
        stage5 = [s.name for s in model.specs if s.kind == "relu" and s.name.startswith("relu5_")]
        self.default_layer = stage5[-1]
        stride = 2 ** sum(s.kind == "pool" for s in model.specs)
        self.dense_geometry = (stride, stride * configs.POOL5_SIZE)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def run(self, x: Tensor, *, guided: bool = False, tap: str | None = None) -> Pass:
        m, relu = self.model, RELUS[guided]
        tapped: Tensor | None = None
        dense = False
        for spec in m.specs:
            if spec.kind == "dropout":
                continue
            if spec.kind == "relu":
                x = relu(x)
            elif spec.kind == "fc":
                x, dense = self._fc(spec.name, x, dense)
            else:
                x = m.layer(spec.name)(x)
            if spec.name == tap:
                tapped = x
        if dense:
            return Pass(x.mean(dim=(2, 3)), x, tapped)
        return Pass(x, None, tapped)

    def _fc(self, name: str, x: Tensor, dense: bool) -> tuple[Tensor, bool]:
        """fc6..fc8 on the classic net's flattened pool5, or as convolutions on a larger one."""
        fc = self.model.linear(name)
        if name == "fc6":
            c, kh, kw = self.model.fc6_input
            if x.shape[1:] == (c, kh, kw):
                return fc(torch.flatten(x, 1)), False  # row-major C,H,W like Caffe's InnerProduct
            if x.shape[1] != c or x.shape[2] < kh or x.shape[3] < kw:
                size = "x".join(map(str, x.shape[1:]))
                raise VerydeepError(
                    f"fc6 expects pool5 of at least {c}x{kh}x{kw} (an input of at least "
                    f"{configs.CROP}x{configs.CROP} pixels, or 193 with Caffe's rounding), found {size}"
                )
            return F.conv2d(x, fc.weight.view(fc.out_features, c, kh, kw), fc.bias), True
        if dense:
            return F.conv2d(x, fc.weight.view(fc.out_features, fc.in_features, 1, 1), fc.bias), True
        return fc(x), False

    def dense_scores(self, x: Tensor, *, precision: str = "fp32", fast: nn.Module | None = None) -> Tensor:
        """The fast path's dense view (float32 output)."""
        if fast is None:
            fast = optimize(self.model, precision, device=x.device).dense()
        with torch.inference_mode():
            out: Tensor = fast(x)
        return out


class GraphNet(Net):
    """A Caffe deploy net (:class:`CaffeGraph`) run from its steps; a final Softmax is left out,
    since the class scores are its input."""

    def __init__(self, graph: CaffeGraph) -> None:
        self.module = self.graph = graph
        steps = list(graph.steps)
        while steps and isinstance(getattr(graph, steps[-1].attr), caffe_graph.Softmax):
            steps.pop()
        if not steps:
            raise VerydeepError(f"{graph.source}: the net has no layers before its Softmax")
        self.steps = steps
        shapes = graph.blob_shapes
        first_fc = next(
            (i for i, s in enumerate(steps) if isinstance(getattr(graph, s.attr), caffe_graph.InnerProduct)),
            len(steps),
        )
        self.spatial_layers = [s.name for s in steps[:first_fc] if len(shapes.get(s.tops[0], ())) == 4]
        if not self.spatial_layers:
            raise VerydeepError(f"{graph.source}: no layer with a spatial (N x C x H x W) output")
        relus = [s.name for s in steps[:first_fc] if isinstance(getattr(graph, s.attr), caffe_graph.ReLU)]
        relus = [r for r in relus if r in self.spatial_layers]
        self.default_layer = relus[-1] if relus else self.spatial_layers[-1]
        self._outputs = shapes[steps[-1].tops[0]][1]

    @property
    def num_classes(self) -> int:
        return int(self._outputs)

    def run(self, x: Tensor, *, guided: bool = False, tap: str | None = None) -> Pass:
        g = self.graph
        blobs: dict[str, Tensor] = {g.inputs[0]: x}
        tapped: Tensor | None = None
        for step in self.steps:
            layer = getattr(g, step.attr)
            bottoms = [blobs[b] for b in step.bottoms]
            if isinstance(layer, caffe_graph.ReLU):
                tops: tuple[Tensor, ...] = (self._relu(layer, step.name, bottoms[0], guided),)
            else:
                tops = layer(*bottoms)
            blobs.update(zip(step.tops, tops))
            if step.name == tap:
                tapped = tops[0]
        out = blobs[self.steps[-1].tops[0]]
        if out.dim() == 4:
            return Pass(out.mean(dim=(2, 3)), out, tapped)
        return Pass(out.flatten(1), None, tapped)

    def _relu(self, layer: caffe_graph.ReLU, name: str, x: Tensor, guided: bool) -> Tensor:
        if not layer.slope:
            return RELUS[guided](x)
        if guided:
            raise VerydeepError(
                f"{self.graph.source}: layer {name!r}: guided backpropagation needs plain ReLUs, "
                f"found negative_slope {layer.slope}"
            )
        return F.leaky_relu(x, layer.slope)

    def dense_scores(self, x: Tensor, *, precision: str = "fp32", fast: nn.Module | None = None) -> Tensor:
        if precision != "fp32":
            raise VerydeepError(f"precision {precision}: a Caffe graph has no fast path; use fp32")
        with torch.inference_mode():
            out = self.run(x).score_map
        if out is None:
            raise VerydeepError(
                f"{self.graph.source}: a score map needs a fully convolutional net (its last layer gives "
                "N x classes x h x w); this one ends in a fully connected layer"
            )
        return out


def fast_dense(model: nn.Module, precision: str, device: torch.device | str) -> nn.Module | None:
    """The fast path's dense view of a VGG (None for other nets, which have none): build it once
    and pass it to :func:`~verydeep.explain.methods.score_map` as ``fast`` for many batches."""
    if not isinstance(model, VGG):
        return None
    return optimize(model, precision, device=device).dense()


def as_net(model: nn.Module) -> Net:
    """``model`` (a VGG or a CaffeGraph) as the methods run it."""
    if isinstance(model, VGG):
        return VGGNet(model)
    if isinstance(model, CaffeGraph):
        return GraphNet(model)
    raise VerydeepError(f"explain needs a verydeep VGG or CaffeGraph, found {type(model).__name__}")
