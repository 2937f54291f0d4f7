"""verydeep export WEIGHTS --format ... -o OUT — ONNX, torchvision, safetensors or Caffe, checked."""

from __future__ import annotations

import argparse
from pathlib import Path

from verydeep.cli.common import (
    add_calibration_options,
    add_command,
    add_json_option,
    calibration_for,
    output_file,
    print_json,
)

EXAMPLES = """examples:
  verydeep export vgg16 --format onnx -o vgg16.onnx
  verydeep export vgg16 --format onnx --dense --input rgb01 -o vgg16_dense_rgb.onnx
  verydeep export vgg16 --format torchvision -o vgg16_tv.pth      # torchvision.models.vgg16() loads it
  verydeep export net.caffemodel --prototxt deploy.prototxt --format safetensors -o net.safetensors
  verydeep export vgg19 --format caffe --input rgb255 -o vgg19_rgb.caffemodel   # + vgg19_rgb.prototxt

Input spaces (--input): caffe = BGR, 0..255, mean pixel subtracted (verydeep's own);
rgb255 = RGB 0..255; rgb01 = RGB 0..1; torchvision = RGB 0..1 normalised by ImageNet mean/std
(the default for --format torchvision). Each export is read back by an independent consumer
(onnxruntime, torchvision, OpenCV, verydeep) and compared with verydeep before success.
"""

INPUTS = ("caffe", "rgb255", "rgb01", "torchvision")
FORMATS = (
    "onnx",
    "torchvision",
    "safetensors",
    "caffe",
)  # verydeep.formats.export.FORMATS (not imported: keeps --help fast)
OPSET = 18


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "export",
        help="write weights for another runtime (onnx, torchvision, safetensors, caffe)",
        examples=EXAMPLES,
    )
    p.add_argument("weights", metavar="WEIGHTS", help="registry name (vgg16, vgg19) or a weights file/URL")
    p.add_argument("--prototxt", metavar="PATH", help="deploy prototxt for a caffemodel whose net is not a known VGG")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "-o",
        "--output",
        type=output_file,
        metavar="OUT",
        help="output file (default: WEIGHTS' name with the format's suffix)",
    )
    p.add_argument(
        "--input",
        choices=INPUTS,
        default=None,
        dest="input_space",
        help="input space of the exported model (default: caffe; torchvision for --format torchvision)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="the fully convolutional net (onnx: dynamic height and width; caffe: fc as convolutions)",
    )
    # its range (17 or later) is checked by formats.onnx, which says what each opset lacks
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset, 17 or later (default: %(default)s)")
    p.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="torch.onnx exporter (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32 (exact), or int8: onnxruntime's static QDQ model, calibrated on --calibration (onnx only)",
    )
    add_calibration_options(p, capped=False)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.errors import VerydeepError
    from verydeep.formats.export import FORMATS as WRITERS
    from verydeep.formats.export import export
    from verydeep.hub.loader import load

    out = args.output or Path(str(args.weights)).stem + ("_dense" if args.dense else "") + WRITERS[args.format][2]
    if Path(out).resolve() == Path(str(args.weights)).resolve():
        raise VerydeepError(f"the output {out} is the input file; pass -o OTHER.{Path(out).suffix.lstrip('.')}")
    if args.precision == "int8" and not args.calibration:
        raise VerydeepError("--precision int8 needs --calibration DIR: images like the ones the model will see")
    model = load(args.weights, args.prototxt, device="cpu")
    calibration = calibration_for(args, None, command="export", capped=False)
    report = export(
        model,
        out,
        args.format,
        input_space=args.input_space,
        dense=args.dense,
        opset=args.opset,
        exporter=args.exporter,
        precision=args.precision,
        calibration=calibration,
    )
    if args.json:
        print_json(report.as_dict())
        return 0
    print(f"wrote {', '.join(report.paths)}")
    kind = "exact" if report.exact else "folded"
    print(f"  checked with {report.checked_with}: max relative difference {report.max_rel_error:.2e} ({kind})")
    for note in report.notes:
        print(f"  {note}")
    return 0
