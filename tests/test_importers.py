"""torchvision .pth and Keras .h5 weights onto verydeep's module.

References are independent of verydeep.importers: torchvision's own VGG module on torchvision's
input, and Keras' layouts written with h5py from the published files' names (HWIO kernels,
channels_last flatten before fc1; the writer is the Keras fuzz target's) and checked with numpy.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from fuzz.fuzz_keras import write_keras
from helpers import random_vgg, rel

import verydeep
from verydeep.data.preprocess import MEAN_BGR
from verydeep.errors import WeightsError
from verydeep.formats.input_space import TORCHVISION_MEAN, TORCHVISION_STD, fold_input, to_space, unfold_input
from verydeep.formats.keras import load_keras, load_keras_h5
from verydeep.formats.torchvision import (
    load_torchvision,
    load_torchvision_state,
    to_torchvision_state,
    torchvision_model,
)

WIDTH = 1 / 16


def rgb01_batch(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 16, size // 16, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def caffe_from_rgb01(x: torch.Tensor) -> torch.Tensor:
    """Written out here, not taken from verydeep: BGR, 0..255, mean pixel subtracted."""
    mean = torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
    return x[:, [2, 1, 0]] * 255.0 - mean


def tv_from_rgb01(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1)) / torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1)


# -- input spaces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["rgb255", "rgb01", "torchvision"])
def test_to_space_matches_the_written_out_conversions(space):
    x = rgb01_batch(1, 32)
    caffe = caffe_from_rgb01(x)
    expected = {"rgb255": x * 255, "rgb01": x, "torchvision": tv_from_rgb01(x)}[space]
    assert torch.allclose(to_space(caffe, space), expected, atol=1e-4)


@pytest.mark.parametrize("space", ["rgb255", "rgb01", "torchvision"])
def test_fold_is_exact_with_offset_and_border_only_without(space):
    torch.manual_seed(0)
    w, b = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = rgb01_batch(1, 32).double()
    ref = torch.nn.functional.conv2d(caffe_from_rgb01(x), w, b, padding=1)
    xs = to_space(caffe_from_rgb01(x), space)
    w2, b2, off = fold_input(w, b, space, fold_offset=False)
    exact = torch.nn.functional.conv2d(xs + off.view(1, 3, 1, 1), w2, b2, padding=1)
    assert rel(exact, ref) < 1e-12
    w3, b3, _ = fold_input(w, b, space, fold_offset=True)
    folded = torch.nn.functional.conv2d(xs, w3, b3, padding=1)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert rel(folded[interior], ref[interior]) < 1e-12
    assert (folded - ref).abs().max() > 1e-6  # the border differs: zero padding means another pixel
    # unfold is the exact inverse of the bias fold
    w4, b4 = unfold_input(w3, b3, space)
    assert torch.allclose(w4, w, atol=1e-12) and torch.allclose(b4, b, atol=1e-10)


# -- torchvision -----------------------------------------------------------------------------------


def test_torchvision_state_dict_loads_and_matches_torchvision_module(tmp_path):
    """A torchvision VGG (its own module, narrowed) saved as .pth, imported, gives the same
    scores on Caffe input as torchvision does on its usual input."""
    torch.manual_seed(1)
    tv = torchvision_model("D", WIDTH, 10).eval()
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp_path / "vgg16_tv.pth"
    torch.save(tv.state_dict(), path)
    model = load_torchvision(path)
    assert isinstance(model, verydeep.VGG) and not model.training
    assert (model.config, model.width, model.num_classes) == ("D", WIDTH, 10)
    x = rgb01_batch(2)
    with torch.no_grad():
        expected = tv(tv_from_rgb01(x))
        found = model(caffe_from_rgb01(x))
    # exact but for conv1_1's border, where ImageNet's mean and Caffe's mean pixel differ by <= 0.5/255
    assert rel(found, expected) < 1e-4
    # every layer but conv1_1 is a plain copy
    names = {
        "conv5_3.weight": "features.28.weight",
        "fc6.weight": "classifier.0.weight",
        "fc8.bias": "classifier.6.bias",
    }
    for mine, theirs in names.items():
        assert torch.equal(model.state_dict()[mine], tv.state_dict()[theirs])


def test_torchvision_round_trip_and_dispatch_through_verydeep_load(tmp_path):
    model = random_vgg("E", width=WIDTH)
    path = tmp_path / "vgg19.pth"
    torch.save(to_torchvision_state(model), path)
    state, meta = load_torchvision_state(path)
    assert meta["config"] == "E" and meta["file_input_space"] == "torchvision"
    for k, v in model.state_dict().items():
        assert torch.allclose(state[k], v, atol=1e-5, rtol=1e-5), k
    loaded = verydeep.load(str(path))
    assert isinstance(loaded, verydeep.VGG) and loaded.config == "E"


def test_verydeep_named_pth_and_checkpoint_wrappers(tmp_path):
    model = random_vgg()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    state, meta = load_torchvision_state(path)
    assert meta["source_format"] == "verydeep-state-dict"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class NotATensor:  # pickled by reference: weights_only=True must refuse it
    pass


def test_pth_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_torchvision_state(path)


def test_batchnorm_vgg_is_refused(tmp_path):
    from torchvision.models import vgg

    features = vgg.make_layers([4, "M", 8, "M"], batch_norm=True)  # vgg*_bn's layout, narrow
    path = tmp_path / "bn.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    with pytest.raises(WeightsError, match="batch-norm"):
        load_torchvision_state(path)


# -- Keras -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,layout", [("D", "old"), ("E", "new")])
def test_keras_h5_loads_and_equals_the_source(tmp_path, config, layout):
    model = random_vgg(config, num_classes=7, width=WIDTH)
    path = tmp_path / "vgg_keras.h5"
    write_keras(path, model, layout, pools=True)
    state, meta = load_keras_h5(path)
    assert (meta["config"], meta["num_classes"], meta["top"]) == (config, 7, True)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    loaded = verydeep.load(str(path))
    x = caffe_from_rgb01(rgb01_batch(1))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_keras_fc1_permutation_against_a_numpy_keras_forward(tmp_path):
    """fc1 computed the Keras way (channels_last flatten of pool5, x @ kernel) equals verydeep's fc6."""
    model = random_vgg(width=WIDTH)
    path = tmp_path / "k.h5"
    write_keras(path, model, pools=True)
    loaded = load_keras(path)
    x = caffe_from_rgb01(rgb01_batch(1))
    with torch.no_grad():
        feats = loaded.features(x, taps=["pool5", "fc6"])
    with h5py.File(path, "r") as f:
        kernel, bias = f["fc1"]["fc1_W_1:0"][:], f["fc1"]["fc1_b_1:0"][:]
    pool5_hwc = feats["pool5"][0].numpy().transpose(1, 2, 0).reshape(-1)
    keras_fc1 = pool5_hwc.astype(np.float64) @ kernel + bias
    assert np.allclose(feats["fc6"][0].numpy(), keras_fc1, atol=1e-4)


