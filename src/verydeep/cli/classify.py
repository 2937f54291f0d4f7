"""verydeep classify IMAGE... — top-k classes with the seed's preprocessing."""

from __future__ import annotations

import argparse
import sys

from verydeep.cli.common import add_command, add_json_option, add_model_options, print_json

EXAMPLES = """examples:
  verydeep classify cat.jpg
  verydeep classify *.jpg --top 3 --json
  verydeep classify photo.png --weights VGG_ILSVRC_16_layers.caffemodel --precision bf16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    what = "Shorter side to 256, central 224x224 crop, BGR, mean pixel subtracted; soft-max of fc8."
    p = add_command(sub, "classify", help="top-k ImageNet classes for images", description=what, examples=EXAMPLES)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_options(p)
    p.add_argument("--top", type=int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.core.defaults import default_device
    from verydeep.core.tables import format_table
    from verydeep.evaluate.classify import classify_files
    from verydeep.hub.loader import load

    model = load(args.weights, args.prototxt)
    results, errors = classify_files(
        model,
        args.images,
        top=args.top,
        batch_size=args.batch_size,
        device=default_device(args.device),
        precision=args.precision,
    )
    if args.json:
        print_json(results)
    else:
        for r in results:
            rows = [[p["index"], p["label"], f"{p['probability']:.4f}"] for p in r["predictions"]]
            print(f"{r['image']}:\n" + format_table(rows, ["class", "label", "probability"]) + "\n")
    for e in errors:
        print(f"verydeep classify: error: {e}", file=sys.stderr)
    return 1 if errors else 0
