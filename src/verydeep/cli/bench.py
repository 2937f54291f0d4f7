"""verydeep bench — images/s, latency and memory of the fast path against the baselines."""

from __future__ import annotations

import argparse
import sys

from verydeep.cli.common import (
    add_alias,
    add_calibration_options,
    add_command,
    add_json_option,
    float_range,
    int_range,
    positive_int,
    print_json,
)
from verydeep.configs import CROP, MAX_SCALE, MAX_WIDTH
from verydeep.core.defaults import INFERENCE_PRECISIONS

EXAMPLES = """examples:
  verydeep bench                                   # VGG-16, random weights: batch 1 and 16, fp32 and bf16, dense Q=384
  verydeep bench --batch-size 16 --precision bf16 --dense 0 --repeats 10
  verydeep bench --weights vgg16 --json > bench.json
  verydeep bench --arch E --baselines torchvision,onnxruntime --threads 2
  verydeep bench --arch D --width 0.0625 --repeats 2 --warmup 1 --json   # a quick smoke run

Measurements of all engines are interleaved in one process; ratios are to torchvision's eager
fp32 VGG (the classic net) and to verydeep's exact eager dense view (dense).
"""

#: torch/onnxruntime/OpenCV threads: more than any machine's cores only adds contention.
MAX_THREADS = 1024


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _dense_scale(text: str) -> int:
    """``--dense``: 0 (skip the dense net) or a test scale Q the classic crop fits in."""
    value = int_range(0, MAX_SCALE)(text)
    if 0 < value < CROP:
        raise argparse.ArgumentTypeError(f"must be 0 (skip) or {CROP}..{MAX_SCALE}, found {value}")
    return value


#: BenchOptions field -> the command-line option it comes from (the same name but for two).
SAME_NAME = ("weights", "prototxt", "arch", "width", "num_classes", "repeats", "warmup", "baselines", "device")
FROM_ARGS = {
    **{name: name for name in (*SAME_NAME, "threads", "compile", "direct", "calibration", "calibration_images")},
    "batches": "batch",
    "precisions": "precision",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "bench",
        help="measure inference speed of the fast path against torchvision / onnxruntime / OpenCV",
        description="Images/s, latency, peak memory and fidelity of model.optimized() per precision, "
        "against torchvision's eager fp32 VGG in the same process (and onnxruntime / OpenCV when installed).",
        examples=EXAMPLES,
    )
    p.add_argument(
        "--weights",
        metavar="NAME|PATH",
        help="weights to measure (default: random weights; speed does not depend on them)",
    )
    p.add_argument("--prototxt", metavar="PATH", help="deploy prototxt for a caffemodel whose net is not a known VGG")
    p.add_argument("--arch", default="D", help="Table 1 configuration without --weights (default: %(default)s)")
    width = f"channel width factor without --weights, in (0, {MAX_WIDTH:g}] (default: %(default)s)"
    p.add_argument("--width", type=float_range(0, MAX_WIDTH, low_open=True), default=1.0, help=width)
    classes = "classes without --weights (default: %(default)s)"
    p.add_argument("--num-classes", type=positive_int, default=1000, help=classes)
    p.add_argument(
        "--batch-size",
        dest="batch",
        type=positive_int,
        nargs="+",
        default=[1, 16],
        metavar="N",
        help="classic-net batch sizes (default: 1 16)",
    )
    add_alias(p, "--batch", dest="batch", type=positive_int, nargs="+")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=INFERENCE_PRECISIONS,
        default=["fp32", "bf16"],
        help="fast-path precisions to measure (default: fp32 bf16; int8 is calibrated, see --calibration)",
    )
    add_calibration_options(p)
    p.add_argument(
        "--dense",
        type=_dense_scale,
        default=384,
        metavar="Q",
        help=f"dense net on one Q x 4Q/3 image, Q in {CROP}..{MAX_SCALE}; 0 skips it (default: %(default)s)",
    )
    repeats = "timed calls per engine and input (default: %(default)s)"
    p.add_argument("--repeats", type=positive_int, default=5, metavar="N", help=repeats)
    warmup = "untimed first calls (default: %(default)s)"
    p.add_argument("--warmup", type=int_range(0), default=1, metavar="N", help=warmup)
    p.add_argument(
        "--baselines",
        type=_csv,
        default=["torchvision", "onnxruntime", "opencv"],
        metavar="LIST",
        help="comma-separated: torchvision, exact, onnxruntime, opencv (default: torchvision,onnxruntime,opencv)",
    )
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile variant of each precision")
    p.add_argument(
        "--direct", action="store_true", help="also measure fp32 with oneDNN's direct 3x3 kernels instead of Winograd"
    )
    threads = f"torch/onnxruntime/OpenCV threads, 1..{MAX_THREADS} (default: torch's)"
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), metavar="N", help=threads)
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1); default: cuda if available")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.bench import BenchOptions, format_report, run_bench

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    options = BenchOptions(
        dense=args.dense or None, **{field: getattr(args, dest) for field, dest in FROM_ARGS.items()}
    )
    report = run_bench(options, progress=progress)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0
