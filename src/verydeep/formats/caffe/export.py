"""Caffe export: a V2 deploy prototxt and a caffemodel that Caffe (and OpenCV's importer) read.

For an input space other than Caffe's, a 1x1 convolution ``data_offset`` adds the space's
offset before conv1_1 (whose zero padding must be zero in Caffe's space), so the export is exact.
The files are checked with OpenCV's Caffe importer, or with verydeep's own reader without OpenCV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from verydeep.formats import checks
from verydeep.formats.caffe.caffemodel import write_caffemodel
from verydeep.formats.caffe.prototxt import vgg_net, write_prototxt
from verydeep.formats.checks import ExportReport, ExportRequest
from verydeep.formats.input_space import INPUT_SPACES, fold_input, to_space
from verydeep.models.vgg import VGG


def write_caffe(request: ExportRequest) -> ExportReport:
    """Write a V2 prototxt + caffemodel taking ``request.space`` input; check it in OpenCV's importer."""
    model, out, space, dense = request.model, request.out, request.space, request.dense
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
    if err > checks.TOLERANCE:
        checks.fail(
            [proto_path, weights_path], f"{weights_path}: {checker} differs from verydeep by {err:.2e} (relative)"
        )
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
    except ImportError:  # verydeep's own reader checks the files instead
        cv2 = None  # type: ignore[assignment]
    for h, w in checks.probe_sizes(dense):
        x = checks.probe(1, h, w, seed=h + w)
        inp = to_space(x, space)
        if cv2 is not None:
            net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
            net.setInput(inp.numpy())
            found = net.forward("fc8")
            checker = f"OpenCV {cv2.__version__} readNetFromCaffe"
        else:
            from verydeep.formats.caffe.load import load_caffemodel

            graph = load_caffemodel(weights, proto)
            with torch.inference_mode():
                out = graph(inp)
            found = out["fc8"] if isinstance(out, dict) else out
            checker = "verydeep's Caffe reader (OpenCV not installed)"
        worst = max(worst, checks.rel_error(found, checks.reference(model, x, dense)))
    return worst, checker