def test_keras_notop_and_keras3_layout(tmp_path):
    model = random_vgg(width=WIDTH)
    path = tmp_path / "notop.h5"
    write_keras(path, model, top=False, pools=True)
    loaded = load_keras(path)
    x = caffe_from_rgb01(rgb01_batch(1))
    with torch.no_grad():
        assert torch.allclose(loaded.features(x, ["pool5"])["pool5"], model.features(x, ["pool5"])["pool5"], atol=1e-5)
        assert torch.isnan(loaded(x)).all()  # no top in the file: scores must not pass for real ones
    path3 = write_keras(tmp_path / "k3.weights.h5", model, "keras3", top=False)  # layers/<name>/vars/<i>
    state3, meta3 = load_keras_h5(path3)
    assert not meta3["top"] and torch.equal(state3["conv4_2.weight"], model.conv4_2.weight)


def test_keras_theano_kernels_are_refused(tmp_path):
    """The old *_th_dim_ordering_th_kernels.h5 files hold OIHW kernels: refused, not misread."""
    model = random_vgg(width=WIDTH)
    path = tmp_path / "th.h5"
    write_keras(path, model, pools=True)
    with h5py.File(path, "r+") as f:
        del f["block1_conv1"]["block1_conv1_W_1:0"]
        f["block1_conv1"].create_dataset("block1_conv1_W_1:0", data=model.conv1_1.weight.detach().numpy())
    with pytest.raises(WeightsError, match="block1_conv1: expected an HWIO kernel"):
        load_keras_h5(path)
