"""Winograd minimal filtering for the 3x3 convolutions of the fp32 CPU plan (Lavin & Gray 2016).

F(m x m, 3 x 3) computes an m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2
multiplies instead of 9 m^2: 2.25x fewer for F(2x2), 4x fewer for F(4x4). VGG-16 is 99% 3x3
convolutions and the direct kernels already run near the CPU's FMA peak, so cutting the
multiplies is the only way to be faster and stay in fp32.

The transforms only pay when they never go to memory, so the kernel (``winograd.c``) fuses them
with the GEMMs per block of tiles: each thread transforms a block's inputs into its own
workspace, multiplies the (m+2)^2 slices by the pre-transformed weights with the BLAS sgemm
PyTorch ships (MKL), and writes the output tiles with bias and ReLU. Neither oneDNN (as PyTorch
exposes it) nor MKL offers such a kernel, so it is compiled here, once per machine, with the C
compiler PyTorch's own ``torch.compile`` also needs; without one the plan keeps oneDNN's direct
kernel and says why.

Exactness (``tests/test_winograd.py``, VGG-16's layer shapes against float64): F(2x2) is more
exact than the direct kernel (3e-7 to 7e-7 per layer, direct 7e-7 to 2.3e-6); F(4x4)'s larger
interpolation points cost up to 1.6e-5 per layer relative to the layer's largest output, but
VGG-16's logits stay within 3e-6 of float64, inside the fp32 budget of 1e-5.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from verydeep.core.atomic import atomic_path, write_text
from verydeep.core.paths import home
from verydeep.errors import VerydeepError
from verydeep.runtime.capabilities import cpu_flags

#: G of F(m x m, 3 x 3) (the weight transform, applied here in float64 once per layer); the
#: kernel holds B^T and A^T. Interpolation points 0, +-1 (m=2) and 0, +-1, +-2 (m=4), infinity.
G: dict[int, tuple[tuple[float, ...], ...]] = {
    2: ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
}  # fmt: skip
#: The kernel transforms this many channels at a time; layers whose channels are not a multiple
#: keep the direct kernel (in VGG only conv1_1, with its 3 input channels).
CHANNEL_BLOCK = 16
#: Tiles per block (one sgemm's rows). 2 cores of an Ice Lake-SP, VGG-16's layers at batch 16:
#: 96 to 192 within 5% of each other, 64 up to 15% slower on the 512-channel layers (U is
#: streamed once per block), 256 slower on the 28x28 ones.
MAX_BLOCK_TILES = 128
#: A tile size is used for maps with at least this many of its tiles per image, else the next
#: smaller one. The choice depends on the map alone, not on the batch or the thread count, so an
#: image's result is the same bits in any batch (each tile's GEMM row is computed the same way
#: whatever the block). Below it the GEMMs are too short: one 14x14 image on 2 threads of an Ice
#: Lake-SP, F(4x4)'s 16 tiles ran at 0.66x the direct kernel and F(2x2)'s 49 at 1.03x; at batch
#: 16 F(4x4) would be 2.2x there and F(2x2) is 1.6x, 3% of the net's time given up for that.
MIN_TILES = 32
#: How the kernel is built: -march=native for the machine it runs on (the library is cached per
#: CPU), OpenMP from the runtime PyTorch loaded, no -ffast-math (sums must not be reassociated).
CFLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
#: Environment variables that limit PyTorch's libraries to one instruction set (with
#: :func:`use_march`, an AVX2 machine can be approximated on an AVX-512 one for benchmarking).
ISA_LIMITS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
_SOURCE = "winograd.c"
#: The compiled entry point ``verydeep_winograd`` (see ``winograd.c`` for its arguments).
Kernel = Callable[..., int]


@dataclass
class _Library:
    fn: Kernel | None = None
    why_not: str = ""
    tried: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_LIB = _Library()


def use_march(march: str) -> None:
    """Build the kernel for ``-march=<march>`` instead of the machine's own (before its first use;
    the cache key covers the flags)."""
    global CFLAGS
    CFLAGS = tuple(f"-march={march}" if f.startswith("-march=") else f for f in CFLAGS)


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def _build(source: bytes, compiler: str, target: Path) -> None:
    """Compile ``source`` into the shared library ``target`` (atomically: a concurrent build of the
    same key just replaces it with identical bytes)."""
    lib = _torch_lib()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        with atomic_path(target) as out:
            cmd = [compiler, *CFLAGS, str(src), "-o", str(out), f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise OSError(f"{Path(compiler).name} failed: {last}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load() -> None:
    text = resources.files("verydeep.runtime").joinpath(_SOURCE).read_bytes()
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256(
        b"\0".join([text, " ".join(CFLAGS).encode(), compiler.encode(), torch.__version__.encode(),
                    str(_torch_lib()).encode(), " ".join(sorted(cpu_flags())).encode()])
    ).hexdigest()[:16]  # fmt: skip
    target = home() / "kernels" / f"winograd-{key}.so"
    digest = target.with_suffix(".sha256")
    # dlopen of a damaged library can kill the process (SIGBUS), so a cached build is loaded only
    # if its bytes are the ones recorded when it was built.
    if not (target.is_file() and digest.is_file() and digest.read_text().strip() == _sha256(target)):
        _build(text, compiler, target)
        write_text(digest, _sha256(target))
    library = ctypes.CDLL(str(target))
    fn = library.verydeep_winograd
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 4, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p, *[ctypes.c_int] * 3, ctypes.c_void_p]  # fmt: skip
    _LIB.fn = fn


def winograd_kernel() -> tuple[Kernel | None, str]:
    """(the compiled kernel, "") or (None, why it is not available); built once per process and
    cached under ``<verydeep home>/kernels`` per source, compiler, PyTorch and CPU."""
    with _LIB.lock:
        if not _LIB.tried:
            _LIB.tried = True
            if not torch.backends.mkldnn.is_available() or "avx2" not in cpu_flags():
                _LIB.why_not = "the Winograd kernel is built for x86 CPUs with AVX2 and PyTorch's MKL"
            else:
                try:
                    _load()
                except (OSError, VerydeepError, AttributeError, subprocess.SubprocessError) as e:
                    _LIB.why_not = f"the Winograd kernel could not be built: {e}"
        return _LIB.fn, _LIB.why_not


def winograd_applies(weight_shape: tuple[int, ...], stride: int, padding: int, dilation: int, groups: int) -> bool:
    """Whether a conv layer is one the kernel takes: 3x3, stride 1, pad 1, channels in blocks of 16."""
    k, c, kh, kw = weight_shape
    return (kh, kw, stride, padding, dilation, groups) == (
        3,
        3,
        1,
        1,
        1,
        1,
    ) and c % CHANNEL_BLOCK == k % CHANNEL_BLOCK == 0


def tile_size(h: int, w: int, sizes: tuple[int, ...] = (4, 2)) -> int:
    """The largest of ``sizes`` with :data:`MIN_TILES` tiles in an h x w map, else the smallest."""
    for m in sorted(sizes, reverse=True):
        if math.ceil(h / m) * math.ceil(w / m) >= MIN_TILES:
            return m
    return min(sizes)


def transform_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """U = G g G^T for every (output, input) filter pair, computed in float64 and rounded once,
    laid out [(m+2)^2][in][out] for the kernel's GEMMs."""
    g = torch.tensor(G[m], dtype=torch.float64)
    u = torch.einsum("ar,kcrs,bs->abck", g, weight.detach().double().cpu(), g)
    return u.reshape((m + 2) ** 2, weight.shape[1], weight.shape[0]).float().contiguous()


