"""What the GPU benchmark scripts share: CUDA-event timing, and a report that survives failures.

A GPU session is short and a full-size run can fail part-way (out of memory, a missing kernel):
:class:`PartialReport` runs each measurement guarded, records a failure instead of stopping,
skips optional parts once a time budget is spent, and rewrites its JSON file after every
measurement, so whatever was measured is kept.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from verydeep.core.atomic import write_text


def event_ms(fn: Callable[[Any], Any], x: Any, iters: int = 5) -> float:
    """Milliseconds per ``fn(x)`` on the current CUDA stream (CUDA events), after one warm call."""
    fn(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def cuda_timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, iters: int, warmup: int = 3) -> dict[str, float]:
    """Images/s and latency of ``fn(x)`` over ``iters`` calls after ``warmup``; peak GPU memory."""
    for _ in range(warmup - 1):  # event_ms makes one more warm-up call
        fn(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = event_ms(fn, x, iters)
    return {
        "batch": x.shape[0],
        "images_per_s": round(x.shape[0] / (ms / 1000), 1),
        "latency_ms": round(ms, 3),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "iters": iters,
    }


class PartialReport:
    """``measurements``, ``errors`` and ``skipped`` parts, written to ``out`` after every change;
    progress and partial results go to stderr as they come."""

    def __init__(self, out: str | os.PathLike[str] | None = None) -> None:
        self.out = Path(out) if out else None
        self.data: dict[str, Any] = {"measurements": {}, "errors": {}, "skipped": []}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        if self.out is not None:
            write_text(self.out, json.dumps(self.data, indent=2) + "\n")

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def record(self, name: str, value: Any) -> None:
        self.data["measurements"][name] = value
        print(json.dumps({name: value}), file=sys.stderr, flush=True)
        self.save()

    def guarded(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, recorded under ``name``; on an exception the error is recorded
        instead (a partial report is better than none) and None returned."""
        try:
            value = fn(*args, **kwargs)
            if value is not None:
                self.record(name, value)
            return value
        except Exception as e:  # keep going with the other measurements
            self.data["errors"][name] = f"{type(e).__name__}: {e}"
            self.save()
            self.log(f"{name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    def over_budget(self, budget: float, what: str) -> bool:
        """Whether ``budget`` seconds have passed; if so ``what`` is recorded as skipped."""
        if self.elapsed() > budget:
            self.data["skipped"].append(what)
            self.log(f"skipping {what}: over the {budget:.0f}s budget")
            return True
        return False
