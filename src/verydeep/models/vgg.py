"""The VGG module: the classic net, its fully convolutional (dense) view, and feature taps.

Parameters carry Caffe's layer names (``conv1_1.weight`` ... ``fc8.bias``) so a caffemodel maps
onto the module by name. Pooling rounds up like Caffe's. The input space is Caffe's: BGR,
0..255, mean pixel subtracted (see :mod:`verydeep.data.preprocess`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from verydeep import configs
from verydeep.configs import LayerSpec
from verydeep.errors import VerydeepError


def _make_layer(spec: LayerSpec, lrn_k: float) -> nn.Module:
    if spec.kind == "conv":
        return nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, padding=spec.kernel // 2)
    if spec.kind == "relu":
        return nn.ReLU(inplace=True)
    if spec.kind == "lrn":
        d = configs.LRN_DEFAULTS
        # torch divides alpha by size like Caffe does.
        return nn.LocalResponseNorm(int(d["size"]), alpha=d["alpha"], beta=d["beta"], k=lrn_k)
    if spec.kind == "pool":
        return nn.MaxPool2d(2, stride=2, ceil_mode=True)  # Caffe rounds up
    if spec.kind == "fc":
        return nn.Linear(spec.in_channels, spec.out_channels)
    if spec.kind == "dropout":
        return nn.Dropout(0.5)
    raise ValueError(f"unknown layer kind {spec.kind!r}")


#: ``VGG(class_names=IMAGENET)``: the ILSVRC-2012 class names, resolved lazily.
IMAGENET = "imagenet"


class VGG(nn.Module):
    """A configuration of the paper's Table 1 ("A", "A-LRN", "B", "C", "D", "E").

    ``width`` scales every layer's channels (fc6/fc7 included) for narrow test nets;
    ``class_names`` travels with the weights so classification can print labels.
    """

    # Layers every configuration has (the others are reached with :meth:`layer`).
    conv1_1: nn.Conv2d
    fc6: nn.Linear
    fc7: nn.Linear
    fc8: nn.Linear
    _class_names: list[str] | str | None

    def __init__(
        self,
        config: str = "D",
        num_classes: int = 1000,
        width: float = 1.0,
        *,
        lrn_k: float = configs.LRN_DEFAULTS["k"],
        class_names: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__()
        self.config = configs.canonical(config)
        self.num_classes = int(num_classes)
        self.width = float(width)
        self.lrn_k = float(lrn_k)
        self.class_names = class_names
        self.specs: list[LayerSpec] = configs.layer_specs(self.config, self.width, self.num_classes)
        for spec in self.specs:
            self.add_module(spec.name, _make_layer(spec, self.lrn_k))
        self.layer_names: list[str] = [s.name for s in self.specs] + ["prob"]
        self._input_checked = False

    # -- construction helpers -------------------------------------------------------------
    @property
    def class_names(self) -> list[str] | None:
        """The output classes' names, or None. ``"imagenet"`` (given to the constructor) stands
        for the 1000 ILSVRC-2012 names, looked up on first use: that import of torchvision
        costs about a second, which loading a caffemodel should not pay."""
        if self._class_names == IMAGENET:
            from verydeep.models.classes import imagenet_classes

            self._class_names = list(imagenet_classes())
        return None if isinstance(self._class_names, str) else self._class_names

    @class_names.setter
    def class_names(self, names: Sequence[str] | str | None) -> None:
        if isinstance(names, str) and names != IMAGENET:
            raise VerydeepError(f"class_names: a list of names, {IMAGENET!r} or None, not {names!r}")
        self._class_names = names if names is None or isinstance(names, str) else list(names)

    def layer(self, name: str) -> nn.Module:
        """The layer module called ``name`` (Caffe's name: ``conv3_2``, ``pool5``, ``fc7``)."""
        return self.get_submodule(name)

    def conv(self, name: str) -> nn.Conv2d:
        """The convolution ``name`` (``conv1_1`` ... ``conv5_3``)."""
        module = self.get_submodule(name)
        if not isinstance(module, nn.Conv2d):
            raise VerydeepError(f"layer {name!r} of config {self.config} is not a convolution")
        return module

    def linear(self, name: str) -> nn.Linear:
        """The fully connected layer ``name`` (``fc6``, ``fc7``, ``fc8``)."""
        module = self.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise VerydeepError(f"layer {name!r} of config {self.config} is not fully connected")
        return module

    def extra_repr(self) -> str:
        return f"config={self.config!r}, num_classes={self.num_classes}, width={self.width}"

    @property
    def fc6_input(self) -> tuple[int, int, int]:
        """(channels, height, width) that fc6 expects: pool5 at a 224x224 input."""
        c = self.fc6.in_features // (configs.POOL5_SIZE**2)
        return c, configs.POOL5_SIZE, configs.POOL5_SIZE

    def meta(self) -> dict[str, Any]:
        """What a weights file records about this net (see :mod:`verydeep.formats.safetensors`)."""
        return {
            "config": self.config,
            "num_classes": self.num_classes,
            "width": self.width,
            "lrn_k": self.lrn_k,
            "input_space": "caffe-bgr-0-255-mean-subtracted",
            "class_names": self.class_names,
        }

    # -- forward ------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, stop: str | None, taps: set[str] | None) -> tuple[torch.Tensor, dict]:
        """Run layers in order; collect ``taps``; stop after layer ``stop``."""
        check_input(x, values=not self._input_checked)
        self._input_checked = True
        out: dict[str, torch.Tensor] = {}
        tapped = False  # was the previous layer's output tapped?
        for spec in self.specs:
            if spec.kind == "fc" and x.dim() == 4:
                c, h, w = self.fc6_input
                if tuple(x.shape[1:]) != (c, h, w):
                    raise VerydeepError(
                        f"fc6 expects pool5 of shape {c}x{h}x{w} (a {configs.CROP}x{configs.CROP} input), "
                        f"found {'x'.join(map(str, x.shape[1:]))}; use model.dense() for other sizes"
                    )
                x = torch.flatten(x, 1)  # row-major C,H,W like Caffe's InnerProduct
            layer = self.layer(spec.name)
            if spec.kind == "relu" and tapped:
                x = F.relu(x)  # the in-place ReLU would overwrite the tapped pre-activation
            else:
                x = layer(x)
            tapped = taps is not None and spec.name in taps
            if tapped:
                out[spec.name] = x
            if spec.name == stop:
                return x, out
        if taps is not None and "prob" in taps:
            out["prob"] = torch.softmax(x, dim=1)
        return x, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc8 scores (N x num_classes) for N x 3 x 224 x 224 Caffe-space input; no softmax."""
        return self._run(x, None, None)[0]

    def features(self, x: torch.Tensor, taps: Iterable[str] = ("fc7",)) -> dict[str, torch.Tensor]:
        """Outputs of the named layers (Caffe names; ``convX_Y`` is before its ReLU, ``reluX_Y``
        after; ``prob`` is the soft-max). Computation stops after the last requested tap."""
        taps = list(taps)
        unknown = [t for t in taps if t not in self.layer_names]
        if unknown:
            raise VerydeepError(
                f"unknown layer {unknown[0]!r} for config {self.config}; layers: {', '.join(self.layer_names)}"
            )
        last = max(taps, key=self.layer_names.index)
        _, out = self._run(x, None if last == "prob" else last, set(taps))
        return {t: out[t] for t in taps}

    def dense(self) -> DenseVGG:
        """The fully convolutional view (fc6 as 7x7 conv, fc7/fc8 as 1x1) sharing parameters."""
        return DenseVGG(self)

    # -- conveniences --------------------------------------------------------------------
    def preprocess(self, images: Any, size: int = 256, crop: int = configs.CROP) -> torch.Tensor:
        """PIL images / uint8 RGB arrays / paths -> N x 3 x crop x crop Caffe input (float32)."""
        from verydeep.data.preprocess import preprocess

        return preprocess(images, size=size, crop=crop)

    def optimized(self, precision: str = "fp32", **kwargs: Any) -> nn.Module:
        """Same inputs/outputs, the fastest correct execution for the device (:mod:`verydeep.runtime`)."""
        from verydeep.runtime.executor import optimize

        return optimize(self, precision=precision, **kwargs)


class DenseVGG(nn.Module):
    """VGG applied fully convolutionally: N x 3 x H x W -> N x C x h x w class score map.

    Holds no parameters of its own; fc weights are viewed as convolutions at call time, so it
    always reflects the wrapped model. At exactly 224x224 the map is 1x1 and equals fc8.
    """

    def __init__(self, model: VGG) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        check_input(x, values=not m._input_checked)
        m._input_checked = True
        for spec in m.specs:
            if spec.kind == "fc":
                fc = m.linear(spec.name)
                if spec.name == "fc6":
                    c, kh, kw = m.fc6_input
                    weight = fc.weight.view(fc.out_features, c, kh, kw)
                else:
                    weight = fc.weight.view(fc.out_features, fc.in_features, 1, 1)
                x = F.conv2d(x, weight, fc.bias)
            else:
                x = m.layer(spec.name)(x)
        return x


#: Caffe-space input reaches |x| > 100 in any real image (black minus the mean pixel is about
#: -104..-124); 0..1 RGB and mean/std-normalised RGB stay within a few units.
SMALL_INPUT = 3.0


class InputSpaceWarning(UserWarning):
    """The input does not look like Caffe space (BGR, 0..255, mean pixel subtracted)."""


def check_input(x: torch.Tensor, *, values: bool = True) -> None:
    """A one-line error for a tensor that is not a batch of 3-channel images, and (``values``) a
    warning for values in the range of 0..1 or mean/std-normalised RGB, the most common VGG
    mistake. The models look at the values of their first input only: reading them back is a
    device synchronisation that a training step should not pay."""
    if x.dim() != 4 or x.shape[1] != 3:
        hint = "; add the batch dimension: x.unsqueeze(0)" if x.dim() == 3 and x.shape[0] == 3 else ""
        raise VerydeepError(f"VGG input: expected a batch N x 3 x H x W, found shape {tuple(x.shape)}{hint}")
    if not values or torch.jit.is_tracing() or torch.compiler.is_compiling() or not x.numel():
        return
    peak = float(x.detach().abs().amax())
    if 0 < peak <= SMALL_INPUT:
        warnings.warn(
            f"VGG input looks like 0..1 or mean/std-normalised RGB (max |x| = {peak:.3g}); the model takes "
            "Caffe space: BGR, 0..255, mean pixel subtracted (model.preprocess(images) makes it)",
            InputSpaceWarning,
            stacklevel=3,
        )


def spatial_average(score_map: torch.Tensor) -> torch.Tensor:
    """Average a dense score map over its positions: N x C x h x w -> N x C (sum-pooling / hw)."""
    return score_map.mean(dim=(2, 3))
