"""The CPU plan's pieces: oneDNN convolutions and fc layers on pre-packed weights, and NHWC pooling.

Each convolution is one oneDNN call whose weights were re-laid out once into oneDNN's blocked
layout, with the ReLU fused as a post-op: what ``torch.compile`` with freezing emits, without
its compile time or cache. 2x2 max pooling of even sizes is two ``maximum`` passes over the
NHWC view, about twice ATen's channels-last kernel in bf16.
"""

from __future__ import annotations

import torch


def max_pool_nhwc(x: torch.Tensor) -> torch.Tensor:
    """Caffe's 2x2/2 max pooling of a channels-last ``x`` with even height and width, as two
    elementwise ``maximum`` passes over its NHWC view (rows, then columns); channels-last out."""
    n, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1).view(n, h // 2, 2, w // 2, 2, c)
    rows = torch.maximum(y[:, :, 0], y[:, :, 1])
    return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


def pack_conv_weight(weight: torch.Tensor, padding: int, in_channels: int, size: int) -> torch.Tensor:
    """A stride-1 conv weight in oneDNN's blocked layout, chosen for a ``size`` x ``size`` input
    with ``in_channels`` channels (the packed weight is valid for any input shape)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight.contiguous(), [padding, padding], [1, 1], [1, 1], 1, [1, in_channels, size, size]
    )


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """An fc weight in oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def onednn_conv(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, padding: int, *, relu: bool
) -> torch.Tensor:
    """A stride-1 convolution on a :func:`pack_conv_weight` weight, the ReLU fused when asked."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, [padding, padding], [1, 1], [1, 1], 1, "relu" if relu else "none", [None], ""
    )


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, *, relu: bool) -> torch.Tensor:
    """An fc layer on a :func:`pack_linear_weight` weight, the ReLU fused when asked."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "relu" if relu else "none", [], "")


# -- int8: oneDNN's quantized conv and fc on uint8 activations and per-channel int8 weights --------
def quantize_weight(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale per channel).

    Per channel because VGG's filters differ in magnitude by 10-100x within a layer; one scale
    for all would leave the small ones a few levels."""
    w = weight.detach().float()
    scale = w.abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / levels
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.clamp(torch.round(w / scale.view(shape)), -levels, levels).to(torch.int8)
    return q, scale


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int, levels: int) -> torch.Tensor:
    """``x`` as uint8 codes ``round(x / scale) + zero_point`` clamped to ``[0, levels]``, layout kept."""
    q = torch.round(x.float() / scale).add_(zero_point).clamp_(0, levels)
    return q.to(torch.uint8)


def pack_qconv_weight(
    qweight: torch.Tensor, scale: torch.Tensor, x_scale: float, x_zero_point: int, padding: int, shape: list[int]
) -> torch.Tensor:
    """An int8 stride-1 conv weight in oneDNN's blocked layout for inputs like ``shape`` (NCHW)."""
    return torch.ops.onednn.qconv_prepack(
        qweight, scale, x_scale, x_zero_point, [1, 1], [padding, padding], [1, 1], 1, shape
    )


def pack_qlinear_weight(qweight: torch.Tensor) -> torch.Tensor:
    """An int8 fc weight in oneDNN's blocked layout."""
    return torch.ops.onednn.qlinear_prepack(qweight, None)


def onednn_qconv(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    out_scale: float,
    *,
    relu: bool,
    out_float: bool = False,
) -> torch.Tensor:
    """uint8 channels-last in; uint8 codes of scale ``out_scale`` (zero point 0: the ReLU'd output
    is non-negative) out, or float32 with ``out_float``. Bias, ReLU and requantization are fused;
    ``w_zero_point`` is all zeros (symmetric weights), kept as the op takes it."""
    return torch.ops.onednn.qconv2d_pointwise(
        x, x_scale, x_zero_point, packed, w_scale, w_zero_point, bias, [1, 1], [padding, padding], [1, 1], 1,
        1.0 if out_float else out_scale, 0, torch.float32 if out_float else None,
        "relu" if relu else "none", [], "",
    )  # fmt: skip


def onednn_qlinear(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor,
    out_scale: float,
    *,
    relu: bool,
    out_float: bool = False,
) -> torch.Tensor:
    """The fc counterpart of :func:`onednn_qconv` (2-D uint8 input)."""
    return torch.ops.onednn.qlinear_pointwise(
        x, x_scale, x_zero_point, packed, w_scale, w_zero_point, bias,
        1.0 if out_float else out_scale, 0, torch.float32 if out_float else None,
        "relu" if relu else "none", [], "",
    )  # fmt: skip
