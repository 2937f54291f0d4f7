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
#: CPU classes, first match wins: (name, flags that must all be present, what it computes fast).
#: The plan reads its per-class choices (:data:`verydeep.runtime.plan.CPU_PLANS`) by this name.
CPU_CLASSES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("amx", ("amx_bf16", "amx_int8"), "AMX tiles: bf16 and int8 matrix multiply (Sapphire Rapids and later)"),
    ("avx512-bf16", ("avx512_bf16", "avx512_vnni"), "AVX-512 with bf16 and int8 dot products (Cooper Lake, Zen 4)"),
    ("avx512-vnni", ("avx512f", "avx512_vnni"), "AVX-512 with int8 dot products (Cascade Lake, Ice Lake)"),
    ("avx512", ("avx512f",), "AVX-512 fp32 FMA, int8 through 16-bit pairs (Skylake-SP)"),
    ("avx2-vnni", ("avx2", "fma", "avx_vnni"), "AVX2 with int8 dot products (Alder Lake and later)"),
    ("avx2", ("avx2", "fma"), "AVX2 fp32 FMA, int8 through 16-bit pairs (Haswell .. Zen 3)"),
)
#: Flags whose int8 dot product (u8 x s8 summed in 32 bits) cannot saturate; without them oneDNN
#: multiplies through 16-bit pair sums, which overflow for 8-bit activations, so they get 7 bits.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
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


def cpu_class(flags: frozenset[str] | None = None) -> str:
    """This CPU's class in :data:`CPU_CLASSES` (``"generic"``: ARM, or x86 without AVX2)."""
    flags = cpu_flags() if flags is None else flags
    for name, needs, _ in CPU_CLASSES:
        if all(f in flags for f in needs):
            return name
    return "generic"


def int8_dot_product(flags: frozenset[str] | None = None) -> bool:
    """Whether int8 products accumulate in 32 bits without saturating (VNNI or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in INT8_DOT_FLAGS)


def onednn_int8_available() -> bool:
    """Whether PyTorch's oneDNN int8 conv and fc ops (what its x86 quantization lowers to) exist."""
    onednn = torch.ops.onednn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(onednn, op) for op in ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise")
    )


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
    if precision == "int8":  # oneDNN's x86 int8 kernels; 4x fp32's lanes with VNNI, 2x without
        return device.type == "cpu" and onednn_int8_available() and cpu_class() != "generic"
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        query = getattr(torch.ops.mkldnn, _ONEDNN_SUPPORT[precision], lambda: False)
        supported = onednn_available() and bool(query())
        flags = cpu_flags()
        # oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is slower than fp32.
        return supported and (not flags or any(f in flags for f in NATIVE_CPU_FLAGS[precision]))
    return precision == "fp16" and device.type == "mps"
