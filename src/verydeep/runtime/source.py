"""Reading the model the runtime executes, typed: its Table 1 layers and their tensors.

The runtime sits below :mod:`verydeep.models` in the package order, so it reads a verydeep VGG
through :class:`SourceNet` (the attributes it exposes) instead of importing the class, and
fetches layers through :func:`child`, which checks their type.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, cast

import torch
from torch import nn

from verydeep.configs import LayerSpec
from verydeep.errors import VerydeepError


class SourceNet(Protocol):
    """What the runtime reads from a verydeep VGG (:class:`verydeep.models.vgg.VGG`)."""

    config: str
    num_classes: int
    width: float
    specs: list[LayerSpec]
    layer_names: list[str]

    @property
    def fc6_input(self) -> tuple[int, int, int]: ...


def as_source(model: nn.Module) -> SourceNet:
    """``model`` as a :class:`SourceNet`; a module without Table 1 layers is refused."""
    if not hasattr(model, "specs") or not hasattr(model, "fc6_input"):
        raise VerydeepError(f"optimize() needs a verydeep VGG, found {type(model).__name__}")
    return cast(SourceNet, model)


_M = TypeVar("_M", bound=nn.Module)


def child(model: nn.Module, name: str, kind: type[_M]) -> _M:
    """The submodule ``name`` of ``model``, which must be a ``kind``."""
    layer = model.get_submodule(name)
    if not isinstance(layer, kind):
        raise VerydeepError(f"layer {name}: expected {kind.__name__}, found {type(layer).__name__}")
    return layer


def conv_padding(conv: nn.Conv2d) -> int:
    """The symmetric padding of a VGG convolution (Caffe's ``pad``)."""
    pad = conv.padding
    if isinstance(pad, str):
        raise VerydeepError(f"expected a numeric conv padding, found {pad!r}")
    return int(pad[0])


def bias_of(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The layer's bias, detached; every VGG layer has one."""
    if layer.bias is None:
        raise VerydeepError(f"{type(layer).__name__} without a bias: not a VGG layer")
    return layer.bias.detach()
