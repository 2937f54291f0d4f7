"""Input spaces: how a model's input channels relate to pixels, and moving that into conv1_1.

verydeep's model takes Caffe input (BGR, 0..255, mean pixel subtracted). torchvision's VGGs take
RGB in [0, 1] normalised by ImageNet mean/std (its ImageNet weights were *trained* in that
space); other runtimes take RGB 0..255 or 0..1. The spaces differ by a per-channel affine map
(channel swap, scale, offset), which :func:`fold_input` moves into conv1_1 and
:func:`unfold_input` takes out again (its exact inverse).

Zero padding: conv1_1 pads with zeros *in its input space*. A folded offset is exact in the
interior of the image but not in conv1_1's one-pixel border, where the padded value stands for
a different pixel. For torchvision's space the offset is the difference between ImageNet's
mean (x255) and Caffe's mean pixel, at most 0.5 grey levels; the exports keep the offset as a
separate op wherever the target format allows (:mod:`verydeep.formats.onnx`,
:mod:`verydeep.formats.caffe.export`), so those are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verydeep.configs import MEAN_BGR
from verydeep.errors import WeightsError

#: torchvision's ImageNet normalisation (RGB order).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpace:
    """How a model input channel relates to pixels: ``pixel (0..255) = value * gain + bias``,
    channel ``j`` of the input carrying colour ``order[j]``."""

    name: str
    order: str  # "BGR" or "RGB"
    gain: tuple[float, float, float]
    bias: tuple[float, float, float]
    description: str

    def caffe_channel(self, j: int) -> int:
        """The Caffe (BGR) channel that input channel ``j`` feeds."""
        return "BGR".index(self.order[j])

    def offsets(self) -> np.ndarray:
        """Per input channel, Caffe's value where this space's value is 0: ``bias - mean``."""
        return np.array([self.bias[j] - MEAN_BGR[self.caffe_channel(j)] for j in range(3)], dtype=np.float64)


def _times_255(values: tuple[float, float, float]) -> tuple[float, float, float]:
    return (255.0 * values[0], 255.0 * values[1], 255.0 * values[2])


INPUT_SPACES: dict[str, InputSpace] = {
    s.name: s
    for s in (
        InputSpace(
            "caffe", "BGR", (1.0, 1.0, 1.0), MEAN_BGR, "BGR, 0..255, Caffe mean pixel subtracted (verydeep's own)"
        ),
        InputSpace("rgb255", "RGB", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), "RGB, 0..255, nothing subtracted"),
        InputSpace("rgb01", "RGB", (255.0, 255.0, 255.0), (0.0, 0.0, 0.0), "RGB, 0..1, nothing subtracted"),
        InputSpace(
            "torchvision",
            "RGB",
            _times_255(TORCHVISION_STD),
            _times_255(TORCHVISION_MEAN),
            "RGB, 0..1, then (x - ImageNet mean) / std (torchvision's usual input)",
        ),
    )
}


def input_space(name: str) -> InputSpace:
    if name not in INPUT_SPACES:
        raise WeightsError(f"unknown input space {name!r}; known: {', '.join(INPUT_SPACES)}")
    return INPUT_SPACES[name]


def to_space(x_caffe: torch.Tensor, space: str) -> torch.Tensor:
    """Caffe-space input -> the same images in ``space`` (N x 3 x H x W); for checks and tests."""
    s = input_space(space)
    mean = torch.tensor(MEAN_BGR, dtype=x_caffe.dtype, device=x_caffe.device).view(1, 3, 1, 1)
    pixels = x_caffe + mean  # BGR 0..255
    chans = [(pixels[:, s.caffe_channel(j)] - s.bias[j]) / s.gain[j] for j in range(3)]
    return torch.stack(chans, dim=1)


def fold_input(
    weight: torch.Tensor, bias: torch.Tensor, space: str, *, fold_offset: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv1_1 (weight, bias) for Caffe input -> (weight', bias', offset) for ``space`` input.

    ``conv(x_space + offset, weight') == conv(x_caffe, weight)`` exactly, zero padding included.
    With ``fold_offset`` the offset is also folded into ``bias'`` (for formats that can hold
    nothing but conv weights): exact except in conv1_1's one-pixel border; the returned offset is
    then what the border misses. Computed in float64.
    """
    s = input_space(space)
    w = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64)
    gain = torch.tensor(s.gain, dtype=torch.float64)
    cols = [w[:, s.caffe_channel(j)] * gain[j] for j in range(3)]
    w_new = torch.stack(cols, dim=1)
    offset = torch.tensor(s.offsets(), dtype=torch.float64) / gain  # in the space's own units
    if fold_offset:
        b = b + (w_new * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return w_new.to(weight.dtype), b.to(bias.dtype), offset.to(weight.dtype)


def unfold_input(weight: torch.Tensor, bias: torch.Tensor, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact inverse of ``fold_input(..., fold_offset=True)``: conv1_1 for ``space`` input
    -> conv1_1 for Caffe input."""
    s = input_space(space)
    w = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64)
    gain = torch.tensor(s.gain, dtype=torch.float64)
    offset = torch.tensor(s.offsets(), dtype=torch.float64) / gain
    b = b - (w * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    by_caffe_channel = {s.caffe_channel(j): w[:, j] / gain[j] for j in range(3)}
    return torch.stack([by_caffe_channel[c] for c in range(3)], dim=1).to(weight.dtype), b.to(bias.dtype)
