"""The VGG module against independent references: Table 1 counts, a float64 re-computation,
torchvision's VGG, Caffe's round-up pooling, the dense view and feature taps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_vgg

from verydeep import VGG, configs

# Parameter counts of the paper's Table 2 (in millions), for the full-width nets.
PAPER_TABLE_2 = {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}


@pytest.mark.parametrize("config", list(configs.TABLE_1))
def test_parameter_counts_match_table_2(config):
    with torch.device("meta"):
        model = VGG(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == configs.num_params(config)
    assert round(n / 1e6) == PAPER_TABLE_2[config]


def test_vgg16_exact_count_and_cost():
    assert configs.num_params("D") == 138_357_544
    assert configs.multiply_adds("D") / 1e9 == pytest.approx(15.47, abs=0.01)


def test_layer_names_are_caffes():
    model = VGG("D", width=1 / 16)
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["conv1_1.weight", "conv1_1.bias", "conv1_2.weight", "conv1_2.bias"]
    assert names[-2:] == ["fc8.weight", "fc8.bias"]
    assert "conv5_3.weight" in names and "conv5_4.weight" not in names
    assert "conv5_4.weight" in [n for n, _ in VGG("E", width=1 / 16).named_parameters()]
    c = VGG("C", width=1 / 16)
    assert c.conv3_3.kernel_size == (1, 1) and c.conv3_2.kernel_size == (3, 3)


def reference_forward_float64(model: VGG, x: torch.Tensor) -> torch.Tensor:
    """Caffe's net written out layer by layer in float64 from the spec table, with explicit
    round-up pooling and Caffe's LRN formula (independent of the module's code paths)."""
    x = x.double()
    for spec in model.specs:
        layer = getattr(model, spec.name)
        if spec.kind == "conv":
            x = F.conv2d(x, layer.weight.double(), layer.bias.double(), padding=spec.kernel // 2)
        elif spec.kind == "relu":
            x = x.clamp(min=0)
        elif spec.kind == "lrn":
            n, alpha, beta, k = 5, 1e-4, 0.75, model.lrn_k
            sq = F.pad(x.pow(2), (0, 0, 0, 0, n // 2, n // 2))
            window = sum(sq[:, i : i + x.shape[1]] for i in range(n))
            x = x / (k + alpha / n * window).pow(beta)
        elif spec.kind == "pool":
            h, w = x.shape[2:]
            oh, ow = math.ceil((h - 2) / 2) + 1, math.ceil((w - 2) / 2) + 1
            x = F.pad(x, (0, 2 * ow - w, 0, 2 * oh - h), value=-math.inf)
            x = F.max_pool2d(x, 2, 2)
        elif spec.kind == "fc":
            x = x.reshape(x.shape[0], -1) @ layer.weight.double().T + layer.bias.double()
    return x


@pytest.mark.parametrize("config", ["A-LRN", "C", "E"])
def test_forward_matches_float64_reference(config):
    model = random_vgg(config, lrn_k=2.0)
    x = torch.randn(2, 3, 224, 224) * 50
    with torch.no_grad():
        got = model(x).double()
        ref = reference_forward_float64(model, x)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_matches_torchvision_vgg16_at_224():
    torchvision = pytest.importorskip("torchvision")
    model = random_vgg("D", num_classes=1000, width=1.0)
    tv = torchvision.models.vgg16(weights=None).eval()
    convs = [n for n, _ in model.named_children() if n.startswith("conv")]
    tv_convs = [m for m in tv.features if isinstance(m, torch.nn.Conv2d)]
    tv_fcs = [m for m in tv.classifier if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for name, m in zip(convs, tv_convs):
            m.weight.copy_(getattr(model, name).weight)
            m.bias.copy_(getattr(model, name).bias)
        for name, m in zip(["fc6", "fc7", "fc8"], tv_fcs):
            m.weight.copy_(getattr(model, name).weight)
            m.bias.copy_(getattr(model, name).bias)
        x = torch.randn(1, 3, 224, 224) * 50
        a, b = model(x), tv(x)
    assert (a - b).abs().max() / b.abs().max() < 1e-5


def test_pooling_rounds_up_like_caffe():
    model = random_vgg("A")
    dense = model.dense()
    with torch.no_grad():
        out = dense(torch.randn(1, 3, 300, 419))
    # 300 -> 150 -> 75 -> 38 -> 19 -> 10 (ceil); 10 - 7 + 1 = 4. 419 -> 210 -> 105 -> 53 -> 27 -> 14 -> 8.
    assert out.shape == (1, 10, 4, 8)


def test_dense_equals_classic_at_224_and_shares_parameters():
    model = random_vgg("D")
    x = torch.randn(3, 3, 224, 224) * 50
    dense = model.dense()
    assert len(list(dense.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        a = model(x)
        b = dense(x)
        assert b.shape == (3, 10, 1, 1)
        assert torch.allclose(a, b[:, :, 0, 0], rtol=1e-5, atol=1e-5 * a.abs().max().item())
        model.fc8.bias.add_(1.0)  # the view follows the module's parameters
        assert torch.allclose(model(x), dense(x)[:, :, 0, 0], atol=1e-4)


def test_classic_rejects_other_sizes_with_a_clear_error():
    from verydeep.errors import VerydeepError

    with pytest.raises(VerydeepError, match="fc6 expects pool5.*model.dense"):
        random_vgg()(torch.randn(1, 3, 256, 256))


def test_features_taps_and_early_stop():
    model = random_vgg("D")
    x = torch.randn(2, 3, 224, 224) * 50
    with torch.no_grad():
        feats = model.features(x, taps=["conv1_1", "relu1_1", "pool5", "fc7", "prob"])
        logits = model(x)
    assert torch.equal(feats["relu1_1"], feats["conv1_1"].clamp(min=0))
    assert feats["conv1_1"].min() < 0  # the tap before ReLU was not overwritten in place
    assert feats["pool5"].shape == (2, 4 * 8, 7, 7)  # 512 / 16 channels
    assert torch.allclose(feats["prob"], torch.softmax(logits, 1), atol=1e-6)
    # Stops after the last tap: fc6 is never called when only conv taps are requested.
    called = []
    model.fc6.register_forward_hook(lambda *a: called.append(1))
    model.features(x, taps=["relu4_3"])
    assert not called
    with pytest.raises(Exception, match="unknown layer 'conv6_1'"):
        model.features(x, taps=["conv6_1"])
