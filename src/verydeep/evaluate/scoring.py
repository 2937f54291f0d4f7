"""Soft-max outputs of images under a protocol: rescaling in the loader, crops and the nets on the device.

:class:`RescaleToScales` runs in DataLoader workers (one uint8 image per test scale Q, so the
loader's traffic stays at a byte per pixel); :class:`Scorer` cuts the crops, converts them to
Caffe's input space on the device and runs the classic or the dense net; :func:`forwards` picks
those nets for a precision.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from verydeep.configs import CROP
from verydeep.core.defaults import QUANTIZED, check_inference_precision, dtype_of
from verydeep.data.preprocess import rescale, to_caffe
from verydeep.errors import VerydeepError
from verydeep.evaluate.protocols import Protocol, crop_boxes
from verydeep.models.vgg import spatial_average

#: A net as the scorer calls it: Caffe-space input -> scores (or a score map).
Forward = Callable[[torch.Tensor], torch.Tensor]


# -- decoding (runs in DataLoader workers) ---------------------------------------------------------
class RescaleToScales:
    """uint8 3xHxW RGB -> one uint8 image per test scale Q, shorter side Q (picklable)."""

    def __init__(self, scales: Sequence[int], interpolation: str = "bilinear") -> None:
        self.scales = tuple(scales)
        self.interpolation = interpolation

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(rescale(image, q, self.interpolation) for q in self.scales)


# -- scoring (runs on the device) -------------------------------------------------------------------
class Scorer:
    """Soft-max outputs of a batch of images under a protocol.

    ``forward`` maps N x 3 x 224 x 224 Caffe input to N x C scores; ``dense_forward`` maps
    N x 3 x H x W to an N x C x h x w score map. ``max_batch`` bounds the crops of one forward
    pass (the dense net gets the same number of pixels); one image's crops stay together
    unless they alone exceed it.
    """

    def __init__(
        self,
        protocol: Protocol,
        forward: Forward | None,
        dense_forward: Forward | None,
        device: str | torch.device = "cpu",
        *,
        max_batch: int = 128,
    ) -> None:
        self.protocol = protocol
        self.forward = forward
        self.dense_forward = dense_forward
        self.device = torch.device(device)
        self.max_batch = max(1, int(max_batch))
        #: Called with the images' worth of work each forward pass finished (fractions when a
        #: pass covers one scale of several, or one half of the combined protocol): progress bars
        #: move per pass, not per chunk.
        self.on_progress: Callable[[float], None] = lambda images: None

    @torch.inference_mode()
    def __call__(self, items: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``items[n][s]``: image n rescaled to scale s (uint8 3xHxW). Returns N x C float32."""
        p = self.protocol
        if p.name in ("center", "multicrop"):
            return self.crop_probs(items)
        if p.name == "dense":
            return self.dense_probs(items)
        return (self.dense_probs(items, share=0.5) + self.crop_probs(items, share=0.5)) / 2

    def _caffe(self, image: torch.Tensor) -> torch.Tensor:
        return to_caffe(image.to(self.device, non_blocking=True))

    def _crops_of(self, scaled: Sequence[torch.Tensor]) -> torch.Tensor:
        """All crops of one image, scale by scale: S*k x 3 x 224 x 224 (flips after originals)."""
        out = []
        for image in scaled:
            x = self._caffe(image)
            boxes = crop_boxes(x.shape[-2], x.shape[-1], self.protocol)
            crops = torch.stack([x[:, t : t + CROP, l : l + CROP] for t, l in boxes])
            out += [crops, crops.flip(-1)] if self.protocol.flip else [crops]
        return torch.cat(out)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.float(), dim=1)

    def crop_probs(self, items: Sequence[Sequence[torch.Tensor]], *, share: float = 1.0) -> torch.Tensor:
        forward = self.forward
        if forward is None:
            raise VerydeepError(f"protocol {self.protocol.name} needs the classic net's forward")
        s, k = len(self.protocol.scales), self.protocol.crops_per_scale()
        results: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []

        def run() -> None:
            if not pending:
                return
            x, images = torch.cat(pending), len(pending)
            pending.clear()
            for i in range(0, x.shape[0], self.max_batch):
                results.append(self._softmax(forward(x[i : i + self.max_batch])))
            self.on_progress(images * share)

        for scaled in items:
            crops = self._crops_of(scaled)
            if pending and sum(c.shape[0] for c in pending) + crops.shape[0] > self.max_batch:
                run()
            pending.append(crops)
        run()
        if not results:
            return torch.zeros(0, 0)
        probs = torch.cat(results).view(len(items), s, k, -1)
        return probs.mean(dim=2).mean(dim=1).cpu()

    def dense_probs(self, items: Sequence[Sequence[torch.Tensor]], *, share: float = 1.0) -> torch.Tensor:
        dense_forward = self.dense_forward
        if dense_forward is None:
            raise VerydeepError("the dense protocol needs the fully convolutional net (model.dense())")
        n, scales = len(items), self.protocol.scales
        per_scale: list[torch.Tensor] = []
        budget = self.max_batch * CROP * CROP
        views = 2 if self.protocol.flip else 1
        for s in range(len(scales)):
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # images of equal size batch together
            for i, scaled in enumerate(items):
                height, width = scaled[s].shape[-2:]
                groups[(height, width)].append(i)
            mean: torch.Tensor | None = None  # n x C soft-max outputs at this scale
            for (h, w), members in groups.items():
                per = max(1, budget // (h * w * views))
                for j in range(0, len(members), per):
                    idx = members[j : j + per]
                    x = self._caffe(torch.stack([items[i][s] for i in idx]))
                    if self.protocol.flip:
                        x = torch.cat([x, x.flip(-1)])
                    score_map = dense_forward(x).float()
                    if self.protocol.dense_average == "scores":
                        probs = self._softmax(spatial_average(score_map))
                    else:
                        probs = self._softmax(score_map).mean(dim=(2, 3))
                    if self.protocol.flip:
                        probs = (probs[: len(idx)] + probs[len(idx) :]) / 2
                    if mean is None:
                        mean = torch.zeros(n, probs.shape[1])
                    mean[idx] = probs.cpu()
                    self.on_progress(len(idx) * share / len(scales))
            if mean is not None:
                per_scale.append(mean)
        if n == 0:
            return torch.zeros(0, 0)
        return torch.stack(per_scale).mean(dim=0)


def forwards(
    model: nn.Module,
    protocol: Protocol,
    *,
    precision: str = "fp32",
    forward: Forward | None = None,
    dense_forward: Forward | None = None,
    device: str | torch.device = "cpu",
    calibration: torch.Tensor | None = None,
) -> tuple[Forward | None, Forward | None]:
    """The classic and dense callables for ``model`` at ``precision``.

    fp32 uses the model as is. Otherwise ``model.optimized(precision)`` (:mod:`verydeep.runtime`) when it
    exists, else autocast (not for int8, which only the fast path computes; it is calibrated on
    ``calibration``). Callers may pass their own ``forward``/``dense_forward``.
    """
    check_inference_precision(precision)
    fast: Any = None
    optimized = getattr(model, "optimized", None)
    if (
        precision != "fp32"
        and callable(optimized)
        and (forward is None or (dense_forward is None and protocol.uses_dense))
    ):
        try:
            fast = optimized(precision=precision, calibration=calibration)
        except (ImportError, AttributeError, NotImplementedError):
            fast = None
    if precision in QUANTIZED and fast is None and (forward is None or dense_forward is None):
        raise VerydeepError(f"--precision {precision} needs a Table 1 VGG's fast path; found a {type(model).__name__}")
    if forward is None and protocol.uses_crops:
        forward = fast if fast is not None else _autocast(model, precision, device)
    if dense_forward is None and protocol.uses_dense:
        if fast is not None and callable(getattr(fast, "dense", None)):
            dense_forward = fast.dense()
        else:
            dense = getattr(model, "dense", None)
            if not callable(dense):
                raise VerydeepError(f"{type(model).__name__} has no dense() view; use --protocol center or multicrop")
            dense_forward = _autocast(dense(), precision, device)
    return forward, dense_forward


def _autocast(module: Forward, precision: str, device: str | torch.device) -> Forward:
    if precision == "fp32":
        return module
    dtype = dtype_of(precision)
    device_type = torch.device(device).type

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return module(x)

    return run
