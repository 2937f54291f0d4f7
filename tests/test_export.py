"""Exports read back by independent consumers: onnxruntime, torchvision's VGG, OpenCV's Caffe importer.

Tolerance: relative error max|a - b| / max|b| <= 1e-4 against verydeep in PyTorch (float32).
"""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import random_vgg, rel

from verydeep.cli import main
from verydeep.data.preprocess import MEAN_BGR
from verydeep.errors import VerydeepError
from verydeep.formats.export import export, probe
from verydeep.formats.input_space import TORCHVISION_MEAN, TORCHVISION_STD
from verydeep.formats.torchvision import torchvision_model

TOL = 1e-4


def caffe_batch(n: int, h: int = 224, w: int = 224, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.nn.functional.interpolate(
        torch.rand(n, 3, h // 8, w // 8, generator=g) * 255, size=(h, w), mode="bilinear"
    )
    return rgb[:, [2, 1, 0]] - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)


def rgb01_of(caffe: torch.Tensor) -> torch.Tensor:
    """Written out here: undo the mean, BGR -> RGB, /255."""
    return (caffe + torch.tensor(MEAN_BGR).view(1, 3, 1, 1))[:, [2, 1, 0]] / 255.0


@pytest.fixture(scope="module")
def model():
    return random_vgg()


def test_onnx_classic_equals_pytorch_at_batch_1_and_3(tmp_path, model):
    out = tmp_path / "vgg.onnx"
    report = export(model, out, "onnx")
    assert report.exact and report.max_rel_error <= TOL
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = caffe_batch(n, seed=n)
        with torch.no_grad():
            expected = model(x).numpy()
        assert rel(session.run(None, {"data": x.numpy()})[0], expected) <= TOL


@pytest.mark.slow
def test_onnx_dense_equals_pytorch_at_two_sizes(tmp_path, model):
    out = tmp_path / "vgg_dense.onnx"
    export(model, out, "onnx", dense=True, exporter="torchscript")  # dynamo: see the classic test
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for h, w in ((224, 224), (300, 419)):  # 300x419: Caffe's ceil-mode pooling sets the map size
        x = caffe_batch(2, h, w, seed=h)
        with torch.no_grad():
            expected = model.dense()(x).numpy()
        found = session.run(None, {"data": x.numpy()})[0]
        assert found.shape == expected.shape == (2, 10, (h + 31) // 32 - 6, (w + 31) // 32 - 6)
        assert rel(found, expected) <= TOL


def test_onnx_rgb01_input_is_exact_at_the_border(tmp_path, model):
    """The folded export takes RGB [0,1] and equals verydeep on the Caffe form of the same images
    (the mean is added before conv1_1's zero padding, so the border is exact too)."""
    out = tmp_path / "vgg_rgb.onnx"
    export(model, out, "onnx", input_space="rgb01", exporter="torchscript")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = caffe_batch(2)
    with torch.no_grad():
        expected = model(x).numpy()
    assert rel(session.run(None, {"data": rgb01_of(x).numpy()})[0], expected) <= 1e-5
    with torch.no_grad():  # and that the border is what a bias-only fold would get wrong
        folded = random_vgg()
        w = folded.conv1_1.weight[:, [2, 1, 0]] * 255
        folded.conv1_1.weight.copy_(w)
        folded.conv1_1.bias.sub_((model.conv1_1.weight * torch.tensor(MEAN_BGR).view(1, 3, 1, 1)).sum((1, 2, 3)))
        assert rel(folded(rgb01_of(x)).numpy(), expected) > 1e-6


def tv_input(caffe: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1)
    return (rgb01_of(caffe) - mean) / std


def test_torchvision_export_in_torchvision_module(tmp_path, model):
    out = tmp_path / "vgg16_tv.pth"
    report = export(model, out, "torchvision")
    assert report.input_space == "torchvision" and any("floor mode" in n for n in report.notes)
    tv = torchvision_model("D", model.width, model.num_classes).eval()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = caffe_batch(2)
    with torch.no_grad():
        assert rel(tv(tv_input(x)).numpy(), model(x).numpy()) <= TOL
    # Caffe input space: the state dict is a plain renaming, exactly equal
    export(model, tmp_path / "caffe_tv.pth", "torchvision", input_space="caffe")
    tv.load_state_dict(torch.load(tmp_path / "caffe_tv.pth", weights_only=True), strict=True)
    with torch.no_grad():
        assert rel(tv(x).numpy(), model(x).numpy()) <= 1e-6


@pytest.mark.slow
def test_torchvision_export_full_vgg16(tmp_path):
    """The real thing: torchvision.models.vgg16() loads the export with strict=True."""
    import torchvision

    full = random_vgg("D", num_classes=1000, width=1.0)
    out = tmp_path / "vgg16_tv.pth"
    export(full, out, "torchvision")
    with torch.device("meta"):  # skip the random init of 138M parameters
        tv = torchvision.models.vgg16().eval()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True, assign=True)
    x = caffe_batch(1)
    with torch.no_grad():
        assert rel(tv(tv_input(x)).numpy(), full(x).numpy()) <= TOL


@pytest.mark.parametrize("space,dense", [("caffe", False), ("rgb255", False), ("torchvision", True)])
def test_caffe_export_read_by_opencv(tmp_path, model, space, dense):
    import cv2

    report = export(model, tmp_path / "vgg.caffemodel", "caffe", input_space=space, dense=dense)
    proto, weights = report.paths
    assert proto.endswith(".prototxt") and "layer {" in open(proto).read()
    net = cv2.dnn.readNetFromCaffe(proto, weights)
    h, w = (256, 320) if dense else (224, 224)
    x = caffe_batch(2, h, w)
    inp = {"caffe": x, "rgb255": rgb01_of(x) * 255, "torchvision": tv_input(x)}[space]
    net.setInput(inp.numpy())
    found = net.forward("fc8")
    with torch.no_grad():
        expected = (model.dense() if dense else model)(x).numpy()
    assert rel(found, expected) <= TOL


def test_safetensors_round_trip_and_refusal(tmp_path, model):
    from verydeep.hub.loader import load

    report = export(model, tmp_path / "w.safetensors", "safetensors")
    back = load(report.paths[0])
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(VerydeepError, match="Caffe space"):
        export(model, tmp_path / "x.safetensors", "safetensors", input_space="rgb01")
    assert not (tmp_path / "x.safetensors").exists()


def test_probe_is_caffe_space():
    x = probe(1)
    pixels = x + torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_cli_export(tmp_path, narrow_weights, capsys):
    out = tmp_path / "n.pth"
    assert main(["export", narrow_weights, "--format", "torchvision", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "torchvision" and report["max_rel_error"] <= TOL and out.exists()
    assert main(["export", narrow_weights, "--format", "onnx", "--opset", "9", "-o", str(tmp_path / "o.onnx")]) == 1
    assert "opset 17" in capsys.readouterr().err
