"""How a net's parameters start: the paper's three initialisations (Sec. 3.1).

* ``glorot``: Glorot & Bengio's uniform initialisation, biases zero (the paper's remark that it
  trains the deep nets without pre-training).
* ``normal``: weights from N(0, std^2), biases zero. The paper says "variance 10^-2" (std 0.1);
  Caffe-era train_val files used std 0.01 (``init_std``).
* from a trained shallower net: "the first four convolutional layers and the last three fully
  connected layers" of net A, the others random. Layers are matched by name, as Caffe copies
  them (A's conv1_1, conv2_1, conv3_1, conv3_2 exist with the same shapes in B..E).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from verydeep.core.tables import format_table
from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG

#: Weight initialisers by name; biases always start at zero.
SCHEMES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "glorot": lambda w, std: nn.init.xavier_uniform_(w),
    "normal": lambda w, std: nn.init.normal_(w, 0.0, std),
}


def param_layers(model: VGG) -> list[str]:
    """Names of the layers that hold parameters, in forward order (conv1_1 ... fc8)."""
    return [s.name for s in model.specs if s.kind in ("conv", "fc")]


def param_layer(model: VGG, name: str) -> nn.Conv2d | nn.Linear:
    """The conv or fc layer ``name`` of ``model`` (VGG registers its layers by Caffe name)."""
    layer = model.get_submodule(name)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise VerydeepError(f"layer {name}: holds no parameters in config {model.config}")
    return layer


def blobs(model: VGG, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Caffe's two blobs of parameter layer ``name``: (weight, bias)."""
    layer = param_layer(model, name)
    if layer.bias is None:  # pragma: no cover - every Table 1 layer has a bias
        raise VerydeepError(f"layer {name}: has no bias in config {model.config}")
    return layer.weight, layer.bias


def initialize(model: VGG, scheme: str = "glorot", *, std: float = 0.1, layers: list[str] | None = None) -> None:
    """Re-draw the parameters of ``layers`` (default: all) with ``scheme``; uses torch's RNG."""
    if scheme not in SCHEMES:
        raise VerydeepError(f"init: unknown scheme {scheme!r}; expected {', '.join(SCHEMES)} or a weights file")
    with torch.no_grad():
        for name in layers if layers is not None else param_layers(model):
            weight, bias = blobs(model, name)
            SCHEMES[scheme](weight, std)
            nn.init.zeros_(bias)


def default_transfer_layers(source: VGG) -> list[str]:
    """The paper's choice: the first four conv layers and the three fc layers of ``source``."""
    convs = [s.name for s in source.specs if s.kind == "conv"]
    return convs[:4] + ["fc6", "fc7", "fc8"]


@dataclass(frozen=True)
class InitRow:
    """What happened to one layer: copied from a file, or drawn at random."""

    layer: str
    shape: str
    origin: str  # "copied from <file>" | "random (<scheme>)"


def copy_layers(target: VGG, source: VGG, *, layers: list[str], origin: str) -> None:
    """Copy ``layers`` (weight and bias) from ``source``; a missing layer or a shape mismatch is an error."""
    have = set(param_layers(target))
    src = set(param_layers(source))
    with torch.no_grad():
        for name in layers:
            if name not in src:
                raise VerydeepError(f"{origin}: layer {name}: not in the source net (config {source.config})")
            if name not in have:
                raise VerydeepError(f"{origin}: layer {name}: not in the net being trained (config {target.config})")
            for kind, t, s in zip(("weight", "bias"), blobs(target, name), blobs(source, name)):
                if t.shape != s.shape:
                    raise VerydeepError(
                        f"{origin}: layer {name}: {kind} expected shape {_fmt(t.shape)}, found {_fmt(s.shape)}"
                        + (" (use --num-classes / init_layers to leave fc8 out)" if name == "fc8" else "")
                    )
                t.copy_(s.to(t.dtype))


def init_from(
    target: VGG,
    source: VGG,
    *,
    origin: str,
    layers: list[str] | None = None,
    scheme: str = "glorot",
    std: float = 0.1,
) -> list[InitRow]:
    """Initialise ``target`` from a trained shallower ``source``: ``layers`` (default: the
    paper's seven) copied, all others drawn with ``scheme``. Returns one row per layer."""
    layers = list(layers) if layers is not None else default_transfer_layers(source)
    initialize(target, scheme, std=std)
    copy_layers(target, source, layers=layers, origin=origin)
    return table_rows(target, {name: f"copied from {origin}" for name in layers}, default=f"random ({scheme})")


def table_rows(model: VGG, origins: dict[str, str], *, default: str) -> list[InitRow]:
    """One row per parameter layer: its origin from ``origins``, else ``default``."""
    return [
        InitRow(name, _fmt(param_layer(model, name).weight.shape), origins.get(name, default))
        for name in param_layers(model)
    ]


def format_rows(rows: list[InitRow]) -> str:
    """An aligned text table of ``rows`` (printed by ``verydeep train`` and saved in RUN_DIR)."""
    return format_table([[r.layer, r.shape, r.origin] for r in rows], ("layer", "weight", "initialised"))


def _fmt(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
