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
