"""Write a VGG for other runtimes: ONNX, torchvision, safetensors, Caffe; check each before success.

Every export is read back by an independent consumer and compared with verydeep on a probe
batch before :func:`export` returns: onnx.checker + onnxruntime for ONNX, torchvision's own
``vgg16()`` module for torchvision, OpenCV's Caffe importer for Caffe, verydeep's loader for
safetensors. A file that fails its check is removed, so a wrong export never looks like a result.

``input_space`` chooses what the exported model takes (see :data:`verydeep.formats.importers.INPUT_SPACES`).
The channel swap and scale are folded into conv1_1's weights. The offset (mean) is folded too
where the format can hold nothing else (torchvision, which is then exact except in conv1_1's
one-pixel border), and kept as a separate op before conv1_1 where it can (ONNX: an ``Add``;
Caffe: a 1x1 convolution), which keeps those exports exact: conv1_1's zero padding must be zero
in Caffe's space.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep import configs
from verydeep.errors import VerydeepError
from verydeep.formats.importers import INPUT_SPACES, fold_input, to_space, to_torchvision_state, torchvision_model
from verydeep.models.vgg import VGG

#: Default ONNX opset (the torch.export-based exporter's own minimum is 18; 17 works through its
#: version converter).
OPSET = 18
#: Largest relative difference (max |a - b| / max |b|) an exact export may show against verydeep.
TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """What was written and how it was checked."""

    format: str
    paths: list[str]
    input_space: str
    checked_with: str
    max_rel_error: float  # against verydeep on the probe batch
    exact: bool  # whether the conversion is exact by construction (then max_rel_error <= TOLERANCE)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- helpers ------------------------------------------------------------------------------------


class _Offset(nn.Module):
    """``net(x + offset)``: the part of an input-space conversion that cannot precede zero padding
    as a bias. Added before conv1_1, it keeps the export exact at the image border."""

    def __init__(self, net: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("offset", offset.detach().to(torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.offset)


def in_space(model: VGG, space: str, *, dense: bool = False) -> nn.Module:
    """A copy of ``model`` (or its dense view) taking ``space`` input, exactly (offset kept apart)."""
    net = copy.deepcopy(model).eval()
    if space != "caffe":
        w, b, offset = fold_input(net.conv1_1.weight, net.conv1_1.bias, space, fold_offset=False)
        with torch.no_grad():
            net.conv1_1.weight.copy_(w)
            net.conv1_1.bias.copy_(b)
    body: nn.Module = net.dense() if dense else net
    if space != "caffe" and bool(offset.abs().max() > 0):
        body = _Offset(body, offset)
    return body.eval()


def probe(batch: int = 2, height: int = configs.CROP, width: int = configs.CROP, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of smooth random images in Caffe space (what checks compare on)."""
    from verydeep.data.preprocess import to_caffe

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=g) * 255
    rgb = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return to_caffe(rgb)


