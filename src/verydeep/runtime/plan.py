"""The plan: one table of choices (compute dtype, kernels, cache blocking, graphs, compile) per device.

:func:`make_plan` decides from the device's *native* capabilities
(:mod:`verydeep.runtime.capabilities`) and records why in :attr:`Plan.notes`; the executor only
follows it. The constants below are the measurements the choices rest on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from verydeep.core.defaults import check_inference_precision
from verydeep.runtime.capabilities import (
    cpu_class,
    int8_dot_product,
    native,
    onednn_available,
    onednn_linear_available,
)
from verydeep.runtime.cuda import cudnn_conv_relu_available, triton_available
from verydeep.runtime.winograd import winograd_kernel

#: Largest relative logit error (max |a - b| / max |b|) each precision is held to.
#: int8's bound is for the logits of a net whose activations were calibrated on images like the
#: input (measured on VGG-16 with random weights: 2.8e-2 to 3.8e-2 when calibrated on other
#: images than the input; onnxruntime's static int8 on the same images: 2.9e-2 to 1.1e-1).
TOLERANCE: dict[str, float] = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 1e-2, "int8": 0.1}
#: CUDA graphs kept per view; beyond this many input shapes, calls run uncaptured.
MAX_GRAPHS = 8
#: Cache blocking on CPU: the leading stages run on as many images at a time as keep conv1's
#: output under this many bytes (measured best on a Sapphire Rapids core: 2 images in bf16,
#: 1 in fp32 at 224; larger budgets fall out of the core's L2 and are slower).
CACHE_BYTES = 16 << 20
#: Stages (conv blocks ending in a pool) that run cache-blocked; the rest run on the whole batch.
#: 2 cores, batch 16, bf16: 53 img/s blocking none, 76-87 blocking three; blocking four or five
#: stages was within +-10% of three, better in one run and worse in three (1 and 2 threads).
BLOCKED_STAGES = 3
#: The GPU plan's kernel choices, measured on an H200 at batch 256 in bf16 (benchmarks/gpu_layers.py,
#: benchmarks/RESULTS.md): cuDNN's fused conv+bias+ReLU is 1.3-3x faster than conv2d then relu_;
#: conv1_1 with its 3 input channels zero-padded to 16 takes a tensor-core kernel (5.1 -> 1.6 ms);
#: ATen's CUDA max pool also writes int64 indices; a Triton kernel reads and writes once (2.4 -> 0.5 ms
#: for pool1); torch.compile'd pooling is as fast for one shape but recompiles per shape.
CUDA_PLAN: dict[str, Any] = {"conv": "cudnn-relu", "pool": "triton", "pad_channels": 16, "relu_after_pool": False}
#: What a CPU lacks when a reduced precision is not native there (for the plan's note).
_MISSING_ON_CPU = {"bf16": "no AMX/avx512_bf16", "fp16": "no AMX-FP16", "int8": "no oneDNN int8 kernels for it"}


#: fp32 3x3 convolutions on CPU: Winograd F(4x4,3x3), or F(2x2,3x3) on maps too small for it
#: (:func:`.winograd.tile_size`). 2 cores of an Ice Lake-SP, VGG-16's 3x3 layers against oneDNN's
#: direct kernel: F(4x4) 1.4-3.1x at batch 16 and 1.6-2.8x at batch 1, except one 14x14 conv5
#: map (0.66x; F(2x2) 1.03x); VGG-16's logits within 3e-6 of float64 (benchmarks/RESULTS.md).
WINOGRAD: tuple[int, ...] = (4, 2)


@dataclass(frozen=True)
class CpuPlan:
    """The choices that depend on the CPU class (:data:`~verydeep.runtime.capabilities.CPU_CLASSES`)."""

    measured_on: str  # the CPU the values were measured on, or why they are the defaults
    cache_bytes: int = CACHE_BYTES
    blocked_stages: int = BLOCKED_STAGES
    winograd: tuple[int, ...] = WINOGRAD  # fp32 3x3 layers: the Winograd tile sizes used, () = direct


#: Per CPU class. Values not measured on a class are the defaults, and say so: cache blocking
#: depends on the L2 size (1.25-2 MiB per core on every class listed), not on the instruction set;
#: the Winograd kernel is compiled for the machine's own vector width. ``generic`` (ARM, x86
#: without AVX2) has no Winograd: the kernel calls the BLAS of PyTorch's x86 builds.
CPU_PLANS: dict[str, CpuPlan] = {
    "amx": CpuPlan("Sapphire Rapids, 2 cores (bf16 and fp32)"),
    "avx512-bf16": CpuPlan("not measured: the defaults"),
    "avx512-vnni": CpuPlan("Ice Lake-SP, 2 cores (fp32, Winograd and int8)"),
    "avx512": CpuPlan("not measured: the defaults"),
    "avx2-vnni": CpuPlan("not measured: the defaults"),
    "avx2": CpuPlan("not measured: the defaults"),
    "generic": CpuPlan("not measured: the defaults", winograd=()),
}


@dataclass(frozen=True)
class Plan:
    """How a :class:`~verydeep.runtime.executor.FastVGG` executes; printed by ``verydeep bench``
    and kept on the module."""

    device: str
    precision: str  # what was asked for
    dtype: str  # what the convolutions compute in
    conv: str  # "onednn-prepacked" | "cudnn-relu" (conv+ReLU fused by cuDNN) | "aten"
    linear: str  # "onednn-prepacked" | "aten"
    pool: str  # "nhwc-maximum" (even sizes; odd: ATen) | "triton" (GPU) | "compiled" (torch.compile'd) | "aten"
    channels_last: bool
    cache_bytes: int  # cache blocking budget of the leading stages; 0 = off
    cuda_graphs: bool
    compile: bool
    pad_channels: int = 0  # conv1_1's 3 input channels zero-padded to this many (tensor-core friendly)
    relu_after_pool: bool = False  # conv -> pool -> ReLU (exact: max and ReLU commute), 4x less ReLU
    isa: str = ""  # the CPU class the plan was chosen for ("" on other devices)
    blocked_stages: int = BLOCKED_STAGES
    int8_levels: int = 0  # int8: the top activation code (255, or 127 without an int8 dot product)
    winograd: tuple[int, ...] = ()  # 3x3 convs: Winograd tile sizes m of F(m x m, 3 x 3), largest first; () = direct
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class _Kernels:
    """The device-dependent part of a plan: each field is the :class:`Plan` field of that name."""

    conv: str = "aten"
    linear: str = "aten"
    pool: str = "aten"
    cache_bytes: int = 0
    pad_channels: int = 0
    relu_after_pool: bool = False
    isa: str = ""
    blocked_stages: int = BLOCKED_STAGES
    int8_levels: int = 0
    winograd: tuple[int, ...] = ()


def _compute_dtype(precision: str, dev: torch.device, fallback: bool, notes: list[str]) -> str:
    """``precision`` where the device computes it natively (or ``fallback`` is off), else fp32."""
    if precision == "fp32" or native(precision, dev):
        return precision
    if not fallback and precision != "int8":  # int8 has no emulation to fall back on
        notes.append(f"{precision} is not native on this {dev.type}: emulated, slower than fp32")
        return precision
    why = _MISSING_ON_CPU[precision] if dev.type == "cpu" else f"{dev.type} has no fast {precision}"
    notes.append(f"{precision} is not native on this {dev.type} ({why}): computing in fp32, faster here and exact")
    return "fp32"


def _winograd(cpu: CpuPlan, dtype: str, wanted: bool | None, notes: list[str]) -> tuple[int, ...]:
    """The Winograd tile sizes for fp32 3x3 layers: the class's, when the kernel could be built."""
    if dtype != "fp32" or wanted is False or not cpu.winograd:
        return ()
    kernel, why = winograd_kernel()
    if kernel is None:
        notes.append(f"{why}: oneDNN's direct kernel for the 3x3 layers")
        return ()
    return cpu.winograd