class _Workspace(threading.local):
    """Each calling thread's scratch for the kernel's V and M blocks, grown as needed."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def get(self, floats: int) -> torch.Tensor:
        if self.buffer.numel() < floats:
            self.buffer = torch.empty(floats)
        return self.buffer


_WORKSPACE = _Workspace()


class Winograd:
    """A 3x3 convolution layer's Winograd form: its transformed weights per tile size (made on
    first use) and the call. Input and output are channels-last float32 on the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...] = (4, 2)) -> None:
        if not sizes or any(m not in G for m in sizes):
            raise ValueError(f"Winograd tile sizes must be among {sorted(G)}, got {sizes}")
        self.sizes = tuple(sizes)
        self.weight = weight.detach().float().contiguous()
        self.bias = (bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])).contiguous()
        self.transformed: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def weights(self, m: int) -> torch.Tensor:
        with self._lock:
            if m not in self.transformed:
                self.transformed[m] = transform_weight(self.weight, m)
            return self.transformed[m]

    def __call__(self, x: torch.Tensor, *, relu: bool, m: int | None = None) -> torch.Tensor:
        fn, why = winograd_kernel()
        if fn is None:
            raise RuntimeError(why)
        n, c, h, w = x.shape
        k = self.weight.shape[0]
        if c != self.weight.shape[1] or x.dtype != torch.float32:
            raise ValueError(
                f"Winograd conv expects float32 input with {self.weight.shape[1]} channels, got {c} {x.dtype}"
            )
        x = x.contiguous(memory_format=torch.channels_last)
        threads = torch.get_num_threads()
        m = m or tile_size(h, w, self.sizes)
        u = self.weights(m)
        tiles = n * math.ceil(h / m) * math.ceil(w / m)
        block = max(2, min(MAX_BLOCK_TILES, math.ceil(tiles / threads)))
        work = _WORKSPACE.get(threads * (m + 2) ** 2 * block * (c + k))
        y = torch.empty(n, k, h, w, memory_format=torch.channels_last)
        rc = fn(x.data_ptr(), n, h, w, c, u.data_ptr(), k, self.bias.data_ptr(), int(relu), y.data_ptr(), m, block,
                threads, work.data_ptr())  # fmt: skip
        if rc != 0:
            raise ValueError(f"Winograd kernel refused its arguments ({rc}): {tuple(x.shape)} -> {k} channels, m={m}")
        return y
