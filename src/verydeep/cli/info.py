"""verydeep info PATH — layers, blob shapes, parameter count, FLOPs at 224, format version."""

from __future__ import annotations

import argparse

from verydeep.cli.common import add_command, add_json_option, print_json
from verydeep.core.tables import format_table

EXAMPLES = """examples:
  verydeep info VGG_ILSVRC_16_layers_deploy.prototxt
  verydeep info VGG_ILSVRC_16_layers.caffemodel --json
  verydeep info vgg16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "info", help="describe a prototxt, caffemodel, safetensors file or registry model", examples=EXAMPLES
    )
    p.add_argument("path", metavar="PATH", help="deploy prototxt, weights file, or registry name")
    p.add_argument("--prototxt", metavar="PATH", help="deploy prototxt for a caffemodel that is not a known VGG")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.hub.info import summarize

    info = summarize(args.path, args.prototxt)
    if args.json:
        print_json(info)
        return 0
    print(f"{info['source']}: {info['format']}")
    if "config" in info:
        print(f"VGG configuration {info['config']} (width {info['width']:g}, {info['num_classes']} classes)")
    rows = [[r["name"], r["type"], "x".join(map(str, r["output"])), f"{r['params']:,}"] for r in info["layers"]]
    print(format_table(rows, ["layer", "type", "output at 224", "parameters"]))
    print(f"parameters: {info['parameters']:,}")
    print(f"FLOPs at 224x224: {info['flops_224'] / 1e9:.2f} G ({info['flops_224'] / 2e9:.2f} G multiply-adds)")
    return 0
