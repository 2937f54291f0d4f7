"""verydeep info PATH — layers, blob shapes, parameter count, FLOPs at the net's input, format version."""

from __future__ import annotations

import argparse

from verydeep.cli.common import add_command, add_json_option, print_json
from verydeep.core.tables import format_table

EXAMPLES = """examples:
  verydeep info VGG_ILSVRC_16_layers_deploy.prototxt
  verydeep info VGG_ILSVRC_16_layers.caffemodel --json
  verydeep info https://example.org/models/VGG_ILSVRC_19_layers.caffemodel
  verydeep info vgg16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "info", help="describe a prototxt, caffemodel, safetensors file or registry model", examples=EXAMPLES
    )
    p.add_argument("path", metavar="PATH", help="deploy prototxt, weights file or URL, or registry name")
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
    inputs = ", ".join("x".join(map(str, shape)) for shape in info["inputs"].values())
    rows = [[r["name"], r["type"], "x".join(map(str, r["output"])), f"{r['params']:,}"] for r in info["layers"]]
    print(format_table(rows, ["layer", "type", f"output at {inputs}", "parameters"]))
    print(f"parameters: {info['parameters']:,}")
    flops = info["flops"]
    print(f"FLOPs at {inputs}: {_scaled(flops)} ({_scaled(flops // 2)} multiply-adds)")
    return 0


def _scaled(count: int) -> str:
    """``30.94 G``, ``8.06 K``: small custom nets must not print as 0.00 G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)
