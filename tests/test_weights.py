"""Weights files: safetensors with metadata, name/shape matching with clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_vgg
from safetensors.torch import save_file

import verydeep
from verydeep import configs
from verydeep.configs import NetSpec
from verydeep.errors import WeightsError
from verydeep.formats.safetensors import read_metadata, save_safetensors
from verydeep.models.build import vgg_spec_from_shapes


def test_safetensors_round_trip_keeps_config_names_and_arrays(tmp_path):
    model = random_vgg("A-LRN", num_classes=7, lrn_k=2.0)
    model.class_names = [f"c{i}" for i in range(7)]
    path = save_safetensors(model, tmp_path / "m.safetensors", source="test")
    meta = read_metadata(path)
    assert meta["config"] == "A-LRN" and meta["num_classes"] == 7 and meta["source"] == "test"
    assert meta["input_space"].startswith("caffe-bgr")
    loaded = verydeep.load(str(path))
    assert loaded.config == "A-LRN" and loaded.lrn_k == 2.0 and loaded.class_names == model.class_names
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # same arrays; kernels may differ in summation order with alignment
        assert torch.allclose(model(x), loaded(x), rtol=1e-5, atol=1e-6)
    assert not loaded.training


def test_plain_state_dict_in_caffe_names_is_recognised(tmp_path):
    model = random_vgg("B", num_classes=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    loaded = verydeep.load(str(tmp_path / "plain.safetensors"))
    assert loaded.config == "B" and loaded.num_classes == 5 and loaded.class_names is None


@pytest.mark.parametrize("config", list(configs.TABLE_1))
def test_spec_from_shapes_recognises_every_config(config):
    shapes = configs.param_shapes(config, 0.25, 12)
    spec = vgg_spec_from_shapes(shapes)
    expected = "A" if config == "A-LRN" else config  # LRN has no parameters: A and A-LRN look alike
    assert spec == NetSpec(expected, num_classes=12, width=0.25)


def test_shape_mismatch_names_file_layer_expected_and_found(tmp_path):
    model = random_vgg("D", num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["conv3_2.weight"] = torch.zeros(16, 16, 5, 5)
    path = tmp_path / "bad.safetensors"
    save_safetensors(model, path)
    meta = {"format": "verydeep-weights-1", **{k: json.dumps(v) for k, v in model.meta().items()}}
    save_file(state, str(path), metadata=meta)
    with pytest.raises(
        WeightsError, match=r"bad.safetensors: layer conv3_2: weight expected shape 16x16x3x3, found 16x16x5x5"
    ):
        verydeep.load(str(path))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(WeightsError, match="nope.caffemodel: no such file"):
        verydeep.load(str(tmp_path / "nope.caffemodel"))
    (tmp_path / "x.bin").write_bytes(b"1234")
    with pytest.raises(WeightsError, match="x.bin: unknown weights format '.bin'"):
        verydeep.load(str(tmp_path / "x.bin"))
    (tmp_path / "y.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="y.safetensors: not a readable safetensors file"):
        verydeep.load(str(tmp_path / "y.safetensors"))
