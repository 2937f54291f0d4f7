"""verydeep: the VGG very deep convolutional networks (Simonyan & Zisserman, arXiv:1409.1556)
in modern Python, with Caffe's formats, preprocessing and evaluation protocols, without Caffe.

    import verydeep
    model = verydeep.load("vgg16")            # or a .caffemodel/.safetensors/.pth/.h5 path or URL
    logits = model(model.preprocess(images))  # Caffe input space: BGR, 0..255, mean pixel subtracted
"""

from __future__ import annotations

from typing import Any

from verydeep.configs import MEAN_BGR, TABLE_1
from verydeep.data.preprocess import preprocess  # imports torchvision only when first used
from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG, DenseVGG

__version__ = "0.1.0"

__all__ = ["VGG", "DenseVGG", "TABLE_1", "MEAN_BGR", "VerydeepError", "load", "preprocess", "PerceptualLoss"]


def load(source: str, prototxt: str | None = None, **kwargs: Any):
    """Load weights by registry name (``vgg16``, ``vgg19``), local path or URL; see :mod:`verydeep.hub.weights`."""
    from verydeep.hub.weights import load as _load

    return _load(source, prototxt=prototxt, **kwargs)


def __getattr__(name: str) -> Any:  # lazy: `import verydeep` stays fast (torchvision is imported on use)
    if name == "PerceptualLoss":
        from verydeep.models.perceptual import PerceptualLoss

        return PerceptualLoss
    raise AttributeError(f"module 'verydeep' has no attribute {name!r}")
