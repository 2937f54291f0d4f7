"""verydeep explain IMAGE... --method ... -o OUT — saliency, Grad-CAM, guided backprop, score maps, class models."""

from __future__ import annotations

import argparse

from verydeep.cli.common import (
    add_command,
    add_json_option,
    add_model_options,
    float_range,
    image_side,
    int_range,
    output_folder,
    positive_int,
    print_json,
    print_skipped,
    workers_count,
)
from verydeep.configs import MAX_SCALE
from verydeep.core.tables import format_table

EXAMPLES = """examples:
  verydeep explain cat.jpg -o maps/                                   # Grad-CAM at relu5_3, top class
  verydeep explain photos/ --method saliency --smooth 25 -o maps/     # SmoothGrad
  verydeep explain dog.jpg --method guided-gradcam --class "tiger cat" --layer relu4_3 -o maps/
  verydeep explain street.jpg --method score-map --class 817 -o maps/  # where the dense net sees class 817
  verydeep explain --method class-model --class goose --class 1 -o maps/   # the paper's class models
  find photos -name '*.jpg' | verydeep explain - --method gradcam -o maps/

IMAGE is a file, a folder (scanned recursively), a list file (one path per line) or '-' (paths on
stdin). Per image OUT/<stem>.<method>.png shows the map over the photo with the class and its
probability, and OUT/<stem>.<method>.npy holds the raw map (float32; H x W, or 3 x H x W in the
input's BGR order for the guided methods); OUT/index.<method>.html and
OUT/contact-sheet.<method>.png show them all. Unreadable images are skipped and listed.

The photo is what the net sees: shorter side 256, central 224 crop (score-map: shorter side 448,
no crop, so the dense net has more than one position). With random weights the maps mean nothing.
"""

#: ``--method`` choices: the names of :data:`verydeep.explain.methods.METHODS` and the class model,
#: spelled here so ``--help`` does not import torch.
METHODS = ("gradcam", "saliency", "guided-backprop", "guided-gradcam", "score-map", "class-model")
#: SmoothGrad's noisy copies: its paper finds the map stops changing by ~50; each copy is a
#: forward and backward pass of the image.
MAX_SMOOTH = 1000
#: Class-model gradient steps: the paper's images settle within a few hundred.
MAX_STEPS = 100_000


def add_parser(sub: argparse._SubParsersAction) -> None:
    what = "saliency maps, Grad-CAM, guided backprop, dense score maps and class models as pictures"
    p = add_command(sub, "explain", help=what, examples=EXAMPLES)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image file, folder, list file, or '-' (stdin)")
    p.add_argument("--method", choices=METHODS, default="gradcam", help="what to compute (default: %(default)s)")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="top|INDEX|NAME",
        help="class to explain (default: each image's top class); class-model: repeatable, required",
    )
    p.add_argument("--layer", metavar="NAME", help="Grad-CAM's layer, a Caffe name (default: the last conv's ReLU)")
    out = "folder for the pictures and arrays"
    p.add_argument("-o", "--output", required=True, type=output_folder, metavar="OUT_DIR", help=out)
    smooth = f"saliency: average over N noisy copies (SmoothGrad), 0..{MAX_SMOOTH}"
    p.add_argument("--smooth", type=int_range(0, MAX_SMOOTH), default=0, metavar="N", help=smooth)
    p.add_argument("--size", type=image_side, metavar="S", help="shorter side before cropping (default: per method)")
    crop = "central crop, at most --size; 0 keeps the whole image (default: per method)"
    p.add_argument("--crop", type=int_range(0, MAX_SCALE), metavar="C", help=crop)
    batch = "images per batch (default: %(default)s)"
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help=batch)
    workers = "decoding processes (default: CPUs, at most 8; 0 decodes in the main process)"
    p.add_argument("--workers", type=workers_count, metavar="N", help=workers)
    l2 = "class-model: L2 penalty lambda, 0 or more (default: 1e-5)"
    p.add_argument("--l2", type=float_range(0), metavar="LAMBDA", help=l2)
    p.add_argument(
        "--step",
        type=float_range(0, low_open=True),
        metavar="PIXELS",
        help="class-model: RMS change of the zero image in the first step (default: 1)",
    )
    steps = f"class-model: gradient steps, 1..{MAX_STEPS:,} (default: 200)"
    p.add_argument("--steps", type=int_range(1, MAX_STEPS), metavar="N", help=steps)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p, int8=False)
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.core.defaults import default_device
    from verydeep.data.images import resolve_inputs
    from verydeep.errors import VerydeepError
    from verydeep.explain.job import ExplainRun, check_crop, class_model_files, explain_files
    from verydeep.hub.loader import load

    classes = args.classes or []
    if args.method == "class-model":
        if args.images:
            raise VerydeepError("--method class-model starts from the zero image: give no IMAGE, only --class")
        if not classes:
            raise VerydeepError("--method class-model needs --class INDEX|NAME (repeatable)")
    else:
        given = [name for name in ("l2", "step", "steps") if getattr(args, name) is not None]
        if given:
            raise VerydeepError(f"--{given[0]} applies to --method class-model only")
        if len(classes) > 1:
            raise VerydeepError(f"--class: one class for {args.method} (found {len(classes)}); run once per class")
        if not args.images:
            raise VerydeepError(f"--method {args.method} needs at least one IMAGE")
    check_crop(args.size, args.crop)  # before the model loads (explain_files checks it too)
    paths = [p for data in args.images for p in resolve_inputs(data)]
    if args.method != "class-model" and not paths:
        raise VerydeepError(f"no images found in {', '.join(args.images)}")
    model = load(args.weights, args.prototxt)
    device = default_device(args.device)
    progress = not args.no_progress
    result: ExplainRun
    if args.method == "class-model":
        steps = {name: getattr(args, name) for name in ("l2", "step", "steps") if getattr(args, name) is not None}
        size = args.size or 224
        result = class_model_files(model, classes, args.output, size=size, device=device, progress=progress, **steps)
    else:
        result = explain_files(
            model,
            paths,
            args.output,
            method=args.method,
            target=classes[0] if classes else "top",
            layer=args.layer,
            samples=args.smooth,
            size=args.size,
            crop=args.crop,
            batch_size=args.batch_size,
            device=device,
            precision=args.precision,
            workers=args.workers,
            progress=progress,
        )
    if args.json:
        print_json(result.as_dict())
    else:
        rows = [[i.source or "-", i.index, i.name, f"{i.probability:.4f}", i.png] for i in result.items]
        print(format_table(rows, ["image", "class", "label", "probability", "picture"]))
        if result.index:
            print(f"\nwrote {len(result.items)} picture(s) to {result.output_dir}: index {result.index}")
    print_skipped([(f.path, f.reason) for f in result.skipped], " (no picture)", "see --json")
    return 0 if result.items else 1
