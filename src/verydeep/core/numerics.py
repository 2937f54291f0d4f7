"""The one error metric every check in verydeep reports: relative error against a reference."""

from __future__ import annotations

from typing import Any

import numpy as np


def relative_error(found: Any, expected: Any) -> float:
    """``max |found - expected| / max |expected|`` in float64 (0 when both are all zeros).

    The maximum-norm ratio is what a logit tolerance means ("no output is off by more than this
    fraction of the largest one"); it accepts tensors (any device) and arrays of equal shape.
    """
    a, b = _float64(found), _float64(expected)
    if a.shape != b.shape:
        raise ValueError(f"relative_error: shapes differ: found {a.shape}, expected {b.shape}")
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    return diff / scale if scale > 0 else diff


def _float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)
