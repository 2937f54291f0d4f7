"""verydeep convert IN -o OUT.safetensors — any supported weights file to verydeep's safetensors."""

from __future__ import annotations

import argparse

from verydeep.cli.common import add_command, output_file

EXAMPLES = """examples:
  verydeep convert VGG_ILSVRC_16_layers.caffemodel -o vgg16.safetensors
  verydeep convert my_finetuned.caffemodel --prototxt deploy.prototxt -o mine.safetensors
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert", help="convert a caffemodel (or .pth/.h5) to a safetensors file", examples=EXAMPLES)
    p.add_argument("input", metavar="IN")
    p.add_argument("--prototxt", metavar="PATH")
    p.add_argument("-o", "--output", required=True, type=output_file, metavar="OUT.safetensors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.formats.safetensors import save_safetensors
    from verydeep.hub.download import file_digest
    from verydeep.hub.loader import load

    model = load(args.input, args.prototxt)
    save_safetensors(model, args.output, source=str(args.input), source_sha256=file_digest(args.input))
    print(f"wrote {args.output}")
    return 0
