"""verydeep extract DATA --layer fc7 ... -o OUT — features of one's own images, resumable and sharded."""

from __future__ import annotations

import argparse

from verydeep.cli import common

EXAMPLES = """examples:
  verydeep extract photos/ --layer fc7 -o fc7.npy
  verydeep extract list.txt --layer fc7 --layer pool5 -o feats.parquet
  verydeep extract photos/ --layer relu5_3 --pool avg -o relu5_3.h5 --batch-size 64 --workers 8
  find photos -name '*.jpg' | verydeep extract - --layer fc7 -o fc7.npz
  verydeep extract photos/ --layer fc7 -o fc7.npz --resume        # after an interruption
  torchrun --nproc_per_node 4 -m verydeep extract photos/ --layer fc7 -o fc7.npz   # one shard per GPU

DATA is a folder (scanned recursively, sorted), a list file (one path per line, first column;
relative paths are relative to the list's folder) or '-' for paths on stdin. Rows follow the
input order; an unreadable image has no row and is listed in OUT.failed.tsv.

Layers are Caffe's names: conv1_1 (before its ReLU), relu1_1 (after), pool1, ..., fc6, relu6,
fc7, relu7, fc8, prob. Caffe's own `fc7` blob holds relu7's values (its ReLU works in place):
pass --layer relu7 to get what Caffe's extract_features gives for fc7.
"""


#: ``--pool`` choices: the names of :data:`verydeep.extract.job.POOLS`, spelled here so ``--help``
#: does not import torch.
POOLINGS = ("none", "avg", "max")
#: Options handed to :func:`verydeep.extract.job.extract` as they are (same names).
FORWARDED = "pool batch_size workers size crop resume overwrite device precision chunk_size".split()


def add_parser(sub: argparse._SubParsersAction) -> None:
    what = "extract features (fc7, pool5, relu4_3, ...) of many images to .npy/.npz/.parquet/.h5"
    p = common.add_command(sub, "extract", help=what, examples=EXAMPLES)
    p.add_argument("data", metavar="DATA", help="folder, list file, or '-' (paths on stdin)")
    p.add_argument("--layer", action="append", required=True, metavar="NAME", help="Caffe layer name (repeatable)")
    p.add_argument(
        "--pool",
        choices=POOLINGS,
        default="none",
        help="reduce spatial maps to one vector per image (default: %(default)s)",
    )
    out = "OUT.npy (one layer), .npz, .parquet or .h5"
    p.add_argument("-o", "--output", required=True, type=common.output_file, metavar="OUT", help=out)
    batch = "images per batch (default: %(default)s)"
    p.add_argument("--batch-size", type=common.positive_int, default=32, metavar="N", help=batch)
    workers = "decoding processes (default: CPUs, at most 8; 0 decodes in the main process)"
    p.add_argument("--workers", type=common.workers_count, metavar="N", help=workers)
    size = "shorter side before cropping, at least the crop (default: %(default)s)"
    p.add_argument("--size", type=common.image_side, default=256, metavar="S", help=size)
    crop = "central crop: 193..224 for fc6 and later layers, any for conv/pool (default: %(default)s)"
    p.add_argument("--crop", type=common.image_side, default=224, metavar="C", help=crop)
    chunk = "images per saved part (default: ~256 MiB of features)"
    p.add_argument("--chunk-size", type=common.positive_int, metavar="N", help=chunk)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same options")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and any partial results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_model_options(p)
    common.add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.core import distributed
    from verydeep.data.images import resolve_inputs
    from verydeep.extract.job import extract
    from verydeep.hub.loader import load

    ctx = distributed.init(args.device)
    try:
        inputs = resolve_inputs(args.data)
        with distributed.main_rank_first(ctx):  # rank 0 fills the weights cache; the others then read it
            model = load(args.weights, args.prototxt, progress=ctx.is_main)
        device = distributed.device_for(ctx, args.device)
        precision = common.precision_report(model, args.precision, device, command="extract", quiet=not ctx.is_main)
        options = {name: getattr(args, name) for name in FORWARDED}
        calibration = common.calibration_for(args, inputs, command="extract", quiet=not ctx.is_main)
        result = extract(
            model, inputs, args.layer, args.output, ctx=ctx, progress=not args.no_progress, calibration=calibration,
            **options,
        )  # fmt: skip
    finally:
        distributed.finish(ctx)
    if result is None:  # not rank 0
        return 0
    if args.json:
        common.print_json({**result.as_dict(), "precision": precision})
        return 0
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result.shapes.items())
    print(f"wrote {result.output}: {result.rows} of {result.images} images ({shapes})")
    for extra in result.files[1:]:
        print(f"  and {extra}")
    common.print_skipped(
        [(f.path, f.reason) for f in result.failed], " (no row)", f"listed in {result.output}.failed.tsv"
    )
    return 0
