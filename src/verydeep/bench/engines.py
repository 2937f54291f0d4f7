"""The engines a benchmark times, each a pair of callables (classic view, dense view) on tensors.

An engine's calls take Caffe-space input and return its scores as a tensor (or what converts to
one); engines built on other runtimes (onnxruntime, OpenCV) run the exact net exported to ONNX.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep import configs
from verydeep.formats.onnx import export_graph, quantize_onnx
from verydeep.models.vgg import VGG
from verydeep.runtime.capabilities import int8_dot_product

#: A view of a net under one engine: Caffe-space input -> scores.
Call = Callable[[torch.Tensor], Any]
#: The ONNX opset the exact net is exported with for onnxruntime and OpenCV (OpenCV's importer
#: reads the TorchScript exporter's graphs).
ONNX_OPSET = 17


@dataclass(frozen=True)
class Engine:
    """One engine at one precision; ``dense`` is None where it has no dense view."""

    name: str  # "verydeep" | "verydeep+compile" | "verydeep+direct" | "torchvision" | "exact" | FOREIGN_ENGINES
    precision: str
    classic: Call
    dense: Call | None = None
    build_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    plan: str = ""  # how it computes, in a few words (instruction set, dtype, kernels)

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"

    @property
    def fidelity(self) -> str:
        """``"exact"`` (fp32) or ``"reduced"`` (bf16, fp16, int8): engines are ranked within a class."""
        return "exact" if self.info.get("dtype", self.precision) == "fp32" else "reduced"


def torch_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as an engine call, under ``torch.inference_mode``."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return run


def onnx_file(model: VGG, folder: Path, dense: bool) -> Path:
    """The exact net (or its dense view) as ONNX in ``folder`` (written once, then reused):
    a dynamic batch, and a dynamic height and width for the dense view."""
    path = folder / ("dense.onnx" if dense else "classic.onnx")
    if path.exists():
        return path
    # in eval mode: the exporter restores the module's mode afterwards, and a dense view left in
    # training mode would put the model it wraps (dropout) in training mode too
    net = (model.dense() if dense else model).cpu().eval()
    x = torch.zeros(1, 3, configs.CROP, configs.CROP)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        export_graph(net, x, path, dense=dense, opset=ONNX_OPSET, exporter="torchscript")
    return path


def onnxruntime_engine(
    model: VGG, folder: Path, threads: int, dense: bool, calibration: torch.Tensor | None
) -> list[Engine]:
    """onnxruntime's CPU provider on the exported exact net, with ``threads`` intra-op threads;
    with ``calibration`` also its static int8 model (:func:`~verydeep.formats.onnx.quantize_onnx`:
    per-channel weights, min-max calibrated on the same images as verydeep's int8)."""
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session(path: Path) -> Call:
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(np.asarray(s.run(None, {"data": x.numpy()})[0]))

    classic = session(onnx_file(model, folder, False))
    dense_fn = session(onnx_file(model, folder, True)) if dense else None
    info = {"version": ort.__version__}
    engines = [Engine("onnxruntime", "fp32", classic, dense_fn, time.perf_counter() - t0, info, "MLAS fp32")]
    if calibration is not None:
        t0 = time.perf_counter()
        images = calibration.cpu().numpy()
        reduce = not int8_dot_product()  # 7-bit weights where 16-bit sums could saturate, as its docs advise
        q_classic = session(quantize_onnx(onnx_file(model, folder, False), folder / "classic-int8.onnx", images,
                                          reduce_range=reduce))  # fmt: skip
        q_dense = None
        if dense:
            q_dense = session(quantize_onnx(onnx_file(model, folder, True), folder / "dense-int8.onnx", images,
                                            reduce_range=reduce))  # fmt: skip
        plan = "QDQ int8, per-channel weights" + (", 7-bit weights" if reduce else "")
        engines.append(Engine("onnxruntime", "int8", q_classic, q_dense, time.perf_counter() - t0,
                              {**info, "dtype": "int8"}, plan))  # fmt: skip
    return engines


def opencv_engine(
    model: VGG, folder: Path, threads: int, dense: bool, calibration: torch.Tensor | None
) -> list[Engine]:
    """OpenCV's ``cv2.dnn`` (its own CPU backend) on the exported exact net."""
    import cv2

    t0 = time.perf_counter()
    cv2.setNumThreads(threads)

    def net_for(path: Path) -> Call:
        net = cv2.dnn.readNetFromONNX(str(path))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def run(x: torch.Tensor) -> torch.Tensor:
            net.setInput(x.numpy())
            return torch.from_numpy(net.forward().copy())

        return run

    classic = net_for(onnx_file(model, folder, False))
    dense_fn = net_for(onnx_file(model, folder, True)) if dense else None
    info = {"version": cv2.__version__}
    return [Engine("opencv", "fp32", classic, dense_fn, time.perf_counter() - t0, info, "cv.dnn fp32")]


#: The engines built on other runtimes: name -> builder (the model, a work folder, threads, dense?,
#: int8 calibration images or None).
FOREIGN_ENGINES: dict[str, Callable[[VGG, Path, int, bool, torch.Tensor | None], list[Engine]]] = {
    "onnxruntime": onnxruntime_engine,
    "opencv": opencv_engine,
}
