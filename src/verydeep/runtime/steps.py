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
from verydeep.errors import VerydeepError
from verydeep.runtime.compiled import compiled_max_pool
from verydeep.runtime.cpu import (
    max_pool_nhwc,
    onednn_conv,
    onednn_linear,
    onednn_qconv,
    onednn_qlinear,
    pack_conv_weight,
    pack_linear_weight,
    pack_qconv_weight,
    pack_qlinear_weight,
    quantize_activation,
    quantize_weight,
)
from verydeep.runtime.cuda import cudnn_conv_relu, triton_max_pool
from verydeep.runtime.int8 import Calibration
from verydeep.runtime.plan import Plan
from verydeep.runtime.source import as_source, bias_of, child, conv_padding
from verydeep.runtime.winograd import Winograd, tile_size, winograd_applies


# -- the steps -------------------------------------------------------------------------------------
@dataclass(eq=False)
class Step:
    """One stage of the fast forward. ``name`` is the layer whose output the step computes before
    any fused ReLU; ``after`` the names (ReLU, dropout) whose output equals the step's output.
    Steps compare by identity (``eq=False``): their fields hold tensors."""

    name: str
    relu: bool = field(default=False, kw_only=True)  # a ReLU fused into this step
    after: list[str] = field(default_factory=list, kw_only=True)
    scale: float = field(default=0.0, kw_only=True)  # int8: the scale of the output codes (0: float output)


@dataclass(eq=False)
class Quantized:
    """int8 plan: how a conv/fc step's uint8 input codes map to values, and its weights' scales."""

    x_scale: float
    x_zero_point: int
    w_scale: torch.Tensor  # per output channel
    w_zero_point: torch.Tensor = field(init=False)  # zeros: the weights are symmetric

    def __post_init__(self) -> None:
        self.w_zero_point = torch.zeros(self.w_scale.numel(), dtype=torch.long)


@dataclass(eq=False)
class ConvStep(Step):
    weight: torch.Tensor  # as the plan's conv kernel takes it (oneDNN-packed or channels-last)
    bias: torch.Tensor | None
    padding: int
    pool_next: bool = False  # the fused ReLU is followed by a pool
    quantized: Quantized | None = None
    winograd: Winograd | None = None  # fp32 3x3 on CPU: the Winograd kernel instead of ``weight``'s


@dataclass(eq=False)
class FcStep(Step):
    weight: torch.Tensor  # as the plan's linear kernel takes it (packed, it serves unfused calls too)
    bias: torch.Tensor
    quantized: Quantized | None = None


@dataclass(eq=False)
class PoolStep(Step):
    pass


@dataclass(eq=False)
class ReluStep(Step):
    pass


@dataclass(eq=False)
class LrnStep(Step):
    module: nn.Module
    x_scale: float = 0.0  # int8: the scale of the input codes