def _cpu_kernels(
    dev: torch.device, dtype: str, compile: bool, cache_bytes: int | None, winograd: bool | None, notes: list[str]
) -> _Kernels:
    if compile and dtype == "int8":
        notes.append("torch.compile is not used for int8: oneDNN's int8 kernels run directly")
    elif compile:
        notes.append("torch.compile: inductor packs its own weights (freezing); kernels cached")
        return _Kernels()
    if not onednn_available():
        notes.append("oneDNN is not available in this PyTorch build: ATen convolutions")
    isa = cpu_class()
    cpu = CPU_PLANS[isa]
    budget = cpu.cache_bytes if cache_bytes is None else max(0, int(cache_bytes))
    if dtype == "int8":
        levels = 255 if int8_dot_product() else 127
        if levels < 255:
            notes.append("int8: no VNNI/AMX int8 dot product, so activations get 7 bits (16-bit sums would saturate)")
        return _Kernels("onednn-int8", "onednn-int8", "nhwc-maximum", budget, isa=isa,
                        blocked_stages=cpu.blocked_stages, int8_levels=levels)  # fmt: skip
    prepack = onednn_available() and native(dtype, dev)
    return _Kernels(
        conv="onednn-prepacked" if prepack else "aten",
        linear="onednn-prepacked" if prepack and dtype != "fp32" and onednn_linear_available() else "aten",
        pool="nhwc-maximum",
        cache_bytes=budget,
        isa=isa,
        blocked_stages=cpu.blocked_stages,
        winograd=_winograd(cpu, dtype, winograd, notes) if prepack else (),
    )


