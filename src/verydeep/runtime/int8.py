"""int8 inference: static post-training quantization, calibrated on the user's images.

The scheme is the one x86 int8 libraries run fastest and the published int8 VGG-16 results use
(top-1 70.26 -> 70.17 with per-channel weights): weights symmetric int8 **per output channel**,
activations uint8 **per tensor** with scales fixed beforehand (*static*) from the largest value
each layer produced on calibration images (*min-max*, as onnxruntime's default calibrator). After
every ReLU the range starts at 0, so those codes carry zero point 0 and all 255 levels; only the
Caffe-space input (negative after mean subtraction) needs a zero point. Convolutions and fc layers
are oneDNN's int8 kernels with bias, ReLU and requantization fused (what PyTorch's x86 quantization
lowers to), so activations stay uint8 from conv1_1 to fc7 and pooling works on the codes (max
commutes with a monotone quantizer). fc8 writes float32 logits.

On CPUs without an int8 dot product (VNNI/AMX), oneDNN sums u8 x s8 products in 16-bit pairs,
which saturate for 8-bit activations; the plan gives activations 7 bits (127 levels) there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from verydeep.core import defaults
from verydeep.errors import VerydeepError

#: Calibration images used when the caller gives more (the CLI's ``--calibration-images`` default).
CALIBRATION_IMAGES = defaults.CALIBRATION_IMAGES
#: Images per calibration forward (bounds its memory: the tapped maps of 8 images at 224 are ~1 GB).
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class Calibration:
    """The ranges static quantization fixes: the input's min and max, and the largest output of
    each conv/fc layer whose output is quantized (after its ReLU), by layer name."""

    input_min: float
    input_max: float
    ranges: dict[str, float]
    images: int

    def input_quantization(self, levels: int) -> tuple[float, int]:
        """(scale, zero point) of the uint8 input codes: asymmetric, so 0 is exact."""
        lo, hi = min(self.input_min, 0.0), max(self.input_max, 0.0)
        scale = max(hi - lo, 1e-8) / levels
        return scale, int(round(-lo / scale))

    def output_scale(self, layer: str, levels: int) -> float:
        """Scale of ``layer``'s uint8 output codes (its ReLU'd range over ``levels`` steps)."""
        if layer not in self.ranges:
            raise VerydeepError(f"int8 calibration has no range for layer {layer!r}; calibrate the same model")
        return max(self.ranges[layer], 1e-8) / levels


def check_calibration_images(images: torch.Tensor) -> torch.Tensor:
    """``images`` as a float N x 3 x H x W Caffe-space batch, at most :data:`CALIBRATION_IMAGES`."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise VerydeepError(f"int8 calibration: expected N x 3 x H x W Caffe-space images, found {found}")
    if not torch.isfinite(images).all():
        raise VerydeepError("int8 calibration: the images contain NaN or infinite values")
    return images[:CALIBRATION_IMAGES].float()


#: An exact fp32 ``features(x, taps) -> {name: tensor}``, what calibration runs.
FeatureFn = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


def calibrate(features: FeatureFn, images: torch.Tensor, *, layers: list[str]) -> Calibration:
    """Min-max ranges of ``layers`` (tap names, e.g. ``relu1_1``) over ``images``, computed by
    ``features`` (an exact fp32 ``features(x, taps)``), in batches of :data:`CALIBRATION_BATCH`."""
    images = check_calibration_images(images)
    maxima = dict.fromkeys(layers, 0.0)
    for i in range(0, images.shape[0], CALIBRATION_BATCH):
        taps = features(images[i : i + CALIBRATION_BATCH], layers)
        for name in layers:
            maxima[name] = max(maxima[name], float(taps[name].max()))
    return Calibration(float(images.min()), float(images.max()), maxima, int(images.shape[0]))