def pooled(kind: str, size: int) -> int:
    """A spatial size after a layer of ``kind``: Caffe's 2x2/2 pooling rounds up."""
    return -(-(size - 2) // 2) + 1 if kind == "pool" else size


def quantized_outputs(specs: list[LayerSpec]) -> list[str]:
    """The layers whose ranges int8 calibration measures: the ReLU after each conv and fc but the
    last fc (whose float logits are not quantized), and each LRN."""
    names = []
    for i, spec in enumerate(specs):
        if spec.kind in ("conv", "fc") and i + 1 < len(specs) and specs[i + 1].kind == "relu":
            names.append(specs[i + 1].name)
        elif spec.kind == "lrn":
            names.append(spec.name)
    return names


def build_steps(model: nn.Module, plan: Plan, calibration: Calibration | None = None) -> list[Step]:
    """``model``'s layers as steps for ``plan``, the weights converted (and packed) once; an int8
    plan needs the ``calibration`` that fixes each layer's scales."""
    if plan.dtype == "int8":
        if calibration is None:
            raise VerydeepError("an int8 plan needs a calibration (optimized('int8', calibration=images))")
        return _quantize_steps(model, plan, calibration)
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
    if plan.winograd and winograd_applies(tuple(w.shape), conv.stride[0], pad, conv.dilation[0], conv.groups):
        wino = Winograd(w, b, plan.winograd)
        wino.weights(tile_size(hw, hw, plan.winograd))  # the classic view's transform now, not on the first call
        return ConvStep(spec.name, relu=relu, weight=w, bias=b, padding=pad, pool_next=pool_next, winograd=wino)
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


def _quantize_steps(model: nn.Module, plan: Plan, calibration: Calibration) -> list[Step]:
    """The int8 plan's steps: conv and fc weights quantized per channel and packed for oneDNN
    with the input scale each will see; the scales follow the data (a pool keeps its input's)."""
    specs = as_source(model).specs
    levels = plan.int8_levels
    x_scale, x_zero = calibration.input_quantization(levels)
    steps: list[Step] = []
    hw = configs.CROP
    with torch.no_grad():
        for i, spec in enumerate(specs):
            relu_next = i + 1 < len(specs) and specs[i + 1].kind == "relu"
            last = spec.kind == "fc" and all(s.kind not in ("conv", "fc") for s in specs[i + 1 :])
            if spec.kind in ("conv", "fc") and not relu_next and not last:
                raise VerydeepError(f"int8: layer {spec.name} has no ReLU after it; int8 covers VGG nets only")
            out_scale = (
                0.0 if last or spec.kind not in ("conv", "fc") else calibration.output_scale(specs[i + 1].name, levels)
            )
            if spec.kind == "conv":
                conv = child(model, spec.name, nn.Conv2d)
                q, w_scale = quantize_weight(conv.weight)
                pad = conv_padding(conv)
                packed = pack_qconv_weight(q, w_scale, x_scale, x_zero, pad, [1, spec.in_channels, hw, hw])
                quantized = Quantized(x_scale, x_zero, w_scale)
                b = bias_of(conv).float()
                steps.append(
                    ConvStep(spec.name, relu=True, weight=packed, bias=b, padding=pad, quantized=quantized,
                             scale=out_scale)
                )  # fmt: skip
                x_scale, x_zero = out_scale, 0
            elif spec.kind == "fc":
                fc = child(model, spec.name, nn.Linear)
                q, w_scale = quantize_weight(fc.weight)
                quantized = Quantized(x_scale, x_zero, w_scale)
                steps.append(
                    FcStep(spec.name, relu=relu_next, weight=pack_qlinear_weight(q), bias=bias_of(fc).float(),
                           quantized=quantized, scale=out_scale)
                )  # fmt: skip
                x_scale, x_zero = out_scale, 0
            elif spec.kind == "relu":
                steps[-1].after.append(spec.name)  # fused into the conv/fc before it (checked above)
            elif spec.kind == "dropout":
                if steps:
                    steps[-1].after.append(spec.name)
            elif spec.kind == "pool":
                steps.append(PoolStep(spec.name, scale=x_scale))
            elif spec.kind == "lrn":
                lrn_scale = calibration.output_scale(spec.name, levels)
                steps.append(
                    LrnStep(spec.name, module=child(model, spec.name, nn.Module), x_scale=x_scale, scale=lrn_scale)
                )
                x_scale, x_zero = lrn_scale, 0
            hw = pooled(spec.kind, hw)
    return steps


def dequantize(s: Step, x: torch.Tensor) -> torch.Tensor:
    """A step's output as float values: uint8 codes times the step's scale; float passes through."""
    return x.float().mul_(s.scale) if x.dtype == torch.uint8 else x


# -- running a step --------------------------------------------------------------------------------
class Kernels:
    """Runs steps with the kernels ``plan`` chose."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format

    def _codes(self, q: Quantized, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the uint8 codes an int8 step takes (a float tap in between is re-quantized)."""
        if x.dtype == torch.uint8:
            return x
        return quantize_activation(x, q.x_scale, q.x_zero_point, self.plan.int8_levels)

    def conv(self, s: ConvStep, x: torch.Tensor, relu: bool | None = None) -> torch.Tensor:
        """The convolution, with its fused ReLU unless ``relu=False`` (int8: then float out)."""
        relu = s.relu if relu is None else relu
        if s.quantized is not None:
            q = s.quantized
            return onednn_qconv(
                self._codes(q, x), q.x_scale, q.x_zero_point, s.weight, q.w_scale, q.w_zero_point, s.bias,
                s.padding, s.scale, relu=relu, out_float=not relu or not s.scale,
            )  # fmt: skip
        if s.winograd is not None:
            return s.winograd(x, relu=relu)
        if self.plan.conv == "onednn-prepacked":
            return onednn_conv(x, s.weight, s.bias, s.padding, relu=relu)
        if relu and self.plan.conv == "cudnn-relu":
            return cudnn_conv_relu(x, s.weight, s.bias, s.padding)
        x = F.conv2d(x, s.weight, s.bias, padding=s.padding)
        return F.relu_(x) if relu else x

    def linear(self, s: FcStep, x: torch.Tensor, relu: bool | None = None) -> torch.Tensor:
        """The fc layer, with its fused ReLU unless ``relu=False``."""
        relu = s.relu if relu is None else relu
        if s.quantized is not None:
            q = s.quantized
            return onednn_qlinear(
                self._codes(q, x), q.x_scale, q.x_zero_point, s.weight, q.w_scale, q.w_zero_point, s.bias, s.scale,
                relu=relu, out_float=not relu or not s.scale,
            )  # fmt: skip
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
        if x.dtype == torch.uint8 and (h % 2 or w % 2):
            # int8 codes after a ReLU are >= 0, so a zero row/column completes the round-up window
            # exactly (ATen's max pool has no channels-last uint8 kernel for odd sizes).
            x = F.pad(x, (0, w % 2, 0, h % 2)).contiguous(memory_format=torch.channels_last)
            h, w, channels_last = h + h % 2, w + w % 2, True
        if self.plan.pool == "nhwc-maximum" and h % 2 == 0 and w % 2 == 0 and channels_last:
            return max_pool_nhwc(x)
        return F.max_pool2d(x, 2, 2, ceil_mode=True)

    def lrn(self, s: LrnStep, x: torch.Tensor) -> torch.Tensor:
        """LRN in fp32 (no reduced-precision kernel, and its power law is precision-sensitive)."""
        if x.dtype == torch.uint8:  # int8: values in, codes of the calibrated output range out
            y = s.module(x.float().mul_(s.x_scale))
            y = quantize_activation(y, s.scale, 0, self.plan.int8_levels)
            return y.contiguous(memory_format=self.memory_format)
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
