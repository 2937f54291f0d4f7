"""``verydeep.load``: a model from a registry name, a local file of any supported format, or a URL."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from verydeep.errors import WeightsError
from verydeep.formats.caffe.graph import CaffeGraph
from verydeep.formats.caffe.load import load_caffemodel
from verydeep.formats.safetensors import load_safetensors
from verydeep.hub.cache import fetch, fetch_url
from verydeep.hub.download import is_url
from verydeep.hub.registry import REGISTRY
from verydeep.models.build import error_reason
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
    elif is_url(text):  # cached under a key of the whole URL, locked and re-verified (hub.cache)
        model = load_file(fetch_url(text, progress=progress), prototxt)
    else:
        model = load_file(Path(text), prototxt)
    model.eval()
    return model.to(device) if device is not None else model


def load_file(path: Path, prototxt: str | os.PathLike[str] | None = None) -> VGG | CaffeGraph:
    """A local weights file, read by the reader its suffix names (:data:`READERS`).

    Only a regular file is handed to a reader: a directory fails inside each library in its own
    words, and a FIFO or device would block the reader's open() or never end.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file (registry names: {', '.join(REGISTRY)})") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        reason = e.strerror if isinstance(e, OSError) and e.strerror else error_reason(e)
        raise WeightsError(f"{path}: cannot open the file ({reason})") from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise WeightsError(f"{path}: {what}; expected a weights file")
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