def rel_error(found: Any, expected: Any) -> float:
    found, expected = torch.as_tensor(found, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    if found.shape != expected.shape:
        raise VerydeepError(f"export check: output shape {tuple(found.shape)}, expected {tuple(expected.shape)}")
    scale = float(expected.abs().max())
    return float((found - expected).abs().max()) / (scale if scale > 0 else 1.0)


def _reference(model: VGG, x: torch.Tensor, dense: bool) -> torch.Tensor:
    with torch.inference_mode():
        return (model.dense() if dense else model)(x.to(next(model.parameters()).device)).float().cpu()


def _probe_sizes(dense: bool) -> list[tuple[int, int]]:
    return [(configs.CROP, configs.CROP), (256, 288)] if dense else [(configs.CROP, configs.CROP)]


def _fail(paths: list[Path], message: str) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    raise VerydeepError(message)


# -- formats ------------------------------------------------------------------------------------


def _export_onnx(model: VGG, out: Path, space: str, dense: bool, opset: int, exporter: str) -> ExportReport:
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
    net = in_space(model, space, dense=dense).cpu()
    example = to_space(probe(2), space)
    axes = {0: "batch", 2: "height", 3: "width"} if dense else {0: "batch"}
    tmp = out.with_name(out.name + ".tmp")
    try:
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("batch", min=1)}
            if dense:  # any size from 224 (one fc6 window) up
                dims.update(
                    {2: torch.export.Dim("height", min=configs.CROP), 3: torch.export.Dim("width", min=configs.CROP)}
                )
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                dynamo=True,
                opset_version=opset,
                input_names=["data"],
                output_names=["fc8"],
                dynamic_shapes=({k: v for k, v in dims.items()},),
                verbose=False,
                external_data=False,
            )
        elif exporter == "torchscript":
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["data"],
                output_names=["fc8"],
                dynamic_axes={"data": axes, "fc8": axes},
            )
        else:
            raise VerydeepError(f"unknown ONNX exporter {exporter!r}; use dynamo or torchscript")
    except VerydeepError:
        raise
    except Exception as e:  # the exporters raise many types; the message is what matters
        tmp.unlink(missing_ok=True)
        raise VerydeepError(f"{out}: ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    os.replace(tmp, out)
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as e:
        _fail([out], f"{out}: onnx.checker rejected the export: {str(e).splitlines()[0]}")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for h, w in _probe_sizes(dense):
        x = probe(1, h, w, seed=h + w)  # batch 1: not the example's 2, so the batch is really dynamic
        found = session.run(None, {"data": to_space(x, space).numpy()})[0]
        worst = max(worst, rel_error(found, _reference(model, x, dense)))
    if worst > TOLERANCE:
        _fail([out], f"{out}: onnxruntime differs from PyTorch by {worst:.2e} (relative), more than {TOLERANCE:g}")
    notes = [f"opset {opset}, {exporter} exporter; input 'data' ({INPUT_SPACES[space].description}), output 'fc8'"]
    notes.append("dynamic batch, height and width (at least 224)" if dense else "dynamic batch, 224x224 input")
    return ExportReport("onnx", [str(out)], space, f"onnx.checker + onnxruntime {ort.__version__}", worst, True, notes)


def _export_torchvision(model: VGG, out: Path, space: str, dense: bool, opset: int, exporter: str) -> ExportReport:
    from verydeep.formats.importers import TORCHVISION_ARCH

    if dense:
        raise VerydeepError("--dense: torchvision's VGG has no fully convolutional form; export the classic net")
    state = to_torchvision_state(model, space)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    tv = torchvision_model(model.config, model.width, model.num_classes, empty=True).eval()
    tv.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True, assign=True)
    x = probe(1)
    with torch.inference_mode():
        found = tv(to_space(x, space))
    err = rel_error(found, _reference(model, x, False))
    offset = INPUT_SPACES[space].offsets()
    exact = bool(abs(offset).max() == 0) or space == "caffe"
    arch = TORCHVISION_ARCH[model.config]
    loader = (
        f"torchvision.models.{arch}(num_classes={model.num_classes})"
        if model.width == 1
        else (
            f"verydeep.formats.importers.torchvision_model({model.config!r}, {model.width}, {model.num_classes}) (narrow net)"
        )
    )
    notes = [
        f"load with {loader}.load_state_dict(torch.load(PATH, weights_only=True))",
        f"input: {INPUT_SPACES[space].description}",
        "torchvision pools with floor mode and AdaptiveAvgPool2d(7): equal to verydeep (Caffe's ceil mode) "
        "when height and width are multiples of 32, i.e. at 224x224 for the classic net; other sizes differ",
    ]
    if not exact:
        notes.append(
            "the input offset is folded into conv1_1's bias: exact except conv1_1's one-pixel border, where zero "
            f"padding stands for Caffe value(s) {', '.join(f'{v:+.3f}' for v in offset)} instead of 0 "
            f"(measured on the probe: {err:.2e} relative at fc8)"
        )
    if exact and err > TOLERANCE:
        _fail([out], f"{out}: torchvision's {arch} differs from verydeep by {err:.2e} (relative)")
    return ExportReport("torchvision", [str(out)], space, f"torchvision {arch} module", err, exact, notes)


def _export_safetensors(model: VGG, out: Path, space: str, dense: bool, opset: int, exporter: str) -> ExportReport:
    from verydeep.hub.weights import load, save_safetensors

    if space != "caffe":
        raise VerydeepError(
            f"--input {space}: a safetensors file holds verydeep's own VGG, whose input is Caffe space; "
            "for other input spaces use --format onnx or caffe (exact) or torchvision"
        )
    save_safetensors(model, out)
    back = load(str(out))
    mine, theirs = model.state_dict(), back.state_dict()
    same = mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine)
    if not same:
        _fail([out], f"{out}: reading the file back did not give the same parameters")
    notes = [f"load with verydeep.load({str(out)!r}); dense: load then model.dense()"] if dense else []
    return ExportReport("safetensors", [str(out)], space, "verydeep.load (bitwise)", 0.0, True, notes)


