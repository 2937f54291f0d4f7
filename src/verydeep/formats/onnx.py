"""ONNX export: opset 18+, checked by onnx.checker and onnxruntime against verydeep.

The input space's channel swap and scale are folded into conv1_1; its offset stays a separate
``Add`` before conv1_1 so that conv1_1's zero padding is zero in Caffe's space: the export is
exact at the image border too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep import configs
from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError
from verydeep.formats import checks
from verydeep.formats.checks import ExportReport, ExportRequest
from verydeep.formats.input_space import INPUT_SPACES, fold_input, to_space
from verydeep.models.build import error_reason
from verydeep.models.vgg import VGG
from verydeep.runtime.capabilities import int8_dot_product
from verydeep.runtime.plan import TOLERANCE

#: Default ONNX opset (the torch.export-based exporter's own minimum is 18; 17 works through its
#: version converter).
OPSET = 18


class _Offset(nn.Module):
    """``net(x + offset)``: the part of an input-space conversion that cannot precede zero padding
    as a bias. Added before conv1_1, it keeps the export exact at the image border."""

    def __init__(self, net: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.offset: torch.Tensor
        self.register_buffer("offset", offset.detach().to(torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.offset)


def in_space(model: VGG, space: str, *, dense: bool = False) -> nn.Module:
    """A copy of ``model`` (or its dense view) taking ``space`` input, exactly (offset kept apart)."""
    net = copy.deepcopy(model).eval()
    body: nn.Module = net.dense() if dense else net
    if space != "caffe":
        conv = net.conv1_1
        assert conv.bias is not None  # every VGG convolution has a bias
        w, b, offset = fold_input(conv.weight, conv.bias, space, fold_offset=False)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        if bool(offset.abs().max() > 0):
            body = _Offset(body, offset)
    return body.eval()


def write_onnx(request: ExportRequest) -> ExportReport:
    """Export ``request.model`` as ONNX, then check it with onnx.checker and onnxruntime."""
    model, out, space, dense = request.model, request.out, request.space, request.dense
    opset, exporter = request.opset, request.exporter
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise VerydeepError(
            f"{out}: --format onnx needs onnx and onnxruntime, which are missing ({e.name}): "
            "pip install onnx onnxruntime onnxscript (or verydeep[all])"
        ) from None
    if opset < 17:
        raise VerydeepError(f"--opset {opset}: the export needs opset 17 or later")
    if exporter not in EXPORTERS:
        raise VerydeepError(f"unknown ONNX exporter {exporter!r}; use {' or '.join(EXPORTERS)}")
    net = in_space(model, space, dense=dense).cpu()
    example = to_space(checks.probe(2), space)
    int8 = request.precision == "int8"
    try:
        with atomic_path(out) as tmp:
            export_graph(net, example, tmp, dense=dense, opset=opset, exporter=exporter)
            if int8:  # quantized from the checked-in-memory fp32 graph, in the export's input space
                assert request.calibration is not None
                images = to_space(request.calibration.float().cpu(), space).numpy()
                quantize_onnx(tmp, tmp, images, reduce_range=not int8_dot_product())
    except VerydeepError:
        raise
    except Exception as e:  # the exporters raise many types; the message is what matters
        raise VerydeepError(f"{out}: ONNX export failed ({error_reason(e)})") from None
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as e:
        checks.fail([out], f"{out}: onnx.checker rejected the export: {error_reason(e)}")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for h, w in checks.probe_sizes(dense):
        x = checks.probe(1, h, w, seed=h + w)  # batch 1: not the example's 2, so the batch is really dynamic
        found = session.run(None, {"data": to_space(x, space).numpy()})[0]
        worst = max(worst, checks.rel_error(found, checks.reference(model, x, dense)))
    bound = TOLERANCE["int8"] if int8 else checks.TOLERANCE
    if worst > bound:
        checks.fail([out], f"{out}: onnxruntime differs from PyTorch by {worst:.2e} (relative), more than {bound:g}")
    notes = [f"opset {opset}, {exporter} exporter; input 'data' ({INPUT_SPACES[space].description}), output 'fc8'"]
    if int8:
        notes.append(
            f"static int8 (QDQ): per-channel int8 weights, uint8 activations min-max calibrated on {len(images)} images"
        )
    notes.append("dynamic batch, height and width (at least 224)" if dense else "dynamic batch, 224x224 input")
    checked = f"onnx.checker + onnxruntime {ort.__version__}"
    return ExportReport("onnx", [str(out)], space, checked, worst, not int8, notes)


def _dynamo(dense: bool) -> dict[str, Any]:
    """torch.export-based exporter: dynamic batch, and dynamic height/width from 224 for the dense view."""
    dims = {0: torch.export.Dim("batch", min=1)}
    if dense:  # any size from 224 (one fc6 window) up
        dims.update({2: torch.export.Dim("height", min=configs.CROP), 3: torch.export.Dim("width", min=configs.CROP)})
    return {"dynamo": True, "dynamic_shapes": (dims,), "verbose": False, "external_data": False}


def _torchscript(dense: bool) -> dict[str, Any]:
    """The TorchScript-based exporter (for runtimes that want its graph)."""
    axes = {0: "batch", 2: "height", 3: "width"} if dense else {0: "batch"}
    return {"dynamo": False, "dynamic_axes": {"data": axes, "fc8": axes}}


def export_graph(net: nn.Module, example: torch.Tensor, path: Path, *, dense: bool, opset: int, exporter: str) -> None:
    """Write ``net`` traced on ``example`` to ``path`` with one of torch's exporters: input
    ``data``, output ``fc8``, dynamic batch (and dynamic height/width with ``dense``)."""
    options = EXPORTERS[exporter](dense)
    torch.onnx.export(
        net, (example,), str(path), opset_version=opset, input_names=["data"], output_names=["fc8"], **options
    )


#: ``--exporter`` name -> the options that select and configure torch's exporter.
EXPORTERS: dict[str, Callable[[bool], dict[str, Any]]] = {"dynamo": _dynamo, "torchscript": _torchscript}


def quantize_onnx(
    src: str | Path, out: str | Path, calibration: Any, *, per_channel: bool = True, reduce_range: bool = False
) -> Path:
    """``src`` (an fp32 export) as onnxruntime's static int8 model at ``out``: QDQ format, int8
    weights per output channel (``per_channel``), uint8 activations with min-max ranges from
    ``calibration`` (N x 3 x H x W images in the export's input space; the same scheme as
    ``optimized("int8")``). ``reduce_range`` gives 7-bit weights, for CPUs without VNNI."""
    try:
        import numpy as np
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise VerydeepError(
            f"{out}: int8 ONNX needs onnxruntime, which is missing ({e.name}): pip install onnxruntime"
        ) from None
    images = np.ascontiguousarray(np.asarray(calibration, dtype=np.float32))

    class Reader(CalibrationDataReader):  # one image per calibration step, as onnxruntime expects
        def __init__(self) -> None:
            self.items = iter(images[i : i + 1] for i in range(images.shape[0]))

        def get_next(self) -> dict[str, Any] | None:
            x = next(self.items, None)
            return None if x is None else {"data": x}

    out = Path(out)
    with atomic_path(out) as tmp, _quiet_root_logger():
        # onnxruntime's recommended first step: shape inference and graph optimization
        quant_pre_process(str(src), str(tmp))
        quantize_static(
            str(tmp), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    return out


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantization tools log advice through the root logger; keep it off the console."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
