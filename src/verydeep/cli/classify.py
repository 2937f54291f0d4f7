"""verydeep classify IMAGE... — top-k classes with the seed's preprocessing."""

from __future__ import annotations

import argparse
import sys

from verydeep.cli.common import (
    add_command,
    add_json_option,
    add_model_options,
    calibration_for,
    positive_int,
    precision_report,
    print_json,
)

#: Classes shown per image unless --top says otherwise (all of them for a model with fewer).
DEFAULT_TOP = 5
EXAMPLES = """examples:
  verydeep classify cat.jpg
  verydeep classify *.jpg --top 3 --json
  verydeep classify photo.png --weights VGG_ILSVRC_16_layers.caffemodel --precision bf16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    what = "Shorter side to 256, central 224x224 crop, BGR, mean pixel subtracted; soft-max of fc8."
    p = add_command(sub, "classify", help="top-k ImageNet classes for images", description=what, examples=EXAMPLES)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (scanned), or '-' (paths on stdin)")
    add_model_options(p)
    top = "classes per image, 1..the model's classes (default: 5, or all of fewer)"
    p.add_argument("--top", type=positive_int, help=top)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: %(default)s)")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.core.defaults import default_device
    from verydeep.core.tables import format_table
    from verydeep.errors import VerydeepError
    from verydeep.evaluate.classify import classify_files
    from verydeep.hub.loader import load

    device = default_device(args.device)  # a GPU that is not there fails before any download
    images = [str(p) for item in args.images for p in _expand(item)]
    model = load(args.weights, args.prototxt)
    classes = int(getattr(model, "num_classes", 0) or 0)
    if args.top is not None and classes and args.top > classes:
        raise VerydeepError(f"--top {args.top}: the model has {classes} classes; use 1..{classes}")
    top = args.top or DEFAULT_TOP  # predict lists at most the model's classes
    precision = precision_report(model, args.precision, device, command="classify")
    calibration = calibration_for(args, images, command="classify")
    results, errors = classify_files(
        model,
        images,
        top=top,
        batch_size=args.batch_size,
        device=device,
        precision=args.precision,
        calibration=calibration,
    )
    if args.json:
        print_json([{**r, "precision": precision} for r in results])
    else:
        computed = f" ({precision['computed']})" if precision["computed"] != "fp32" else ""
        for r in results:
            rows = [[p["index"], p["label"], f"{p['probability']:.4f}"] for p in r["predictions"]]
            header = ["class", "label", f"probability{computed}"]
            print(f"{r['image']}:\n" + format_table(rows, header) + "\n")
    for e in errors:
        print(f"verydeep classify: error: {e}", file=sys.stderr)
    return 1 if errors else 0


def _expand(item: str) -> list[str]:
    """A folder (scanned) or '-' (paths on stdin) -> its images; any other path is one image."""
    from pathlib import Path

    from verydeep.data.images import resolve_inputs

    if item == "-" or Path(item).is_dir():
        return [str(p) for p in resolve_inputs(item)]
    return [item]
