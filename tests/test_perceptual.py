"""PerceptualLoss against a float64 re-computation written out here (RGB [0,1] -> Caffe space
by hand, Gram matrices in numpy), plus its user-facing guarantees: zero for identical images,
gradients reach the input and never the loss network, and 0..255 input is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import random_vgg

import verydeep
from verydeep import VerydeepError

MEAN_BGR = np.array([103.939, 116.779, 123.68])  # the seed's mean pixel, written out again on purpose


def rgb01(n: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def caffe_by_hand(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> BGR, 0..255, mean pixel subtracted (float64)."""
    x = images.double().numpy()[:, ::-1] * 255.0 - MEAN_BGR.reshape(1, 3, 1, 1)
    return torch.from_numpy(x.copy())


def gram64(f: np.ndarray) -> np.ndarray:
    n, c, h, w = f.shape
    m = f.reshape(n, c, h * w)
    return np.einsum("nik,njk->nij", m, m) / (c * h * w)


@pytest.fixture
def net():
    return random_vgg("D", width=1 / 16)


def test_loss_is_zero_for_identical_images(net):
    loss = verydeep.PerceptualLoss(net, style_weight=10.0)
    x = rgb01()
    assert loss(x, x.clone()).item() == 0.0
    assert loss(x, x.clone(), style=x.clone()).item() == 0.0
    assert loss(x, rgb01(seed=1)).item() > 0  # and not zero for different ones


def test_matches_a_float64_computation_by_hand(net):
    taps = ["relu1_1", "relu2_1", "relu3_3"]
    fw, sw = 0.5, 3.0
    loss_fn = verydeep.PerceptualLoss(
        net, taps=taps, feature_weight=fw, style_weight=sw, layer_weights={"relu2_1": 2.0}
    )
    x, y, s = rgb01(seed=0), rgb01(seed=1), rgb01(1, 56, 40, seed=2)  # style: other size, one image
    found = loss_fn(x, y, style=s).item()

    m64 = copy.deepcopy(net).double()
    fx, fy, fs = (m64.features(caffe_by_hand(t), taps) for t in (x, y, s))
    expected = 0.0
    for t in taps:
        w = {"relu2_1": 2.0}.get(t, 1.0)
        a, b, c = fx[t].numpy(), fy[t].numpy(), fs[t].numpy()
        expected += fw * w * np.mean((a - b) ** 2)
        expected += sw * w * np.mean(np.sum((gram64(a) - gram64(c)) ** 2, axis=(1, 2)))
    assert found == pytest.approx(expected, rel=1e-4)  # float32 features vs float64


def test_gradients_reach_the_input_not_the_network(net):
    loss_fn = verydeep.PerceptualLoss(net, style_weight=5.0)
    x = rgb01().requires_grad_(True)
    loss_fn(x, rgb01(seed=1)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_gradient_is_the_derivative_of_the_loss(net):
    """Directional finite difference in float64 against autograd's gradient."""
    loss_fn = verydeep.PerceptualLoss(copy.deepcopy(net).double(), taps=["relu1_2", "relu2_2"], style_weight=2.0)
    x = rgb01(1, 32, 32).double().requires_grad_(True)
    y = rgb01(1, 32, 32, seed=3).double()
    loss_fn(x, y).backward()
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        numeric = (loss_fn(x + eps * d, y) - loss_fn(x - eps * d, y)) / (2 * eps)
    assert float((x.grad * d).sum()) == pytest.approx(float(numeric), rel=1e-5)


def test_255_scale_input_is_refused_with_a_hint(net):
    loss_fn = verydeep.PerceptualLoss(net)
    with pytest.raises(VerydeepError, match=r"expected RGB in \[0, 1\].*images / 255"):
        loss_fn(rgb01() * 255, rgb01())


def test_unknown_tap_and_size_mismatch_are_named(net):
    with pytest.raises(VerydeepError, match="unknown tap 'relu9_9'"):
        verydeep.PerceptualLoss(net, taps=["relu9_9"])
    with pytest.raises(VerydeepError, match="same size"):
        verydeep.PerceptualLoss(net)(rgb01(1, 32, 32), rgb01(1, 40, 40))


def test_loss_network_stays_in_eval_mode(net):
    loss_fn = verydeep.PerceptualLoss(net, taps=["relu1_1"]).train()
    assert not loss_fn.model.training
