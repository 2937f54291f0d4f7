"""What every export shares: the request, the report, the probe batch, and the check.

Every export is read back by an independent consumer and compared with verydeep on a probe
batch before it counts as written; a file that fails its check is removed, so a wrong export
never looks like a result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from verydeep import configs
from verydeep.core.numerics import relative_error
from verydeep.data.preprocess import to_caffe
from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG

#: Largest relative difference (max |a - b| / max |b|) an exact export may show against verydeep.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportRequest:
    """One export: the net, the output path, the input space it should take, and the options."""

    model: VGG
    out: Path
    space: str
    dense: bool = False
    opset: int = 18
    exporter: str = "dynamo"
    precision: str = "fp32"  # "int8": a statically quantized ONNX (onnxruntime's QDQ format)
    calibration: torch.Tensor | None = None  # int8: Caffe-space calibration images


@dataclass
class ExportReport:
    """What was written and how it was checked."""

    format: str
    paths: list[str]
    input_space: str
    checked_with: str
    max_rel_error: float  # against verydeep on the probe batch
    exact: bool  # whether the conversion is exact by construction (then max_rel_error <= TOLERANCE)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def probe(batch: int = 2, height: int = configs.CROP, width: int = configs.CROP, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of smooth random images in Caffe space (what checks compare on)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=g) * 255
    rgb = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return to_caffe(rgb)


def rel_error(found: Any, expected: Any) -> float:
    """:func:`~verydeep.core.numerics.relative_error`, with a shape mismatch as a user-facing error."""
    try:
        return relative_error(found, expected)
    except ValueError as e:
        raise VerydeepError(f"export check: {e}") from None


def reference(model: VGG, x: torch.Tensor, dense: bool) -> torch.Tensor:
    """verydeep's own output for ``x`` (the classic net or its dense view), float32 on the CPU."""
    with torch.inference_mode():
        return (model.dense() if dense else model)(x.to(next(model.parameters()).device)).float().cpu()


def probe_sizes(dense: bool) -> list[tuple[int, int]]:
    """Input sizes an export is checked at: 224x224, and a larger one for the dense view."""
    return [(configs.CROP, configs.CROP), (256, 288)] if dense else [(configs.CROP, configs.CROP)]


def fail(paths: list[Path], message: str) -> None:
    """Remove what an export wrote and raise: a file that failed its check must not remain."""
    for p in paths:
        p.unlink(missing_ok=True)
    raise VerydeepError(message)
