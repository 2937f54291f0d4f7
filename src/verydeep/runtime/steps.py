"""A VGG's layers as the plan's steps, with their weights prepared once, and how each step runs.

:func:`build_steps` walks the model's Caffe layers once: a convolution and the ReLU after it
become one step (the ReLU fused into the kernel call), dropout disappears (the identity at test
time) and weights are converted to the compute dtype and packed for the plan's kernels.
:class:`Kernels` then runs a step the way the plan says: oneDNN (:mod:`.cpu`), cuDNN or Triton
(:mod:`.cuda`), or ATen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from verydeep import configs
from verydeep.configs import LayerSpec
from verydeep.core.defaults import dtype_of
from verydeep.runtime.compiled import compiled_max_pool
from verydeep.runtime.cpu import max_pool_nhwc, onednn_conv, onednn_linear, pack_conv_weight, pack_linear_weight
from verydeep.runtime.cuda import cudnn_conv_relu, triton_max_pool
from verydeep.runtime.plan import Plan
from verydeep.runtime.source import as_source, bias_of, child, conv_padding


# -- the steps -------------------------------------------------------------------------------------
@dataclass(eq=False)
class Step:
    """One stage of the fast forward. ``name`` is the layer whose output the step computes before
    any fused ReLU; ``after`` the names (ReLU, dropout) whose output equals the step's output.
    Steps compare by identity (``eq=False``): their fields hold tensors."""

    name: str
    relu: bool = field(default=False, kw_only=True)  # a ReLU fused into this step
    after: list[str] = field(default_factory=list, kw_only=True)


@dataclass(eq=False)
class ConvStep(Step):
    weight: torch.Tensor  # as the plan's conv kernel takes it (oneDNN-packed or channels-last)
    bias: torch.Tensor | None
    padding: int
    pool_next: bool = False  # the fused ReLU is followed by a pool


@dataclass(eq=False)
class FcStep(Step):
    weight: torch.Tensor  # as the plan's linear kernel takes it (packed, it serves unfused calls too)
    bias: torch.Tensor


@dataclass(eq=False)
class PoolStep(Step):
    pass


@dataclass(eq=False)
class ReluStep(Step):
    pass


@dataclass(eq=False)
class LrnStep(Step):
    module: nn.Module


def pooled(kind: str, size: int) -> int:
    """A spatial size after a layer of ``kind``: Caffe's 2x2/2 pooling rounds up."""
    return -(-(size - 2) // 2) + 1 if kind == "pool" else size


def build_steps(model: nn.Module, plan: Plan) -> list[Step]:
    """``model``'s layers as steps for ``plan``, the weights converted (and packed) once."""
    specs = as_source(model).specs
    steps: list[Step] = []
    hw = configs.CROP
    with torch.no_grad():
        for i, spec in enumerate(specs):
            relu_next = i + 1 < len(specs) and specs[i + 1].kind == "relu"
            if spec.kind == "conv":
                conv = child(model, spec.name, nn.Conv2d)
                pool_next = relu_next and i + 2 < len(specs) and specs[i + 2].kind == "pool"
                steps.append(_conv_step(conv, spec, plan, hw, first=not steps, relu=relu_next, pool_next=pool_next))
            elif spec.kind == "relu":
                if steps and steps[-1].relu and not steps[-1].after:
                    steps[-1].after.append(spec.name)
                else:
                    steps.append(ReluStep(spec.name))
            elif spec.kind == "dropout":  # identity at test time: same output as the step before
                if steps:
                    steps[-1].after.append(spec.name)
            elif spec.kind == "pool":
                steps.append(PoolStep(spec.name))
            elif spec.kind == "lrn":
                steps.append(LrnStep(spec.name, module=child(model, spec.name, nn.Module)))
            elif spec.kind == "fc":
                steps.append(_fc_step(child(model, spec.name, nn.Linear), spec, plan, relu=relu_next))
            hw = pooled(spec.kind, hw)
    return steps


def _conv_step(
    conv: nn.Conv2d, spec: LayerSpec, plan: Plan, hw: int, *, first: bool, relu: bool, pool_next: bool
) -> ConvStep:
    w = conv.weight.detach().to(plan.device, dtype_of(plan.dtype))
    b = conv.bias.detach().to(plan.device, dtype_of(plan.dtype)) if conv.bias is not None else None
    pad = conv_padding(conv)
    if first and plan.pad_channels > w.shape[1]:  # zero input channels: exact
        w = F.pad(w, (0, 0, 0, 0, 0, plan.pad_channels - w.shape[1]))
    if plan.conv == "onednn-prepacked":
        w = pack_conv_weight(w, pad, spec.in_channels, hw)
    elif plan.channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    return ConvStep(spec.name, relu=relu, weight=w, bias=b, padding=pad, pool_next=pool_next)


def _fc_step(fc: nn.Linear, spec: LayerSpec, plan: Plan, *, relu: bool) -> FcStep:
    # In fp32 on the model's device these are the model's own tensors: no copy.
    w = fc.weight.detach().to(plan.device, dtype_of(plan.dtype))
    b = bias_of(fc).to(plan.device, dtype_of(plan.dtype))
    if plan.linear == "onednn-prepacked":
        w = pack_linear_weight(w)
    return FcStep(spec.name, relu=relu, weight=w, bias=b)


# -- running a step --------------------------------------------------------------------------------
class Kernels:
    """Runs steps with the kernels ``plan`` chose."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format

    def conv(self, s: ConvStep, x: torch.Tensor, relu: bool | None = None) -> torch.Tensor:
        """The convolution, with its fused ReLU unless ``relu=False``."""
        relu = s.relu if relu is None else relu
        if self.plan.conv == "onednn-prepacked":
            return onednn_conv(x, s.weight, s.bias, s.padding, relu=relu)
        if relu and self.plan.conv == "cudnn-relu":
            return cudnn_conv_relu(x, s.weight, s.bias, s.padding)
        x = F.conv2d(x, s.weight, s.bias, padding=s.padding)
        return F.relu_(x) if relu else x

    def linear(self, s: FcStep, x: torch.Tensor, relu: bool | None = None) -> torch.Tensor:
        """The fc layer, with its fused ReLU unless ``relu=False``."""
        relu = s.relu if relu is None else relu
        if self.plan.linear == "onednn-prepacked":
            return onednn_linear(x, s.weight, s.bias, relu=relu)
        x = F.linear(x, s.weight, s.bias)
        return F.relu_(x) if relu else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Caffe's 2x2/2 round-up max pool, by the plan's kernel where it applies, else ATen's."""
        h, w = x.shape[-2:]
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if self.plan.pool == "triton" and x.is_cuda and channels_last:
            return triton_max_pool(x)
        if self.plan.pool == "compiled":
            return compiled_max_pool(x)
        if self.plan.pool == "nhwc-maximum" and h % 2 == 0 and w % 2 == 0 and channels_last:
            return max_pool_nhwc(x)
        return F.max_pool2d(x, 2, 2, ceil_mode=True)

    def lrn(self, s: LrnStep, x: torch.Tensor) -> torch.Tensor:
        """LRN in fp32 (no reduced-precision kernel, and its power law is precision-sensitive)."""
        y = s.module(x.float())
        return y.to(x.dtype).contiguous(memory_format=self.memory_format)

    def step(self, s: Step) -> Callable[[torch.Tensor], torch.Tensor]:
        """``s`` as a function of the previous step's output (conv and fc with their fused ReLU)."""
        if isinstance(s, ConvStep):
            return lambda x: self.conv(s, x)
        if isinstance(s, FcStep):
            return lambda x: self.linear(s, x)
        if isinstance(s, LrnStep):
            return lambda x: self.lrn(s, x)
        if isinstance(s, PoolStep):
            return self.pool
        return F.relu
