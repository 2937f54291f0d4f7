"""The GPU plan's pieces: the Triton max pool, cuDNN's fused conv+ReLU, the flags, CUDA graphs.

Each is a measured choice (``benchmarks/gpu_layers.py``, ``benchmarks/RESULTS.md``): ATen's CUDA
max pool also writes int64 indices, 4x the traffic of a kernel that reads each input once;
cuDNN's fused conv+bias+ReLU is 1.3-3x the separate kernels; a forward is ~40 launches, which a
captured CUDA graph replays as one. Triton is imported on first use only, so this module loads
(and the CPU plan runs) without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch


# -- the Triton max pool ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _triton_pool_kernel() -> tuple[Any, Any] | None:
    """(triton, the 2x2/2 round-up max pool kernel for channels-last tensors); None without Triton."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or no working toolchain
        return None

    @triton.jit
    def _max_pool_2x2_nhwc(x_ptr, y_ptr, H, W, OH, OW, C: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one output row (n, oh): OW * C contiguous values
        n = row // OH
        oh = row - n * OH
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = j < OW * C
        ow = j // C
        src = x_ptr + (n * H + 2 * oh) * W * C + j + ow * C  # input column 2 * ow, same channel
        right = mask & (2 * ow + 1 < W)  # round-up pooling: the last window may hang over
        below = 2 * oh + 1 < H
        a = tl.load(src, mask=mask, other=float("-inf"))
        b = tl.load(src + C, mask=right, other=float("-inf"))
        c = tl.load(src + W * C, mask=mask & below, other=float("-inf"))
        d = tl.load(src + W * C + C, mask=right & below, other=float("-inf"))
        tl.store(y_ptr + row * OW * C + j, tl.maximum(tl.maximum(a, b), tl.maximum(c, d)), mask=mask)

    return triton, _max_pool_2x2_nhwc


def triton_available() -> bool:
    """Whether Triton imports here (the GPU plan's max pool needs it)."""
    return _triton_pool_kernel() is not None


def triton_max_pool(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Caffe's 2x2/2 round-up max pool of a channels-last tensor in one Triton kernel: each
    input read once, the output written once, no indices (ATen's CUDA kernel writes int64
    indices too). Channels-last out."""
    found = _triton_pool_kernel()
    if found is None:
        raise RuntimeError("triton_max_pool needs Triton, which does not import here")
    triton, kernel = found
    n, c, h, w = x.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    kernel[(n * oh, triton.cdiv(ow * c, block))](x, y, h, w, oh, ow, C=c, BLOCK=block)
    return y


# -- cuDNN -----------------------------------------------------------------------------------------
def cudnn_conv_relu_available() -> bool:
    """Whether this PyTorch build has cuDNN's fused conv+bias+ReLU."""
    return hasattr(torch, "cudnn_convolution_relu")


def cudnn_conv_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """A stride-1 convolution, its bias and a ReLU in one cuDNN call."""
    return torch.cudnn_convolution_relu(x, weight, bias, [1, 1], [padding, padding], [1, 1], 1)


@contextmanager
def tf32_off(enabled: bool = True) -> Iterator[None]:
    """Inside: cuDNN convolutions and cuBLAS matmuls in true fp32 (PyTorch's default lets cuDNN
    convolve fp32 in TF32, a ~1e-3 error). ``enabled=False`` leaves the flags alone."""
    if not enabled:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def cuda_flags(*, exact: bool) -> Iterator[None]:
    """cuDNN autotuning for fixed shapes; with ``exact`` (fp32) TF32 off so results stay exact."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with tf32_off(exact):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved


# -- CUDA graphs -----------------------------------------------------------------------------------
class CudaGraphs:
    """Replays a captured CUDA graph per input shape: one launch instead of ~40 per forward.

    The first call with a new shape warms up on a side stream (which also lets cuDNN pick its
    algorithms) and captures; later calls copy the input into the captured buffer and replay.
    The output is cloned so a later call cannot overwrite what the caller holds. Beyond
    ``max_shapes`` input shapes, calls run uncaptured.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_shapes: int) -> None:
        self.fn = fn
        self.max_shapes = max_shapes
        self.graphs: dict[tuple[Any, ...], tuple[torch.Tensor, Any, torch.Tensor]] = {}
        self.pool: Any = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, x.stride())
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_shapes:
                return self.fn(x)
            entry = self.graphs[key] = self._capture(x)
        static_in, graph, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        return static_in, graph, static_out
