"""The defaults several jobs share, decided in one place: device, loader workers, precisions.

Kept free of a top-level torch import so the command line can build its options quickly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Numeric precisions a user can ask for, and the torch dtype each computes in.
PRECISIONS: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Precisions that only inference offers (``model.optimized``, classify, evaluate, extract, bench,
#: export): int8 is static post-training quantization, calibrated on images (``verydeep.runtime.int8``).
QUANTIZED: tuple[str, ...] = ("int8",)
#: int8 calibration images used by default (min-max ranges of VGG-16's layers settle within a
#: few percent by ~32 images; each costs one exact forward).
CALIBRATION_IMAGES = 32
#: Every precision an inference command accepts.
INFERENCE_PRECISIONS: tuple[str, ...] = (*PRECISIONS, *QUANTIZED)
#: Data loader processes never exceed this many per rank (decoding JPEGs scales no further
#: on the machines measured, and each worker holds a copy of the dataset's file list).
MAX_WORKERS = 8


def check_inference_precision(precision: str) -> str:
    """``precision`` if an inference command accepts it, else a one-line error naming the choices."""
    if precision not in INFERENCE_PRECISIONS:
        from verydeep.errors import VerydeepError

        raise VerydeepError(f"unknown precision {precision!r}; expected one of {', '.join(INFERENCE_PRECISIONS)}")
    return precision


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``"bf16"`` -> ``torch.bfloat16``)."""
    import torch

    if precision not in PRECISIONS:
        from verydeep.errors import VerydeepError

        raise VerydeepError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[precision])


def default_device(device: str | None = None) -> str:
    """``device`` if given (checked: asking for a GPU that is not there is a one-line error),
    else ``"cuda"`` where a GPU is visible, else ``"cpu"``."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        from verydeep.errors import VerydeepError

        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise VerydeepError(
            f"--device {device}: no CUDA GPU is visible to PyTorch {torch.__version__} ({build}); use --device cpu"
        )
    if kind == "cuda" and ":" in device and int(device.split(":", 1)[1] or 0) >= torch.cuda.device_count():
        from verydeep.errors import VerydeepError

        raise VerydeepError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(workers: int | None = None) -> int:
    """``workers`` if given, else as many loader processes as CPUs, at most :data:`MAX_WORKERS`."""
    if workers is not None:
        return max(0, int(workers))
    return min(MAX_WORKERS, available_cpus())
