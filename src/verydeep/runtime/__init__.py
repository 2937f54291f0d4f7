"""``model.optimized()``: the fastest correct execution of a VGG for the device at hand.

The exact path (``VGG.forward``) runs PyTorch's generic eager modules in NCHW. For inference
most of that time is spent in ways that are not the arithmetic: activations are reordered to
the convolution library's preferred layout and back at every layer, every call re-lays out the
conv weights, ReLU is a separate pass over memory, the first stages stream activations far
larger than the caches, and precision is fixed at fp32 even where the processor computes bf16
several times faster. :func:`optimize` plans once and removes those:

* **Plan** (:func:`make_plan`): a table decides the compute dtype, the conv and fc backends,
  cache blocking, CUDA graphs and ``torch.compile`` from the device's *native* capabilities. A
  requested precision the device cannot compute natively (bf16 on a CPU without
  AMX/avx512_bf16) falls back to fp32, which is then both faster and exact; the plan records
  that in ``notes``.
* **CPU**: activations stay channels-last. In fp32 every 3x3 convolution whose channels come
  in blocks of 16 (in VGG all but conv1_1) runs Winograd minimal filtering
  (:mod:`.winograd`): F(4x4,3x3), 4x fewer multiplies, or F(2x2,3x3) on maps too small for it,
  in a kernel that fuses the input and output transforms, bias and ReLU with MKL's GEMMs per
  block of tiles, compiled once per machine; the logits stay within 1e-5 of the exact path
  (measured: a few 1e-7 to 3e-6). The other convolutions are one oneDNN call each, with the
  weights pre-packed once into oneDNN's blocked layout and the ReLU fused as a post-op (what
  ``torch.compile`` with freezing emits, without its compile time or cache). The first three
  stages (224..56 pixels, where an activation is MBs per image) run a few images at a time (as
  many as keep conv1's output within :data:`CACHE_BYTES`: 2 in bf16, 1 in fp32 at 224) so
  activations stay in cache and every allocation is small enough for the allocator to reuse
  instead of page-faulting fresh memory (*cache blocking*); the rest runs on the whole batch. 2x2
  max pooling of even sizes is two ``maximum`` passes over the NHWC view (about twice ATen's
  channels-last kernel in bf16). In bf16/fp16 the fc weights are pre-packed for oneDNN with
  the ReLU fused; in fp32 fc layers are MKL GEMMs on the model's own tensors (no copy).
* **int8** (CPU, x86): static quantization calibrated on the caller's images
  (:mod:`.int8`): per-channel int8 weights, per-tensor uint8 activations, oneDNN's int8 conv
  and fc kernels with bias, ReLU and requantization fused; activations stay uint8 up to fc8.
  The CPU's class (:data:`~.capabilities.CPU_CLASSES`, from its flags) picks the plan's row in
  :data:`~.plan.CPU_PLANS` and gives int8 activations 7 bits where there is no VNNI/AMX.
* **GPU**: channels-last bf16/fp16 weights converted once; each conv+bias+ReLU is one fused
  cuDNN call (``cudnn_convolution_relu``, 1.3-3x the separate kernels); conv1_1's 3 input
  channels are zero-padded to 16 so it gets a tensor-core kernel (exact: zeros meet zeros);
  max pooling is a small Triton kernel (ATen's CUDA pool also writes int64 indices, 4x the
  traffic); cuDNN autotuning; a CUDA graph per input shape so the ~40 launches of one forward
  cost one. In fp32, TF32 is off inside the fast path, so it stays exact.
* **Dense view**: fc6 is applied as a GEMM over 7x7 patches of pool5 (``unfold``) instead of a
  7x7 convolution, so the 103M fc6 weights are never re-laid out or copied.
* ``compile=True`` instead runs a plain channels-last module through ``torch.compile`` with
  inductor's freezing (kernels cached under :func:`compile_cache_dir`); it is opt-in because it
  did not pay off: 0.75x the plan's speed in bf16 on a 2-core Sapphire Rapids (0.93x in fp32)
  after a 3-14 s first call, 0.81x on an H200 (``benchmarks/RESULTS.md``).

The returned :class:`FastVGG` takes the same Caffe-space input and returns the same float32
logits as the model (``.dense()`` the same score maps, ``.features()`` the same taps). It runs
under ``torch.inference_mode`` and snapshots the weights: call ``optimized()`` again after
changing the model.

The modules, split by what each decides or runs (each imports only modules listed before it):

- :mod:`.capabilities`: what the device computes natively (:func:`cpu_flags`, :func:`native`).
- :mod:`.cuda`: the GPU's pieces (:func:`triton_max_pool`, cuDNN's fused conv+ReLU, the TF32 and
  autotuning flags, :class:`~verydeep.runtime.cuda.CudaGraphs`); Triton is imported on first use.
- :mod:`.cpu`: the CPU's pieces (oneDNN weight packing and fused calls, :func:`max_pool_nhwc`).
- :mod:`.winograd`: the fp32 3x3 Winograd kernel (``winograd.c``, built on first use) and its
  weight transform.
- :mod:`.int8`: int8 calibration (:class:`~.int8.Calibration`, :func:`~.int8.calibrate`).
- :mod:`.plan`: :class:`Plan`, :func:`make_plan` and the measurements behind its choices.
- :mod:`.source`: the model read through a typed view (the runtime sits below ``models``).
- :mod:`.compiled`: the ``torch.compile`` variant and :func:`compile_cache_dir`.
- :mod:`.steps`: the model's layers as steps with prepared weights, and the kernels that run them.
- :mod:`.executor`: :class:`FastVGG` (cache blocking, the dense view, taps, graphs) and :func:`optimize`.

Splitting per device keeps each backend's kernels, and the measurements that chose them, in one
place; the executor is the same for every plan.
"""

from verydeep.runtime.capabilities import cpu_class, cpu_flags, cpu_model, native, onednn_available
from verydeep.runtime.compiled import compile_cache_dir
from verydeep.runtime.cpu import max_pool_nhwc
from verydeep.runtime.cuda import tf32_off, triton_max_pool
from verydeep.runtime.executor import FastDenseVGG, FastVGG, optimize
from verydeep.runtime.int8 import CALIBRATION_IMAGES, Calibration
from verydeep.runtime.plan import (
    BLOCKED_STAGES,
    CACHE_BYTES,
    CPU_PLANS,
    CUDA_PLAN,
    MAX_GRAPHS,
    TOLERANCE,
    WINOGRAD,
    Plan,
    effective_precision,
    make_plan,
)
from verydeep.runtime.winograd import Winograd, winograd_kernel

__all__ = [
    "BLOCKED_STAGES",
    "CACHE_BYTES",
    "CALIBRATION_IMAGES",
    "CPU_PLANS",
    "CUDA_PLAN",
    "MAX_GRAPHS",
    "TOLERANCE",
    "WINOGRAD",
    "Calibration",
    "FastDenseVGG",
    "FastVGG",
    "Plan",
    "Winograd",
    "compile_cache_dir",
    "cpu_class",
    "cpu_flags",
    "cpu_model",
    "effective_precision",
    "make_plan",
    "max_pool_nhwc",
    "native",
    "onednn_available",
    "optimize",
    "tf32_off",
    "triton_max_pool",
    "winograd_kernel",
]
