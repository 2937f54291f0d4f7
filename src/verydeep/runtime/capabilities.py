"""What the device computes natively: the CPU's feature flags, oneDNN's fused ops, fast bf16/fp16.

The plan asks these questions once; a precision is worth computing in only where the hardware
has dot-product instructions for it, since an emulated bf16 is slower than fp32.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch

#: CPU flags that make a reduced precision faster than fp32 (native dot-product instructions).
#: AVX512-FP16 alone is not enough: oneDNN's fp16 convolutions there measured 0.57x fp32 on a
#: Sapphire Rapids core (benchmarks/RESULTS.md); only AMX-FP16 (Granite Rapids) computes fp16 fast.
NATIVE_CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "bf16": ("amx_bf16", "avx512_bf16"),
    "fp16": ("amx_fp16",),
}
#: oneDNN's own "is this precision supported" query, per precision.
_ONEDNN_SUPPORT = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    """A human-readable CPU name (for benchmark reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onednn_available() -> bool:
    """Whether PyTorch's oneDNN conv ops (pre-packed weights, fused post-ops) are usable."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
    )


def onednn_linear_available() -> bool:
    """Whether oneDNN's pre-packed fully connected op (with a fused ReLU) is usable."""
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def native(precision: str, device: torch.device) -> bool:
    """Does ``device`` compute ``precision`` natively, i.e. faster than fp32?"""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        query = getattr(torch.ops.mkldnn, _ONEDNN_SUPPORT[precision], lambda: False)
        supported = onednn_available() and bool(query())
        flags = cpu_flags()
        # oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is slower than fp32.
        return supported and (not flags or any(f in flags for f in NATIVE_CPU_FLAGS[precision]))
    return precision == "fp16" and device.type == "mps"
