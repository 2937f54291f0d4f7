"""Perceptual and style losses on VGG feature taps (Johnson et al. 2016; Gatys et al. 2015).

The loss takes what image code usually has, RGB in [0, 1], and converts to the model's Caffe
input space inside (BGR, 0..255, mean pixel subtracted) with :func:`verydeep.data.preprocess.to_caffe`,
so the usual mistakes with Caffe-trained VGG weights (RGB fed as BGR, [0,1] fed as 0..255,
ImageNet mean/std instead of the mean pixel) cannot happen. Inputs clearly outside [0, 1] raise.

    loss_fn = verydeep.PerceptualLoss("vgg16", style_weight=1e5)
    loss = loss_fn(generated, content, style=style_image)   # all N x 3 x H x W, RGB in [0, 1]
    loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from verydeep.data.preprocess import to_caffe
from verydeep.errors import VerydeepError

#: The taps of Johnson et al.'s perceptual losses (feature and style), by Caffe name.
DEFAULT_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices of N x C x H x W features, normalised by C*H*W: N x C x C."""
    n, c, h, w = features.shape
    f = features.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class PerceptualLoss(nn.Module):
    """``feature_weight * sum_t w_t * mean((phi_t(x) - phi_t(y))^2)
    + style_weight * sum_t w_t * mean_n ||G(phi_t(x)) - G(phi_t(s))||_F^2``.

    ``phi_t`` is VGG's output at tap ``t`` (Caffe layer names, e.g. relu2_2), ``G`` the Gram
    matrix normalised by C*H*W, ``w_t`` the per-tap ``layer_weights`` (default 1). The feature
    term compares input and target at the same positions (so they need the same size); the
    style term compares Gram matrices (any sizes) against ``style`` if given, else the target.

    ``model`` is a VGG or anything :func:`verydeep.load` takes; its parameters are frozen
    (``requires_grad=False``) and it is put in eval mode. Gradients flow to the input images.
    """

    def __init__(
        self,
        model: nn.Module | str = "vgg16",
        taps: Sequence[str] = DEFAULT_TAPS,
        *,
        feature_weight: float = 1.0,
        style_weight: float = 0.0,
        style_taps: Sequence[str] | None = None,
        layer_weights: Mapping[str, float] | None = None,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            from verydeep.hub.loader import load

            model = load(model)
        self.model = model.eval().requires_grad_(False)
        self.taps = tuple(taps)
        self.style_taps = tuple(style_taps) if style_taps is not None else self.taps
        self.feature_weight = float(feature_weight)
        self.style_weight = float(style_weight)
        self.layer_weights = dict(layer_weights or {})
        self.check_range = check_range
        names: list[str] | None = getattr(model, "layer_names", None)
        unknown = [t for t in (*self.taps, *self.style_taps) if names is not None and t not in names]
        if names is not None and unknown:
            raise VerydeepError(f"PerceptualLoss: unknown tap {unknown[0]!r}; layers: {', '.join(names)}")

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.model.eval()  # the loss network stays in eval mode (no dropout) whatever the caller does
        return self

    def _features(self, images: torch.Tensor, taps: Sequence[str], what: str) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise VerydeepError(f"PerceptualLoss: {what}: expected N x 3 x H x W RGB, found {tuple(images.shape)}")
        if self.check_range:
            lo, hi = float(images.detach().min()), float(images.detach().max())
            if lo < -0.5 or hi > 1.5:
                raise VerydeepError(
                    f"PerceptualLoss: {what}: expected RGB in [0, 1], found values in [{lo:.3g}, {hi:.3g}] "
                    "(0..255 or mean/std-normalised input? pass images / 255 or undo the normalisation)"
                )
        param = next(self.model.parameters())
        x = to_caffe(images.to(param.device) * 255.0).to(param.dtype)
        features = cast(Callable[..., dict[str, torch.Tensor]], self.model.features)  # VGG.features: taps by name
        return features(x, taps=list(dict.fromkeys(taps)))

    def terms(
        self, input: torch.Tensor, target: torch.Tensor, style: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each weighted term by name (``feature/relu2_2``, ``style/relu1_2``, ...); they sum to the loss."""
        use_style = self.style_weight != 0
        taps = list(self.taps if self.feature_weight != 0 else []) + list(self.style_taps if use_style else [])
        if not taps:
            return {}
        fx = self._features(input, taps, "input")
        out: dict[str, torch.Tensor] = {}
        if self.feature_weight != 0:
            if target.shape[-2:] != input.shape[-2:]:
                raise VerydeepError(
                    f"PerceptualLoss: target is {tuple(target.shape[-2:])}, input {tuple(input.shape[-2:])}: "
                    "the feature term needs the same size"
                )
            fy = self._features(target, self.taps, "target")
            for t in self.taps:
                w = self.feature_weight * self.layer_weights.get(t, 1.0)
                out[f"feature/{t}"] = w * (fx[t] - fy[t]).pow(2).mean()
        if use_style:
            s = self._features(style if style is not None else target, self.style_taps, "style")
            for t in self.style_taps:
                w = self.style_weight * self.layer_weights.get(t, 1.0)
                gx, gs = gram(fx[t]), gram(s[t])
                if gs.shape[0] == 1 and gx.shape[0] > 1:
                    gs = gs.expand_as(gx)  # one style image for a whole batch
                out[f"style/{t}"] = w * (gx - gs).pow(2).sum(dim=(1, 2)).mean()
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss (see the class docstring); RGB images in [0, 1], N x 3 x H x W."""
        terms = self.terms(input, target, style)
        if not terms:
            return input.new_zeros(())
        return torch.stack(list(terms.values())).sum()
