"""The nets a benchmark runs: a randomly initialised VGG, torchvision's twin of it, their FLOPs.

Speed does not depend on weight values, so by default the net is random; He initialisation
keeps the activations' scale through the depth as in a trained net, so no layer sees only zeros
or overflows in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from verydeep import configs
from verydeep.formats.torchvision import TORCHVISION_ARCH, torchvision_model, torchvision_names
from verydeep.models.vgg import VGG


def random_model(arch: str = "D", width: float = 1.0, num_classes: int = 1000, seed: int = 0) -> VGG:
    """A VGG with He-initialised weights (activations keep their scale through the depth, as in
    a trained net) and small random biases."""
    torch.manual_seed(seed)
    model = VGG(arch, num_classes=num_classes, width=width)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight"):
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            else:
                p.normal_(0.0, 0.01)
    return model.eval()


def torchvision_twin(model: VGG) -> nn.Module | None:
    """torchvision's ``VGG`` module for the same config and width, holding ``model``'s own weight
    tensors (no copy), on their device; None for configs torchvision lacks (A-LRN, C) or without
    torchvision. Its input is Caffe's, like ``model``'s: at 224x224 it computes the same function."""
    if model.config not in TORCHVISION_ARCH:
        return None
    try:
        net = torchvision_model(model.config, model.width, model.num_classes, empty=True)
    except ImportError:
        return None
    names = torchvision_names(model.config, model.width, model.num_classes)
    net.load_state_dict({names[k]: v for k, v in model.state_dict().items()}, strict=True, assign=True)
    return net.eval()


def dense_flops(config: str, height: int, width_px: int, width: float = 1.0, num_classes: int = 1000) -> int:
    """FLOPs (2 x multiply-adds) of the dense net on one height x width image: the convolutions
    at that size, then fc6 as a 7x7 and fc7/fc8 as 1x1 convolutions at every window position."""
    total, h, w = 0, height, width_px
    specs = configs.layer_specs(config, width, num_classes)
    for spec in specs:
        if spec.kind == "conv":
            total += h * w * spec.out_channels * spec.in_channels * spec.kernel * spec.kernel
        elif spec.kind == "pool":
            h, w = -(-(h - 2) // 2) + 1, -(-(w - 2) // 2) + 1  # Caffe rounds up
    positions = max(0, h - configs.POOL5_SIZE + 1) * max(0, w - configs.POOL5_SIZE + 1)
    total += positions * sum(spec.in_channels * spec.out_channels for spec in specs if spec.kind == "fc")
    return 2 * total
