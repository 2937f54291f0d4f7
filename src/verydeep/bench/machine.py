"""The machine a number was measured on, and how busy it was: CPU, versions, load, memory.

Benchmarks on a shared machine are only comparable with the load next to them, so the report
carries the CPU share other processes used before, during and after the timed calls (from
/proc/stat, Linux only; ``None`` elsewhere), and each engine's peak resident memory.
"""

from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from typing import Any

import torch

from verydeep.runtime import cpu_model


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, library versions, load: what a number needs next to it."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
    }
    for module, key in (("torchvision", "torchvision"), ("onnxruntime", "onnxruntime"), ("cv2", "opencv")):
        try:
            info[key] = __import__(module).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


# -- load ------------------------------------------------------------------------------------------
def _cpu_jiffies() -> list[int] | None:
    """The all-CPU line of /proc/stat: user, nice, system, idle, iowait, ... in clock ticks."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (others' work, since we are asleep); Linux only."""
    a = _cpu_jiffies()
    if a is None:
        return None
    time.sleep(seconds)
    b = _cpu_jiffies()
    if b is None:
        return None
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])
    return round(1.0 - idle / total, 3) if total > 0 else None


class OthersLoad:
    """Share of all CPUs' time used by *other* processes between ``start()`` and ``stop()``:
    busy jiffies in /proc/stat minus this process's own CPU time (all its threads)."""

    def __init__(self) -> None:
        self.a: tuple[float, float, float] | None = None

    def start(self) -> OthersLoad:
        self.a = self._snap()
        return self

    def stop(self) -> float | None:
        b = self._snap()
        if self.a is None or b is None:
            return None
        total, idle, own = (y - x for x, y in zip(self.a, b))
        if total <= 0:
            return None
        return round(max(0.0, (total - idle - own) / total), 3)

    @staticmethod
    def _snap() -> tuple[float, float, float] | None:
        """(all CPUs' time, their idle time, this process's CPU time), in seconds."""
        v = _cpu_jiffies()
        if v is None:
            return None
        import resource  # Unix only, and only reached where /proc/stat exists

        tick = os.sysconf("SC_CLK_TCK")
        r = resource.getrusage(resource.RUSAGE_SELF)
        return sum(v[:8]) / tick, (v[3] + v[4]) / tick, r.ru_utime + r.ru_stime


# -- memory ----------------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    """This process's resident memory now (Linux only)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class RssSampler:
    """Peak resident memory during a block, sampled every millisecond by a thread; ``before``
    is the resident memory on entry."""

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self.before = rss_bytes() or 0
        self.peak = self.before
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)
