"""How a net's parameters start: the paper's three initialisations (Sec. 3.1), and a default
that keeps the signal of Caffe-space input under control at every depth and width.

* ``balanced`` (the default): He et al.'s N(0, 2/fan_in), which keeps the RMS of ReLU
  activations constant from layer to layer whatever the width, times one gain ``g`` shared by
  all L parameter layers. Caffe-space pixels (BGR 0..255 minus the mean) have an RMS of about
  :data:`INPUT_RMS`, not 1, and the net is positively homogeneous, so the logits come out at
  about INPUT_RMS x g^L; g = (:data:`TARGET_LOGIT_RMS` / INPUT_RMS)^(1/L) puts them near 0.5
  for A..E alike (0.36..1.2 measured at widths 1 and 1/8; the first loss is near ln(C)).
  Sharing the correction evenly, rather than shrinking conv1_1 alone, keeps SGD's relative
  step ||dW|| / ||W|| within a few times of the same value in every layer: plain He weights
  with conv1_1 divided by INPUT_RMS give conv1_1 a step thousands of times larger than the
  median layer's (docs/training.md has both measurements).
* ``glorot``: Glorot & Bengio's uniform initialisation, biases zero (the paper's remark that it
  trains the deep nets without pre-training). Its variance 2/(fan_in + fan_out) halves the
  signal's second moment at every ReLU layer: at full width the logits of E start 17 times
  smaller than those of A, and its steps about 30 times smaller.
* ``normal``: weights from N(0, std^2), biases zero; ``init_std`` 0.01 is the filler of
  Caffe-era VGG train_val files (the signal vanishes: logits 6e-4 for A, 2e-7 for E at full
  width). The paper's "variance 10^-2" (std 0.1) multiplies the RMS by up to 5 per layer at
  full width: logits of 6e7 (A) to 2e12 (E), and training blows up at once.
* from a trained shallower net: "the first four convolutional layers and the last three fully
  connected layers" of net A, the others random. Layers are matched by name, as Caffe copies
  them (A's conv1_1, conv2_1, conv3_1, conv3_2 exist with the same shapes in B..E).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from verydeep.core.tables import format_table
from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG

#: The RMS of Caffe-space pixels: ImageNet's RGB standard deviations (0.229, 0.224, 0.225) on
#: the 0..255 scale; the mean pixel is subtracted, so this is also their root mean square.
INPUT_RMS = 0.226 * 255
#: The RMS of the first logits ``balanced`` aims at: small enough that the first loss is near
#: ln(C), large enough that the first steps are not tiny (SGD's steps scale with it).
TARGET_LOGIT_RMS = 0.5


def balanced_gain(layers: int) -> float:
    """The gain every layer of ``balanced`` shares: INPUT_RMS x gain^layers = TARGET_LOGIT_RMS."""
    return (TARGET_LOGIT_RMS / INPUT_RMS) ** (1.0 / layers)


def _balanced(w: torch.Tensor, std: float, index: int, layers: int) -> torch.Tensor:
    # conv1_1's input is not a ReLU's output: its second moment is not halved, so variance 1/fan_in.
    relu = 1.0 if index == 0 else 2.0
    return nn.init.normal_(w, 0.0, balanced_gain(layers) * math.sqrt(relu / w[0].numel()))


#: Weight initialisers by name, called with (weight, init_std, the layer's index, the number of
#: parameter layers); biases always start at zero.
SCHEMES: dict[str, Callable[[torch.Tensor, float, int, int], torch.Tensor]] = {
    "balanced": _balanced,
    "glorot": lambda w, std, index, layers: nn.init.xavier_uniform_(w),
    "normal": lambda w, std, index, layers: nn.init.normal_(w, 0.0, std),
}
#: The scheme ``verydeep train`` draws new layers with unless told otherwise.
DEFAULT_SCHEME = "balanced"


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


def initialize(model: VGG, scheme: str = DEFAULT_SCHEME, *, std: float = 0.01, layers: list[str] | None = None) -> None:
    """Re-draw the parameters of ``layers`` (default: all) with ``scheme``; uses torch's RNG."""
    if scheme not in SCHEMES:
        raise VerydeepError(f"init: unknown scheme {scheme!r}; expected {', '.join(SCHEMES)} or a weights file")
    order = param_layers(model)
    with torch.no_grad():
        for name in layers if layers is not None else order:
            weight, bias = blobs(model, name)
            SCHEMES[scheme](weight, std, order.index(name), len(order))
            nn.init.zeros_(bias)


def activation_scales(model: VGG, x: torch.Tensor) -> dict[str, float]:
    """The RMS of each conv/fc layer's output (before its ReLU) for the Caffe-space batch ``x``,
    in eval mode (no dropout): how an initialisation scales the signal layer by layer."""
    names = param_layers(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outs = model.features(x, taps=names)
    model.train(was_training)
    return {name: float(out.double().pow(2).mean().sqrt()) for name, out in outs.items()}


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
    scheme: str = DEFAULT_SCHEME,
    std: float = 0.01,
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
