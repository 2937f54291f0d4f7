"""Winograd minimal filtering (Lavin & Gray 2016) for VGG-16's 3x3 layers on this CPU, per layer.

    python benchmarks/winograd_layers.py [--batch 1 16] [--threads 2] [--out results/winograd.json]

For each 3x3 convolution shape of VGG-16 it times the fp32 plan's two kernels: oneDNN's direct
convolution on a pre-packed weight (ReLU fused) and verydeep's fused Winograd kernel
(``verydeep.runtime.winograd``) with F(2x2,3x3) and with F(4x4,3x3), and reports each one's
relative error against float64. These are the measurements behind the plan's tile-size rule
(``MIN_TILES``) and ``MAX_BLOCK_TILES`` (benchmarks/RESULTS.md). With ``--march haswell`` and
``MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` both kernels are limited to AVX2 + FMA
(a proxy for an AVX2 CPU on an AVX-512 one).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from verydeep.core.atomic import write_text
from verydeep.core.numerics import relative_error
from verydeep.runtime import cpu_model, winograd
from verydeep.runtime.cpu import onednn_conv, pack_conv_weight
from verydeep.runtime.winograd import Winograd, winograd_kernel

#: VGG-16's 3x3 layer shapes (in, out, size), one per distinct shape.
LAYERS = [(64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56), (256, 512, 28),
          (512, 512, 28), (512, 512, 14)]  # fmt: skip


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
    ap.add_argument("--march", help="build the kernel for this -march instead of native (an AVX2 proxy: haswell)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.march:
        winograd.use_march(args.march)
    if args.threads:
        torch.set_num_threads(args.threads)
    if winograd_kernel()[0] is None:
        print(winograd_kernel()[1], file=sys.stderr)
        return 1
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
            wino = Winograd(w, b)
            for m in (2, 4):
                wino.weights(m)
                kernels[f"F({m}x{m},3x3)"] = functools.partial(wino, x, relu=True, m=m)
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
            args.out,
            json.dumps(
                {
                    "cpu": cpu_model(),
                    "threads": torch.get_num_threads(),
                    "cflags": " ".join(winograd.CFLAGS),
                    "environment": {k: os.environ[k] for k in winograd.ISA_LIMITS if k in os.environ},
                    "rows": rows,
                },
                indent=2,
            ),  # fmt: skip
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