def _export_caffe(model: VGG, out: Path, space: str, dense: bool, opset: int, exporter: str) -> ExportReport:
    import numpy as np

    from verydeep.formats.caffe import vgg_net, write_caffemodel, write_prototxt

    weights_path = out.with_suffix(".caffemodel") if out.suffix != ".caffemodel" else out
    proto_path = weights_path.with_suffix(".prototxt")
    net = vgg_net(model.config, model.width, model.num_classes, dense=dense, lrn_k=model.lrn_k)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if space != "caffe":
        w, b, offset = fold_input(state["conv1_1.weight"], state["conv1_1.bias"], space, fold_offset=False)
        state["conv1_1.weight"], state["conv1_1.bias"] = w, b
        _insert_offset_layer(net)
    blobs: dict[str, list[np.ndarray]] = {}
    for key, value in state.items():
        layer, _ = key.rsplit(".", 1)
        blobs.setdefault(layer, []).append(value.numpy())
    if dense:  # fc as convolutions: fc6 OUT x C x 7 x 7, fc7/fc8 OUT x IN x 1 x 1
        c, h, w_ = model.fc6_input
        for name in ("fc6", "fc7", "fc8"):
            wt = blobs[name][0]
            blobs[name][0] = wt.reshape(wt.shape[0], c, h, w_) if name == "fc6" else wt.reshape(*wt.shape, 1, 1)
    if space != "caffe":
        blobs["data_offset"] = [np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), offset.numpy().astype(np.float32)]
    write_prototxt(net, proto_path)
    write_caffemodel(weights_path, blobs, net=net)
    err, checker = _check_caffe(model, proto_path, weights_path, space, dense)
    if err > TOLERANCE:
        _fail([proto_path, weights_path], f"{weights_path}: {checker} differs from verydeep by {err:.2e} (relative)")
    notes = [f"V2 prototxt + caffemodel; input blob 'data' ({INPUT_SPACES[space].description})"]
    if space != "caffe":
        notes.append("layer 'data_offset' (1x1 convolution) adds the input offset before conv1_1's zero padding")
    return ExportReport("caffe", [str(proto_path), str(weights_path)], space, checker, err, True, notes)


def _insert_offset_layer(net: Any) -> None:
    """Put a 1x1 Convolution ``data_offset`` (identity weights, the offset as bias) between the
    input blob and conv1_1."""
    layers = list(net.layer)
    first = next(i for i, layer in enumerate(layers) if layer.name == "conv1_1")
    source = layers[first].bottom[0]
    template = type(layers[first])()
    template.name, template.type = "data_offset", "Convolution"
    template.bottom.append(source)
    template.top.append("data_caffe")
    template.convolution_param.num_output = 3
    template.convolution_param.kernel_size.append(1)
    layers[first].bottom[0] = "data_caffe"
    del net.layer[:]
    net.layer.extend(layers[:first] + [template] + layers[first:])


def _check_caffe(model: VGG, proto: Path, weights: Path, space: str, dense: bool) -> tuple[float, str]:
    """Run the files in OpenCV's Caffe importer (verydeep's own Caffe reader if OpenCV is absent)."""
    worst = 0.0
    try:
        import cv2
    except ImportError:
        cv2 = None
    for h, w in _probe_sizes(dense):
        x = probe(1, h, w, seed=h + w)
        inp = to_space(x, space)
        if cv2 is not None:
            net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
            net.setInput(inp.numpy())
            found = net.forward("fc8")
            checker = f"OpenCV {cv2.__version__} readNetFromCaffe"
        else:
            from verydeep.hub.weights import load_caffemodel

            graph = load_caffemodel(weights, proto)
            with torch.inference_mode():
                out = graph(inp)
            found = out["fc8"] if isinstance(out, dict) else out
            checker = "verydeep's Caffe reader (OpenCV not installed)"
        worst = max(worst, rel_error(found, _reference(model, x, dense)))
    return worst, checker


#: format -> (writer, default input space, default file suffix)
FORMATS: dict[str, tuple[Callable[..., ExportReport], str, str]] = {
    "onnx": (_export_onnx, "caffe", ".onnx"),
    "torchvision": (_export_torchvision, "torchvision", ".pth"),
    "safetensors": (_export_safetensors, "caffe", ".safetensors"),
    "caffe": (_export_caffe, "caffe", ".caffemodel"),
}


def export(
    model: VGG,
    out: str | os.PathLike,
    format: str,
    *,
    input_space: str | None = None,
    dense: bool = False,
    opset: int = OPSET,
    exporter: str = "dynamo",
) -> ExportReport:
    """Write ``model`` as ``format`` to ``out`` taking ``input_space`` input; check it; report.

    ``input_space`` defaults to Caffe's for every format but torchvision, whose default is
    torchvision's usual input (RGB, [0,1], ImageNet mean/std). ``dense`` exports the fully
    convolutional view (ONNX with dynamic height and width; Caffe with fc layers as convolutions).
    """
    if format not in FORMATS:
        raise VerydeepError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if not isinstance(model, VGG):
        raise VerydeepError(f"export needs a Table 1 VGG; found a {type(model).__name__}")
    writer, default_space, _ = FORMATS[format]
    space = input_space or default_space
    if space not in INPUT_SPACES:
        raise VerydeepError(f"unknown input space {space!r}; known: {', '.join(INPUT_SPACES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    return writer(model, out, space, dense, opset, exporter)
