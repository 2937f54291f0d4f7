"""Winograd minimal filtering (Lavin & Gray 2016) for VGG-16's 3x3 layers on this CPU, per layer.

    python benchmarks/winograd_layers.py [--batch 1 16] [--threads 2] [--out results/winograd.json]

For each 3x3 convolution shape of VGG-16 it times the fp32 plan's kernel (one oneDNN call on a
pre-packed weight, ReLU fused) against F(2x2,3x3) and F(4x4,3x3) built from PyTorch's own pieces:
the input and output transforms as strided elementwise passes over the NHWC activation, the
element-wise products as 16 or 36 batched GEMMs (``torch.bmm``, MKL). It also reports each
one's relative error against float64. This is the measurement behind the plan's choice of the
direct kernel for fp32 (benchmarks/RESULTS.md): without a kernel that fuses the transforms into
the GEMM, the transforms' memory passes cost more than the multiplies saved.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch
import torch.nn.functional as F

from verydeep.core.atomic import write_text
from verydeep.core.numerics import relative_error
from verydeep.runtime import cpu_model
from verydeep.runtime.cpu import onednn_conv, pack_conv_weight

#: (B^T, G, A^T) of F(m x m, 3 x 3), from the paper's interpolation points.
TRANSFORMS = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}  # fmt: skip
#: VGG-16's 3x3 layer shapes (in, out, size), one per distinct shape.
LAYERS = [(64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56), (256, 512, 28),
          (512, 512, 28), (512, 512, 14)]  # fmt: skip


def windows(x: torch.Tensor, m: int, dim: int, count: int, tiles: int) -> list[torch.Tensor]:
    """The ``count`` strided views of ``x`` along ``dim``: view j holds element j of every tile."""
    index = (slice(None),) * dim + (slice(None, None, m),)
    return [x.narrow(dim, j, m * (tiles - 1) + 1)[index] for j in range(count)]


def combine(matrix: list[list[float]], sources: list[torch.Tensor], outs: torch.Tensor) -> None:
    """``outs[r] = sum_j matrix[r][j] * sources[j]``, one elementwise pass per non-zero term."""
    for r, row in enumerate(matrix):
        terms = [(j, c) for j, c in enumerate(row) if c]
        torch.mul(sources[terms[0][0]], terms[0][1], out=outs[r])
        for j, c in terms[1:]:
            outs[r].add_(sources[j], alpha=c)


class Winograd:
    """F(m x m, 3 x 3) for a stride-1, pad-1 convolution with ReLU, NHWC in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, m: int) -> None:
        bt, g, at = TRANSFORMS[m]
        self.m, self.bt, self.at, self.t = m, bt, at, len(bt)
        gm = torch.tensor(g, dtype=torch.float64)
        u = torch.einsum("ar,kcrs,bs->abck", gm, weight.double(), gm)  # G g G^T per (in, out) pair
        self.u = u.reshape(self.t * self.t, weight.shape[1], weight.shape[0]).float().contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, t = self.m, self.t
        th, tw = -(-h // m), -(-w // m)
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + th * m - h, 1, 1 + tw * m - w))
        rows = torch.empty(t, n, th, xp.shape[2], c)
        combine(self.bt, windows(xp, m, 1, t, th), rows)  # B^T along the height
        v = torch.empty(t, t, n, th, tw, c)
        for a in range(t):
            combine(self.bt, windows(rows[a], m, 2, t, tw), v[a])  # ... and along the width
        k = self.u.shape[-1]
        prod = torch.bmm(v.view(t * t, -1, c), self.u).view(t, t, n, th, tw, k)
        half = torch.empty(m, t, n, th, tw, k)
        combine(self.at, list(prod), half)  # A^T on the first transform index
        y = torch.empty(m, m, n, th, tw, k)
        for p in range(m):
            combine(self.at, list(half[p]), y[p])  # ... and on the second
        y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, k)[:, :h, :w]
        return torch.relu_(y + self.bias).permute(0, 3, 1, 2)


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; ms (effective GFLOP/s), relative error vs float64")
    for n in args.batch:
        for cin, cout, size in LAYERS:
            w = torch.randn(cout, cin, 3, 3) * (2 / (9 * cin)) ** 0.5
            b = torch.randn(cout) * 0.1
            x = torch.randn(n, cin, size, size).relu().contiguous(memory_format=torch.channels_last)
            ref = F.conv2d(x.double(), w.double(), b.double(), padding=1).relu()
            packed = pack_conv_weight(w, 1, cin, size)
            kernels = {"direct": functools.partial(onednn_conv, x, packed, b, 1, relu=True)}
            for m in TRANSFORMS:
                kernels[f"F({m}x{m},3x3)"] = functools.partial(Winograd(w, b, m), x)
            flops = 2 * n * cin * cout * 9 * size * size
            row = {"batch": n, "in": cin, "out": cout, "size": size}
            for name, fn in kernels.items():
                s = best_of(fn, args.repeats)
                row[name] = {
                    "ms": round(s * 1e3, 2),
                    "gflops": round(flops / s / 1e9),
                    "rel_error": relative_error(fn(), ref),
                }
            rows.append(row)
            print(f"batch {n:>2} {cin:>3}->{cout:<3} @{size:<3} " + "  ".join(
                f"{k} {v['ms']:.1f} ({v['gflops']}) {v['rel_error']:.1e}" for k, v in row.items() if isinstance(v, dict)
            ), flush=True)  # fmt: skip
    if args.out:
        write_text(
            args.out, json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
