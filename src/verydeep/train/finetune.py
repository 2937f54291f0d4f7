"""Fine-tuning: a new fc8 for the user's classes, frozen layers, and Caffe's per-layer lr_mult.

Caffe users hit "shape mismatch" because fc8 of a 1000-class model cannot be copied into a
net with N outputs; the fix was renaming the layer by hand. Here the mismatch is the signal:
fc8 is replaced by a freshly initialised N-way layer (and the replacement is reported), every
other layer is copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG
from verydeep.train.initialization import DEFAULT_SCHEME, copy_layers, initialize, param_layer, param_layers


def fine_tune_model(
    source: torch.nn.Module,
    class_names: Sequence[str],
    *,
    origin: str,
    scheme: str = DEFAULT_SCHEME,
    std: float = 0.01,
) -> tuple[VGG, str]:
    """A copy of ``source`` with an fc8 for ``class_names``; returns it and a one-line report.

    fc8 is kept when the weights already have exactly these classes, else replaced.
    """
    if not isinstance(source, VGG):
        raise VerydeepError(f"{origin}: fine-tuning needs a Table 1 VGG, found a {type(source).__name__}")
    names = list(class_names)
    model = VGG(source.config, num_classes=len(names), width=source.width, lrn_k=source.lrn_k, class_names=names)
    keep = source.num_classes == len(names) and (source.class_names is None or list(source.class_names) == names)
    layers = param_layers(model)
    if keep:
        copy_layers(model, source, layers=layers, origin=origin)
        return model, f"fc8: kept from {origin} ({source.num_classes} classes, as in the training data)"
    copy_layers(model, source, layers=[name for name in layers if name != "fc8"], origin=origin)
    initialize(model, scheme, std=std, layers=["fc8"])
    old, new = param_layer(source, "fc8").weight.shape, param_layer(model, "fc8").weight.shape
    report = (
        f"fc8: replaced ({old[1]} -> {old[0]} classes from {origin}) by a new {new[1]} -> {new[0]} layer "
        f"for the training data's classes, initialised {scheme}; all other layers copied"
    )
    return model, report


def frozen_layers(model: VGG, through: str | None) -> list[str]:
    """Parameter layers up to and including ``through`` in forward order (``pool5`` freezes all
    convolutions, ``fc7`` everything but fc8)."""
    if through is None:
        return []
    order = [s.name for s in model.specs]
    if through not in order:
        raise VerydeepError(f"freeze_through: unknown layer {through!r}; layers: {', '.join(order)}")
    stop = order.index(through)
    frozen = [s.name for s in model.specs[: stop + 1] if s.kind in ("conv", "fc")]
    if len(frozen) == len(param_layers(model)):
        raise VerydeepError(f"freeze_through: {through} freezes every layer; nothing would be trained")
    return frozen


def freeze(model: VGG, layers: Iterable[str]) -> None:
    """Stop ``layers`` from training (no gradients, so the optimiser leaves them as they are)."""
    for name in layers:
        for p in param_layer(model, name).parameters():
            p.requires_grad_(False)


def parse_lr_mult(items: Iterable[str] | dict[str, float]) -> dict[str, float]:
    """``["fc8=10", "fc8.bias=20"]`` -> ``{"fc8": 10.0, "fc8.bias": 20.0}``."""
    if isinstance(items, dict):
        return {str(k): float(v) for k, v in items.items()}
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise VerydeepError(f"lr_mult: expected LAYER=MULT (e.g. fc8=10), found {item!r}") from None
    return out


def param_groups(model: VGG, lr_mult: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer groups of trainable parameters, one per distinct multiplier (key ``lr_mult``).

    A key is a layer (``fc8``: weight and bias) or one blob (``fc8.bias``, like Caffe's second
    ``param { lr_mult }``); a blob key wins over its layer's key.
    """
    names = dict(model.named_parameters())
    for key in lr_mult:
        layer = key.split(".")[0]
        if key not in names and f"{key}.weight" not in names:
            raise VerydeepError(f"lr_mult: unknown layer {key!r}; layers: {', '.join(param_layers(model))}")
        if not param_layer(model, layer).weight.requires_grad:
            raise VerydeepError(f"lr_mult: layer {layer} is frozen (freeze_through)")
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in names.items():
        if not p.requires_grad:
            continue
        mult = lr_mult.get(name, lr_mult.get(name.rsplit(".", 1)[0], 1.0))
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]
