"""``verydeep export``: write a VGG for other runtimes and check it before reporting success.

Each format's writer lives beside its reader (:mod:`.onnx`, :mod:`.torchvision`,
:mod:`.safetensors`, :mod:`.caffe.export`); every one is read back by an independent consumer
and compared with verydeep on a probe batch (:mod:`.checks`): onnx.checker + onnxruntime for
ONNX, torchvision's own ``vgg16()`` module for torchvision, OpenCV's Caffe importer for Caffe,
verydeep's loader (bitwise) for safetensors. A file that fails its check is removed.

``input_space`` chooses what the exported model takes (see
:data:`verydeep.formats.input_space.INPUT_SPACES`). The channel swap and scale are folded into
conv1_1's weights. The offset (mean) is folded too where the format can hold nothing else
(torchvision, which is then exact except in conv1_1's one-pixel border), and kept as a separate
op before conv1_1 where it can (ONNX: an ``Add``; Caffe: a 1x1 convolution), which keeps those
exports exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from verydeep.core.atomic import make_dirs
from verydeep.errors import VerydeepError
from verydeep.formats.caffe.export import write_caffe
from verydeep.formats.checks import ExportReport, ExportRequest, probe
from verydeep.formats.input_space import INPUT_SPACES
from verydeep.formats.onnx import OPSET, write_onnx
from verydeep.formats.safetensors import write_safetensors
from verydeep.formats.torchvision import write_torchvision
from verydeep.models.vgg import VGG

__all__ = ["FORMATS", "OPSET", "ExportReport", "ExportRequest", "export", "probe"]

#: format -> (writer, default input space, default file suffix)
FORMATS: dict[str, tuple[Callable[[ExportRequest], ExportReport], str, str]] = {
    "onnx": (write_onnx, "caffe", ".onnx"),
    "torchvision": (write_torchvision, "torchvision", ".pth"),
    "safetensors": (write_safetensors, "caffe", ".safetensors"),
    "caffe": (write_caffe, "caffe", ".caffemodel"),
}


def export(
    model: nn.Module,
    out: str | os.PathLike,
    format: str,
    *,
    input_space: str | None = None,
    dense: bool = False,
    opset: int = OPSET,
    exporter: str = "dynamo",
    precision: str = "fp32",
    calibration: torch.Tensor | None = None,
) -> ExportReport:
    """Write ``model`` as ``format`` to ``out`` taking ``input_space`` input; check it; report.

    ``input_space`` defaults to Caffe's for every format but torchvision, whose default is
    torchvision's usual input (RGB, [0,1], ImageNet mean/std). ``dense`` exports the fully
    convolutional view (ONNX with dynamic height and width; Caffe with fc layers as convolutions).
    ``precision="int8"`` (ONNX only) writes onnxruntime's static int8 model, calibrated on
    ``calibration`` (Caffe-space images, as ``model.optimized("int8", calibration=...)`` takes).
    """
    if format not in FORMATS:
        raise VerydeepError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if not isinstance(model, VGG):
        raise VerydeepError(f"export needs a Table 1 VGG; found a {type(model).__name__}")
    writer, default_space, _ = FORMATS[format]
    space = input_space or default_space
    if space not in INPUT_SPACES:
        raise VerydeepError(f"unknown input space {space!r}; known: {', '.join(INPUT_SPACES)}")
    if precision not in ("fp32", "int8"):
        raise VerydeepError(f"--precision {precision}: export writes fp32, or int8 for ONNX")
    if precision == "int8" and format != "onnx":
        raise VerydeepError(f"--precision int8: only the onnx format holds a quantized net, not {format}")
    if precision == "int8" and calibration is None:
        raise VerydeepError("--precision int8 needs calibration images (--calibration DIR)")
    out = Path(out)
    make_dirs(out.parent, target=out)
    request = ExportRequest(
        model.eval(), out, space, dense=dense, opset=opset, exporter=exporter, precision=precision,
        calibration=calibration,
    )  # fmt: skip
    return writer(request)
