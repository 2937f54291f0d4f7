"""verydeep: the VGG very deep convolutional networks (Simonyan & Zisserman, arXiv:1409.1556)
in modern Python, with Caffe's formats, preprocessing and evaluation protocols, without Caffe.

    import verydeep
    model = verydeep.load("vgg16")            # or a .caffemodel/.safetensors/.pth/.h5 path or URL
    logits = model(model.preprocess(images))  # Caffe input space: BGR, 0..255, mean pixel subtracted

This module is the public façade: the names below are the supported API. The packages behind
it are described in ``docs/architecture.md``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from verydeep.configs import MEAN_BGR, TABLE_1, NetSpec
from verydeep.data.preprocess import preprocess  # imports torchvision only when first used
from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG, DenseVGG

if TYPE_CHECKING:
    import torch
    from torch import nn

    from verydeep.hub.registry import WeightsEntry

__version__ = "0.1.0"

__all__ = [
    "MEAN_BGR",
    "TABLE_1",
    "VGG",
    "DenseVGG",
    "NetSpec",
    "PerceptualLoss",
    "VerydeepError",
    "list_weights",
    "load",
    "preprocess",
]


def load(
    source: str | os.PathLike[str],
    prototxt: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> nn.Module:
    """A model in eval mode from a registry name (``vgg16``, ``vgg19``), a local file
    (``.caffemodel`` [+ ``prototxt``], ``.safetensors``, torchvision ``.pth``, Keras ``.h5``) or a URL.

    Table 1 nets come back as :class:`VGG`, other Caffe deploy nets as a ``CaffeGraph``; both
    take Caffe-space input. The weights machinery is imported on the first call, so that
    ``import verydeep`` stays quick.
    """
    from verydeep.hub.loader import load as hub_load

    return hub_load(source, prototxt, device=device, progress=progress)


def list_weights() -> list[WeightsEntry]:
    """The official models ``load`` knows by name, with their files, nets, licence and paper results."""
    from verydeep.hub.registry import list_weights as registry_list

    return registry_list()


def __getattr__(name: str) -> Any:  # PerceptualLoss is imported on first use
    if name == "PerceptualLoss":
        from verydeep.extract.perceptual import PerceptualLoss

        return PerceptualLoss
    raise AttributeError(f"module 'verydeep' has no attribute {name!r}")
