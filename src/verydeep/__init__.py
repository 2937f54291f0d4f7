"""verydeep: the VGG very deep convolutional networks (Simonyan & Zisserman, arXiv:1409.1556)
in modern Python, with Caffe's formats, preprocessing and evaluation protocols, without Caffe.

    import verydeep
    model = verydeep.load("vgg16")            # or a .caffemodel/.safetensors/.pth/.h5 path or URL
    logits = model(model.preprocess(images))  # Caffe input space: BGR, 0..255, mean pixel subtracted

This module is the public façade: the names in ``__all__`` are the supported API, each the
defining module's own object. They are imported on first use, so ``import verydeep`` (and the
command line's ``--help``) does not pay for torch. The packages behind them are described in
``docs/architecture.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verydeep.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from verydeep.configs import MEAN_BGR, TABLE_1, NetSpec
    from verydeep.data.preprocess import preprocess
    from verydeep.errors import VerydeepError
    from verydeep.extract.perceptual import PerceptualLoss
    from verydeep.hub.loader import load
    from verydeep.hub.registry import WeightsEntry, list_weights
    from verydeep.models.vgg import VGG, DenseVGG

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_DEFINED_IN: dict[str, str] = {
    "MEAN_BGR": "verydeep.configs",
    "TABLE_1": "verydeep.configs",
    "NetSpec": "verydeep.configs",
    "VerydeepError": "verydeep.errors",
    "preprocess": "verydeep.data.preprocess",
    "VGG": "verydeep.models.vgg",
    "DenseVGG": "verydeep.models.vgg",
    "load": "verydeep.hub.loader",
    "list_weights": "verydeep.hub.registry",
    "WeightsEntry": "verydeep.hub.registry",
    "PerceptualLoss": "verydeep.extract.perceptual",
}

__all__ = [
    "MEAN_BGR",
    "TABLE_1",
    "VGG",
    "DenseVGG",
    "NetSpec",
    "PerceptualLoss",
    "VerydeepError",
    "WeightsEntry",
    "list_weights",
    "load",
    "preprocess",
]


__getattr__ = lazy_attributes(__name__, _DEFINED_IN)


def __dir__() -> list[str]:
    return sorted([*globals(), *_DEFINED_IN])
