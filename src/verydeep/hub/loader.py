"""``verydeep.load``: a model from a registry name, a local file of any supported format, or a URL."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from verydeep.core.paths import home
from verydeep.errors import WeightsError
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.formats.caffe.load import load_caffemodel
from verydeep.formats.safetensors import load_safetensors
from verydeep.hub.cache import fetch
from verydeep.hub.download import download
from verydeep.hub.registry import REGISTRY
from verydeep.models.vgg import VGG


def _load_torchvision(path: Path) -> VGG | CaffeGraph:
    from verydeep.formats.torchvision import load_torchvision

    return load_torchvision(path)


def _load_keras(path: Path) -> VGG | CaffeGraph:
    from verydeep.formats.keras import load_keras  # needs h5py, an optional dependency

    return load_keras(path)


#: File suffix -> reader (the prototxt-less readers; a caffemodel may come with a prototxt).
READERS: dict[str, Callable[[Path], VGG | CaffeGraph]] = {
    ".caffemodel": load_caffemodel,
    ".safetensors": load_safetensors,
    ".pth": _load_torchvision,
    ".pt": _load_torchvision,
    ".h5": _load_keras,
    ".hdf5": _load_keras,
    ".keras": _load_keras,
}


def load(
    source: str | os.PathLike[str],
    prototxt: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> VGG | CaffeGraph:
    """A model in eval mode from a registry name, a local file, or a URL.

    Registry names (``vgg16``, ``vgg19``) are downloaded once into the cache. Files:
    ``.caffemodel`` (with ``prototxt`` for nets that are not a Table 1 VGG), ``.safetensors``
    (verydeep's or a plain state dict in Caffe names), torchvision ``.pth``, Keras ``.h5``.
    Table 1 nets come back as :class:`~verydeep.models.vgg.VGG`, other Caffe nets as
    :class:`~verydeep.formats.caffe.graph.CaffeGraph`; both take Caffe-space input.
    """
    text = str(source)
    if text in REGISTRY:
        model = load_safetensors(fetch(text, progress=progress))
    elif re.match(r"^(https?|ftp)://", text):
        name = text.rstrip("/").rsplit("/", 1)[-1] or "weights"
        local = home() / "urls" / name
        if not local.exists():
            download(text, local, progress=progress)
        model = load_file(local, prototxt)
    else:
        model = load_file(Path(text), prototxt)
    model.eval()
    return model.to(device) if device is not None else model


def load_file(path: Path, prototxt: str | os.PathLike[str] | None = None) -> VGG | CaffeGraph:
    """A local weights file, read by the reader its suffix names (:data:`READERS`)."""
    if not path.exists():
        raise WeightsError(f"{path}: no such file (registry names: {', '.join(REGISTRY)})")
    suffix = path.suffix.lower()
    if prototxt is not None:
        return load_caffemodel(path, prototxt)
    reader = READERS.get(suffix)
    if reader is None:
        raise WeightsError(
            f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
            "expected .caffemodel, .safetensors, .pth/.pt (torchvision) or .h5 (Keras)"
        )
    return reader(path)