def _cuda_kernels(
    dev: torch.device, dtype: str, compile: bool, cache_bytes: int | None, winograd: bool | None, notes: list[str]
) -> _Kernels:
    if compile:
        return _Kernels()
    conv, pool = CUDA_PLAN["conv"], CUDA_PLAN["pool"]
    if conv == "cudnn-relu" and not cudnn_conv_relu_available():
        conv = "aten"
    if pool == "compiled" and not hasattr(torch, "compile"):
        pool = "aten"
    if pool == "triton" and not triton_available():
        pool = "aten"
        notes.append("Triton is not available: ATen's max pool (slower: it also writes indices)")
    return _Kernels(
        conv=conv, pool=pool, pad_channels=CUDA_PLAN["pad_channels"], relu_after_pool=CUDA_PLAN["relu_after_pool"]
    )


def _other_kernels(
    dev: torch.device, dtype: str, compile: bool, cache_bytes: int | None, winograd: bool | None, notes: list[str]
) -> _Kernels:
    return _Kernels()


#: Device type -> how its kernels are chosen (ATen's everywhere else, e.g. MPS).
_KERNELS: dict[str, Callable[[torch.device, str, bool, int | None, bool | None, list[str]], _Kernels]] = {
    "cpu": _cpu_kernels,
    "cuda": _cuda_kernels,
}


def make_plan(
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    *,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    fallback: bool = True,
    cache_bytes: int | None = None,
    winograd: bool | None = None,
) -> Plan:
    """Decide the execution for ``precision`` on ``device``.

    ``fallback=True`` computes in fp32 when ``precision`` is not native on the device (faster
    there, and exact); ``False`` computes in the requested dtype regardless (for testing the
    reduced-precision path on any machine). ``compile=None`` means "where it pays off", which
    is nowhere we measured: on CPU the pre-packed oneDNN plan beat inductor's freezing output,
    on GPU the fused cuDNN + Triton plan beat the compiled net (``benchmarks/RESULTS.md``).
    ``cache_bytes`` overrides :data:`CACHE_BYTES` (0 turns cache blocking off). ``winograd=False``
    keeps oneDNN's direct kernel for fp32 3x3 layers; ``None`` uses :data:`WINOGRAD` where the
    CPU class has it and the kernel could be built (both are exact to the fp32 budget).
    """
    check_inference_precision(precision)
    dev = torch.device(device)
    notes: list[str] = []
    dtype = _compute_dtype(precision, dev, fallback, notes)
    kernels = _KERNELS.get(dev.type, _other_kernels)(dev, dtype, bool(compile), cache_bytes, winograd, notes)
    cuda = dev.type == "cuda"
    if cuda_graphs and not cuda:
        notes.append("CUDA graphs need a CUDA device: off")
    if cuda and dtype == "fp32":
        notes.append("fp32 on GPU: TF32 disabled inside the fast path so results stay exact")
    return Plan(
        device=str(dev),
        precision=precision,
        dtype=dtype,
        channels_last=dev.type in ("cpu", "cuda"),
        cuda_graphs=cuda if cuda_graphs is None else bool(cuda_graphs and cuda),
        compile=bool(compile) and dtype != "int8",
        notes=tuple(notes),
        **asdict(kernels),
    )


def effective_precision(precision: str, device: str | torch.device = "cpu") -> tuple[str, str]:
    """(the precision the fast path computes ``precision`` requests in on ``device``, and why
    when that differs): bf16 on a CPU without native bf16 is computed in fp32, say."""
    plan = make_plan(precision, device)
    why = next((n for n in plan.notes if n.startswith(f"{precision} is not native")), "")
    return plan.dtype, why
