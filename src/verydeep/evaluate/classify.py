"""Top-k ImageNet (or the user's) classes for images, with the seed's preprocessing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from verydeep.data.preprocess import center_crop_caffe
from verydeep.errors import ImageError, VerydeepError


def predict(
    model: nn.Module,
    batch: torch.Tensor,
    top: int = 5,
    class_names: Sequence[str] | None = None,
) -> list[list[dict[str, Any]]]:
    """Soft-max top-``top`` of a Caffe-space batch: per image ``[{index, label, probability}]``."""
    with torch.inference_mode():
        probs = torch.softmax(model(batch).float(), dim=1).cpu()
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    out = []
    for vs, ix in zip(values.tolist(), indices.tolist()):
        out.append(
            [{"index": i, "label": class_names[i] if class_names else str(i), "probability": v} for v, i in zip(vs, ix)]
        )
    return out


def classify_files(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    top: int = 5,
    batch_size: int = 16,
    device: str = "cpu",
    precision: str = "fp32",
    class_names: Sequence[str] | None = None,
    calibration: torch.Tensor | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Classify image files in batches. Returns (results, errors); an unreadable file is an
    error line naming it, and the other images are still classified. ``calibration``: the
    Caffe-space images ``precision="int8"`` is calibrated on."""
    names = class_names if class_names is not None else getattr(model, "class_names", None)
    model = model.to(device).eval()
    run = model if precision == "fp32" else _fast_path(model, precision, calibration)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    good: list[tuple[str, torch.Tensor]] = []
    for p in paths:
        try:
            good.append((str(p), center_crop_caffe(p)))
        except ImageError as e:
            errors.append(str(e))
    for start in range(0, len(good), batch_size):
        chunk = good[start : start + batch_size]
        batch = torch.stack([x for _, x in chunk]).to(device)
        for (path, _), preds in zip(chunk, predict(run, batch, top, names)):
            results.append({"image": path, "predictions": preds})
    return results, errors


def _fast_path(model: nn.Module, precision: str, calibration: torch.Tensor | None) -> nn.Module:
    """The model's reduced-precision runtime (:mod:`verydeep.runtime`)."""
    optimized = getattr(model, "optimized", None)
    if not callable(optimized):
        raise VerydeepError(f"precision {precision} needs a Table 1 VGG's fast path; found a {type(model).__name__}")
    fast: nn.Module = optimized(precision=precision, calibration=calibration)
    return fast
