"""Weights: the registry of official models, the cache, and loading from any supported file.

``load("vgg16")`` downloads the official caffemodel once (resumable, size and md5 verified),
converts it to a safetensors file in the cache whose metadata records the configuration, the
input space, the class names and the source's sha256, and from then on maps that file.
Parameters are matched to the module by Caffe layer name with a shape check per tensor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from verydeep import configs
from verydeep.errors import WeightsError
from verydeep.hub.download import download, verify
from verydeep.models.vgg import IMAGENET, VGG

#: Metadata key that marks files written by verydeep.
FORMAT = "verydeep-weights-1"
LICENSE = (
    "VGG team, Oxford: CC BY 4.0 per the VGG site (robots.ox.ac.uk/~vgg/research/very_deep/); "
    "the model-zoo gist says CC BY-NC 4.0"
)


@dataclass(frozen=True)
class Entry:
    """An official model: where it lives and how to recognise the right file."""

    name: str
    config: str
    filename: str
    url: str
    size: int
    md5: str
    description: str


_VGG_SITE = "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/"
REGISTRY: dict[str, Entry] = {
    "vgg16": Entry(
        "vgg16",
        "D",
        "VGG_ILSVRC_16_layers.caffemodel",
        _VGG_SITE + "VGG_ILSVRC_16_layers.caffemodel",
        553_432_081,
        "441315b0ff6932dbfde97731be7ca852",
        "VGG-16 (config D), ILSVRC-2014, Caffe model zoo",
    ),
    "vgg19": Entry(
        "vgg19",
        "E",
        "VGG_ILSVRC_19_layers.caffemodel",
        _VGG_SITE + "VGG_ILSVRC_19_layers.caffemodel",
        574_671_192,
        "b5c644beabd7cf06bdd9065cfd674c97",
        "VGG-19 (config E), ILSVRC-2014, Caffe model zoo",
    ),
}


# -- the cache ---------------------------------------------------------------------------------
def home() -> Path:
    """``$VERYDEEP_HOME``, else ``$XDG_CACHE_HOME/verydeep``, else ``~/.cache/verydeep``."""
    if os.environ.get("VERYDEEP_HOME"):
        return Path(os.environ["VERYDEEP_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "verydeep"


def url_of(entry: Entry) -> str:
    """The download URL; ``$VERYDEEP_MIRROR`` (a base URL) replaces the VGG site."""
    mirror = os.environ.get("VERYDEEP_MIRROR")
    return f"{mirror.rstrip('/')}/{entry.filename}" if mirror else entry.url


def cached_path(name: str) -> Path:
    return home() / f"{name}.safetensors"


def download_path(name: str) -> Path:
    return home() / "downloads" / REGISTRY[name].filename


def fetch(name: str, progress: bool = True) -> Path:
    """Make sure the registry model ``name`` is in the cache as safetensors; return its path."""
    entry = _entry(name)
    target = cached_path(name)
    if target.exists():
        return target
    source = download_path(name)
    try:
        if source.exists():  # put there by hand (offline machines): verify, no network needed
            sha256 = verify(source, size=entry.size, md5=entry.md5)
        else:
            sha256 = download(url_of(entry), source, size=entry.size, md5=entry.md5, progress=progress)
    except WeightsError as e:
        raise WeightsError(
            f"{e}. Without network: download {entry.url} ({entry.size:,} bytes, md5 {entry.md5}) "
            f"and pass --weights /path/to/{entry.filename}, or put it at {source}"
        ) from None
    model = load_caffemodel(source)
    save_safetensors(model, target, source=entry.url, source_sha256=sha256, license=LICENSE)
    source.unlink()  # the safetensors file holds the same arrays; keep one copy
    return target


def _entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise WeightsError(f"unknown weights {name!r}; registry names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# -- loading -------------------------------------------------------------------------------
def load(
    source: str | os.PathLike,
    prototxt: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> nn.Module:
    """A model in eval mode from a registry name, a local file, or a URL.

    Files: ``.caffemodel`` (with ``prototxt`` for nets that are not a Table 1 VGG),
    ``.safetensors`` (verydeep's or a plain state dict in Caffe names), torchvision ``.pth``,
    Keras ``.h5``.
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


def load_file(path: Path, prototxt: str | os.PathLike | None = None) -> nn.Module:
    if not path.exists():
        raise WeightsError(f"{path}: no such file (registry names: {', '.join(REGISTRY)})")
    suffix = path.suffix.lower()
    if suffix == ".caffemodel" or prototxt is not None:
        return load_caffemodel(path, prototxt)
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix in (".pth", ".pt"):
        from verydeep.formats.importers import load_torchvision

        return load_torchvision(path)
    if suffix in (".h5", ".hdf5", ".keras"):
        from verydeep.formats.importers import load_keras

        return load_keras(path)
    raise WeightsError(
        f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
        "expected .caffemodel, .safetensors, .pth/.pt (torchvision) or .h5 (Keras)"
    )


def vgg_spec_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """Recognise a Table 1 VGG from parameter shapes in Caffe names.

    Conv kernels must match exactly; fc weights may be 2-D or Caffe V1's 4-D 1x1xOUTxIN.
    """
    if "conv1_1.weight" not in shapes or "fc8.bias" not in shapes:
        return None
    width = shapes["conv1_1.weight"][0] / configs.STAGE_CHANNELS[0]
    num_classes = int(np.prod(shapes["fc8.bias"]))
    for config in configs.TABLE_1:
        expected = configs.param_shapes(config, width, num_classes)
        if set(expected) == set(shapes) and all(_fits(shapes[k], s) for k, s in expected.items()):
            return {"config": config, "width": width, "num_classes": num_classes}
    return None


def _fits(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Same shape, or the same once Caffe's leading 1-dims of legacy 4-D blobs are dropped."""
    return tuple(found) == tuple(expected) or tuple(d for d in found if d != 1) == tuple(d for d in expected if d != 1)


def state_from_arrays(
    arrays: dict[str, np.ndarray | torch.Tensor], model: nn.Module, origin: str
) -> dict[str, torch.Tensor]:
    """Match ``arrays`` to ``model``'s parameters by name; reshape legacy 4-D fc blobs.

    Errors name the file, the layer, and the expected and found shapes.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        layer, kind = key.rsplit(".", 1)
        if key not in arrays:
            raise WeightsError(f"{origin}: layer {layer}: missing {kind} (expected shape {_fmt(shape)})")
        value = arrays[key]
        found = tuple(value.shape)
        if not _fits(found, shape):
            raise WeightsError(f"{origin}: layer {layer}: {kind} expected shape {_fmt(shape)}, found {_fmt(found)}")
        tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        state[key] = tensor.reshape(shape).to(torch.float32)
    extra = sorted({k.rsplit(".", 1)[0] for k in arrays} - {k.rsplit(".", 1)[0] for k in expected})
    if extra:
        raise WeightsError(f"{origin}: layer {extra[0]}: has weights but no such layer in the net")
    return state


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def build_vgg(spec: dict[str, Any], state: dict[str, torch.Tensor] | None = None, **kw: Any) -> VGG:
    """A VGG for ``spec`` whose parameters are ``state`` (no random init is paid for)."""
    with torch.device("meta"):
        model = VGG(spec["config"], spec["num_classes"], spec.get("width", 1.0), lrn_k=spec.get("lrn_k", 1.0), **kw)
    if state is not None:
        model.load_state_dict(state, strict=True, assign=True)
    return model


def _default_names(num_classes: int) -> str | None:
    """ImageNet's names (resolved when first used) for a 1000-class net, else none."""
    return IMAGENET if num_classes == 1000 else None


def caffe_arrays(blobs: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Caffe's per-layer blob lists -> ``<layer>.weight`` / ``<layer>.bias`` arrays."""
    out: dict[str, np.ndarray] = {}
    for layer, arrays in blobs.items():
        for kind, array in zip(("weight", "bias"), arrays):
            out[f"{layer}.{kind}"] = array
    return out


def load_caffemodel(path: str | os.PathLike, prototxt: str | os.PathLike | None = None) -> nn.Module:
    """A caffemodel (V1 or V2) as a VGG when the net is a Table 1 VGG, else as a CaffeGraph."""
    from verydeep.formats.caffe import CaffeGraph, read_caffemodel, read_prototxt, vgg_spec

    path = Path(path)
    cm = read_caffemodel(path)
    net = read_prototxt(prototxt) if prototxt is not None else None
    arrays = caffe_arrays(cm.blobs)
    origin = f"{path}" + (f" (with {prototxt})" if prototxt is not None else "")
    spec = vgg_spec(net) if net is not None else (vgg_spec(cm.net) if cm.net.layer else None)
    if spec is None and net is None:
        spec = vgg_spec_from_shapes({k: tuple(v.shape) for k, v in arrays.items()})
    if spec is not None:
        spec.setdefault("num_classes", 1000)
        model = build_vgg(spec, class_names=_default_names(spec["num_classes"]))
        model.load_state_dict(state_from_arrays(arrays, model, origin), strict=True, assign=True)
        return model
    graph_net = net if net is not None else cm.net
    if not graph_net.layer:
        raise WeightsError(
            f"{path}: not a known VGG and the file holds no net definition; pass --prototxt deploy.prototxt"
        )
    graph = CaffeGraph(graph_net, source=str(prototxt or path))
    graph.load_blobs(cm.blobs, origin=origin)
    return graph


def save_safetensors(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model``'s parameters and what is needed to rebuild it; atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, str] = {"format": FORMAT}
    if isinstance(model, VGG):
        for key, value in model.meta().items():
            meta[key] = json.dumps(value)
    else:
        graph_meta = getattr(model, "meta", None)
        if graph_meta is None:
            raise WeightsError(f"{path}: cannot save a {type(model).__name__}: not a verydeep model")
        meta.update({k: json.dumps(v) for k, v in graph_meta().items()})
    meta.update({k: json.dumps(v) for k, v in metadata.items() if v is not None})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a safetensors file (values JSON-decoded where verydeep wrote them)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        return dict(raw)
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_safetensors(path: str | os.PathLike) -> nn.Module:
    """Map a safetensors file onto a VGG (or a CaffeGraph when it was saved from one)."""
    from safetensors.torch import load_file as st_load

    path = Path(path)
    meta = read_metadata(path)
    state = st_load(str(path))
    if meta.get("kind") == "caffe-graph":
        from verydeep.formats.caffe import CaffeGraph

        return CaffeGraph.from_saved(meta, state, source=str(path))
    if "config" in meta:
        spec = {k: meta[k] for k in ("config", "num_classes", "width", "lrn_k") if k in meta}
        names = meta.get("class_names")
    else:
        spec = vgg_spec_from_shapes({k: tuple(v.shape) for k, v in state.items()})
        if spec is None:
            raise WeightsError(
                f"{path}: parameters do not form a Table 1 VGG in Caffe names (conv1_1.weight ... fc8.bias)"
            )
        names = _default_names(spec["num_classes"])
    model = build_vgg(spec, class_names=names)
    model.load_state_dict(state_from_arrays(state, model, str(path)), strict=True, assign=True)
    return model


def describe_registry() -> list[dict[str, Any]]:
    """One row per registry entry, with whether it is in the cache."""
    rows = []
    for e in REGISTRY.values():
        rows.append(
            {
                "name": e.name,
                "config": e.config,
                "description": e.description,
                "cached": cached_path(e.name).exists(),
                "path": str(cached_path(e.name)),
                "url": url_of(e),
                "size": e.size,
                "md5": e.md5,
            }
        )
    return rows
