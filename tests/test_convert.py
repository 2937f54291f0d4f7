"""`verydeep convert` and `verydeep info` on caffemodels: arrays carried over bit for bit, the
source's sha256 recorded, the format version reported; a net that is not a Table 1 VGG converts
through the generic graph and loads back to the same outputs."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import random_vgg

import verydeep
from verydeep.cli import main
from verydeep.formats.caffe import CaffeGraph, read_prototxt, vgg_net, write_caffemodel, write_prototxt
from verydeep.formats.safetensors import read_metadata

SMALL_NET = """name: "small"
input: "data"
input_shape { dim: 1 dim: 3 dim: 20 dim: 24 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_convert_keeps_every_array_and_records_the_source(version, tmp_path, capsys):
    model = random_vgg("A-LRN", num_classes=7)
    blobs = {
        name: [m.weight.detach().numpy(), m.bias.detach().numpy()]
        for name, m in model.named_children()
        if hasattr(m, "weight")
    }
    src = tmp_path / "net.caffemodel"
    write_caffemodel(src, blobs, vgg_net("A-LRN", 1 / 16, 7), version=version)

    assert main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert f"({version})" in info["format"] and info["config"] == "A-LRN" and info["num_classes"] == 7

    out = tmp_path / "net.safetensors"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    loaded = verydeep.load(str(out))
    for name, arrays in blobs.items():
        layer = getattr(loaded, name)
        assert np.array_equal(layer.weight.detach().numpy(), arrays[0]), name
        assert np.array_equal(layer.bias.detach().numpy(), arrays[1]), name
    assert read_metadata(out)["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_net_that_is_not_a_vgg_converts_through_the_graph(tmp_path):
    net = read_prototxt(SMALL_NET)
    rng = np.random.default_rng(0)
    blobs = {
        "conv1": [rng.standard_normal((6, 3, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)],
        "fc": [rng.standard_normal((5, 6 * 10 * 12)).astype(np.float32), rng.standard_normal(5).astype(np.float32)],
    }
    proto, weights, out = tmp_path / "small.prototxt", tmp_path / "small.caffemodel", tmp_path / "small.safetensors"
    write_prototxt(net, proto)
    write_caffemodel(weights, blobs, net)
    assert main(["convert", str(weights), "--prototxt", str(proto), "-o", str(out)]) == 0
    x = torch.from_numpy(rng.standard_normal((2, 3, 20, 24)).astype(np.float32))
    with torch.no_grad():
        expected = CaffeGraph.from_files(proto, weights)(x)
        found = verydeep.load(str(out))(x)
    assert torch.equal(found, expected)
    assert torch.allclose(found.sum(1), torch.ones(2))  # the Softmax layer ran


def test_convert_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.caffemodel"), "-o", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "nope.caffemodel" in err and "\n" not in err
    assert not (tmp_path / "x.safetensors").exists()
