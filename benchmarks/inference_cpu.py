"""Full-size VGG-16 inference on the CPU: ``verydeep bench`` with RESULTS.md's scenarios, saved.

    python benchmarks/inference_cpu.py [--threads 2] [--repeats 5] [--compile] [--out results/cpu.json]

Classic 224x224 at batch 1 and 16 and dense at Q=384 (one 384x512 image), fp32, bf16 and int8
fast paths against torchvision's eager fp32 VGG-16, onnxruntime (fp32, and its static int8
calibrated on the same images) and OpenCV, interleaved in one process (see ``verydeep.bench``).
``--calibration DIR`` calibrates int8 on real photos instead of generated images. ``--compile``
adds the ``torch.compile`` (freezing) variant, whose first call (compilation) is reported as
``first_call_s``. The allocator matters for the eager baseline (glibc returns large activations
to the OS and page-faults them back in every call); to see it, run once more with
``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`` in the environment
(RESULTS.md has both).

An AVX2 machine can be approximated on an AVX-512 one (a proxy, not a measurement of one):
``MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` limit PyTorch's
libraries and ``--march haswell`` the Winograd kernel to AVX2 + FMA; onnxruntime and OpenCV
have no such switch and keep AVX-512, so they are stronger peers than on a real AVX2 CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from verydeep.bench import BenchOptions, cpu_busy, format_report, run_bench
from verydeep.core.atomic import write_text
from verydeep.runtime import winograd

#: Environment variables that change what is measured, recorded with the report.
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16", "int8"])
    ap.add_argument("--calibration", help="int8: a folder of calibration images (default: generated)")
    ap.add_argument("--dense", type=int, default=384)
    ap.add_argument("--baselines", default="torchvision,onnxruntime,opencv")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--direct", action="store_true", help="also fp32 with oneDNN's direct 3x3 kernels (no Winograd)")
    ap.add_argument("--arch", default="D")
    ap.add_argument("--march", help="build the Winograd kernel for this -march instead of native (see AVX2 below)")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for the other processes to leave the CPUs idle (<10%%), and "
        "run again (up to 3 tries) when they used >15%% of the CPUs during the timing or after it",
    )
    args = ap.parse_args()
    for _attempt in range(3 if args.quiet_wait else 1):
        if args.quiet_wait:
            wait_quiet(args.quiet_wait)
        report = measure(args)
        busy = max(report["load"].get("cpu_busy_after") or 0, report["load"].get("others_during_timing") or 0)
        if not args.quiet_wait or busy <= 0.15:
            break
        print(f"bench: others used {100 * busy:.0f}% of the CPUs: measuring again", file=sys.stderr)
    report["environment"] = {k: os.environ[k] for k in (*ENVIRONMENT, *winograd.ISA_LIMITS) if k in os.environ}
    report["environment"]["winograd_cflags"] = " ".join(winograd.CFLAGS)
    print(format_report(report))
    if args.out:
        write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


def wait_quiet(limit: float) -> None:
    deadline, calm = time.monotonic() + limit, 0
    while time.monotonic() < deadline and calm < 3:
        busy = cpu_busy(1.0)
        calm = calm + 1 if busy is not None and busy < 0.10 else 0


def measure(args: argparse.Namespace) -> dict:
    if args.march:
        winograd.use_march(args.march)
    options = BenchOptions(
        arch=args.arch,
        batches=args.batch,
        precisions=args.precision,
        dense=args.dense or None,
        repeats=args.repeats,
        warmup=args.warmup,
        baselines=[b for b in args.baselines.split(",") if b],
        threads=args.threads,
        compile=args.compile,
        direct=args.direct,
        calibration=args.calibration,
        device="cpu",
    )
    return run_bench(options, progress=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
