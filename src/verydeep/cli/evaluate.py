"""``verydeep evaluate``: the paper's test protocols on a validation set, or fusing saved runs."""

from __future__ import annotations

import argparse
from typing import Any

from verydeep.cli.common import (
    add_command,
    add_json_option,
    add_model_options,
    calibration_for,
    float_range,
    int_range,
    output_file,
    positive_int,
    precision_report,
    print_json,
    print_skipped,
    test_scale,
    workers_count,
)

EPILOG = """\
examples:
  # the paper's multi-scale dense evaluation (Table 4: 24.8 / 7.5 for VGG-16)
  verydeep evaluate val/ --protocol dense --scales 256 384 512 --scores dense.npz
  # multi-crop, then the fusion of both runs (Table 5: multi-crop & dense)
  verydeep evaluate val/ --protocol multicrop --scores multicrop.npz
  verydeep evaluate --combine dense.npz multicrop.npz
  # the seed's single centre crop, no flip, 500 images spread over the set
  verydeep evaluate val/ --protocol center --scales 256 --no-flip --limit 500
  # other layouts: Caffe's list, the devkit's ground truth (+ meta.mat), Kaggle's CSV
  verydeep evaluate ILSVRC2012_img_val/ --labels val.txt
  verydeep evaluate ILSVRC2012_img_val/ --labels ILSVRC2012_validation_ground_truth.txt --meta meta.mat
  verydeep evaluate ILSVRC/Data/CLS-LOC/val/ --labels LOC_val_solution.csv
  # a long run: kill it any time, then continue with the same command plus --resume
  verydeep evaluate val/ --protocol combined --scores combined.npz --resume
  # many GPUs (the images are split exactly across ranks; rank 0 prints and writes)
  torchrun --nproc_per_node 8 -m verydeep evaluate val/ --protocol dense --scores dense.npz
"""


#: Options handed to :class:`~verydeep.evaluate.protocols.Protocol` and to
#: :func:`~verydeep.evaluate.run.evaluate` as they are (same names).
PROTOCOL_OPTIONS = "interpolation grid grid_size dense_average".split()
RUN_OPTIONS = "precision batch_size max_batch workers scores resume overwrite checkpoint_every".split()
#: The finest multi-crop grid: N x N crops per scale and flip (the paper's 5 x 5 gives 150 crops
#: at three scales); beyond 16 x 16 the crops of a 256 image overlap by more than 98%.
MAX_GRID_SIZE = 16


def add_parser(sub: Any) -> None:
    from verydeep.data.choices import INTERPOLATIONS, LAYOUTS
    from verydeep.evaluate.protocols import DENSE_AVERAGES, GRIDS, PROTOCOLS

    p = add_command(
        sub,
        "evaluate",
        help="top-1/top-5 error under the paper's test protocols (center, multi-crop, dense, combined)",
        description="Evaluate a model on a labelled image set with the test protocols of the paper "
        "(Sec. 3.2), at one or several test scales Q; or fuse saved runs with --combine.",
        examples=EPILOG,
    )
    folder = "folder of images (ImageFolder val/<wnid>/*, or flat with --labels)"
    p.add_argument("data", nargs="?", metavar="DATA", help=folder)

    g = p.add_argument_group("data")
    labels = "Caffe list (name label), devkit ground truth, or LOC_val_solution.csv"
    g.add_argument("--labels", metavar="FILE", help=labels)
    g.add_argument("--layout", choices=LAYOUTS, default="auto", help="data layout (default: detected)")
    g.add_argument("--meta", metavar="MAT", help="the devkit's meta.mat (default: next to the ground-truth file)")
    synsets = "class list fixing the class order (LOC_synset_mapping.txt, synset_words.txt, meta.mat)"
    g.add_argument("--synsets", metavar="FILE", help=synsets)
    g.add_argument("--limit", type=positive_int, metavar="N", help="evaluate N images spread evenly over the set")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=PROTOCOLS, default="dense", help="test protocol (default: %(default)s)")
    scales = "test scales Q, shorter side, 224..1024 (default: 256 for center, else 256 384 512)"
    g.add_argument("--scales", type=test_scale, nargs="+", metavar="Q", help=scales)
    g.add_argument("--no-flip", action="store_true", help="do not add horizontally flipped images/crops")
    rescaling = "rescaling (default: %(default)s, antialiased)"
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear", help=rescaling)
    placement = "multi-crop placement (default: %(default)s: corners to corners)"
    g.add_argument("--grid", choices=GRIDS, default="span", help=placement)
    grid = f"multi-crop grid N x N, N in 1..{MAX_GRID_SIZE} (default: %(default)s)"
    g.add_argument("--grid-size", type=int_range(1, MAX_GRID_SIZE), default=5, metavar="N", help=grid)
    average = "average the class score map before the soft-max (scores, the paper) or after (default: %(default)s)"
    g.add_argument("--dense-average", choices=DENSE_AVERAGES, default="scores", help=average)

    g = p.add_argument_group("model and device")
    add_model_options(g)
    batch = "images per batch (default: %(default)s)"
    g.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help=batch)
    crops = "most 224x224 crops (or as many pixels) per forward pass (default: %(default)s)"
    g.add_argument("--max-batch", type=positive_int, default=128, metavar="N", help=crops)
    workers = "decoding processes (default: CPUs, at most 8; 0 decodes in the main process)"
    g.add_argument("--workers", type=workers_count, metavar="N", help=workers)

    g = p.add_argument_group("results")
    scores = "write per-image soft-max, labels and ids (partial results go to OUT.npz.parts/)"
    g.add_argument("--scores", type=output_file, metavar="OUT.npz", help=scores)
    g.add_argument("--resume", action="store_true", help="continue the run whose partial results are next to --scores")
    g.add_argument("--overwrite", action="store_true", help="recompute even if --scores holds a finished run")
    flush = "flush partial results this often (default: %(default)s)"
    g.add_argument("--checkpoint-every", type=float_range(0), default=60.0, metavar="SECONDS", help=flush)
    g.add_argument("--predictions", type=output_file, metavar="OUT.csv", help="write each image's top-5 classes")
    fuse = "fuse saved runs (average their soft-max) instead of evaluating"
    g.add_argument("--combine", nargs="+", metavar="NPZ", help=fuse)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(g)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.core import distributed
    from verydeep.errors import VerydeepError
    from verydeep.evaluate.results import combine, save_scores, write_predictions

    if args.combine:
        if args.data:
            raise VerydeepError("--combine fuses saved scores files; do not pass DATA with it")
        result = combine(args.combine)
        if args.scores:
            save_scores(result, args.scores)
        _report(args, result, None)
        return 0
    if not args.data:
        raise VerydeepError("DATA is required (a folder of images), or --combine A.npz B.npz")
    ctx = distributed.init(args.device)
    try:
        result, names = _evaluate(args, ctx)
        if result is None:  # not rank 0
            return 0
        if args.predictions:
            write_predictions(result, args.predictions, names)
        _report(args, result, names)
        return 0
    finally:
        distributed.finish(ctx)


def _evaluate(args: argparse.Namespace, ctx: Any) -> tuple[Any, Any]:
    from verydeep.core import distributed
    from verydeep.data.eval_set import open_eval_set
    from verydeep.evaluate.protocols import Protocol
    from verydeep.evaluate.run import evaluate
    from verydeep.hub.loader import load

    device = distributed.device_for(ctx, args.device)
    data = open_eval_set(
        args.data, args.labels, layout=args.layout, meta=args.meta, synsets=args.synsets, limit=args.limit
    )
    protocol_options = {name: getattr(args, name) for name in PROTOCOL_OPTIONS}
    protocol = Protocol.make(args.protocol, args.scales, flip=not args.no_flip, **protocol_options)
    with distributed.main_rank_first(ctx):  # rank 0 fills the weights cache; the others then read it
        model = load(args.weights, args.prototxt, device=device, progress=ctx.is_main)
    precision = precision_report(model, args.precision, device, command="evaluate", quiet=not ctx.is_main)
    run_info = {"weights": str(args.weights), "data": str(args.data), "labels": args.labels, "precision": precision}
    options = {name: getattr(args, name) for name in RUN_OPTIONS}
    calibration = calibration_for(args, list(data.paths), command="evaluate", quiet=not ctx.is_main)
    result = evaluate(
        model, data, protocol, device=device, progress=not args.no_progress, ctx=ctx, run_info=run_info,
        calibration=calibration, **options,
    )  # fmt: skip
    return result, getattr(model, "class_names", None)


def _computed_precision(report: Any) -> str:
    """The precision the run computed in (``bf16 -> fp32`` when it fell back)."""
    if not isinstance(report, dict):
        return str(report or "fp32")
    asked, done = report.get("requested"), report.get("computed")
    return str(done) if asked == done else f"{asked} -> {done}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _report(args: argparse.Namespace, result: Any, names: Any) -> None:
    from verydeep.core.tables import format_table

    summary = result.summary()
    unlabeled = result.labels is None
    if args.json:
        if unlabeled and not args.predictions:
            summary["predictions"] = result.predictions(5, names)
        print_json(summary)
        return
    m = summary["metrics"] or {}
    protocol = result.protocol
    scales = ",".join(map(str, protocol.get("scales", []))) or "-"
    if unlabeled and not args.predictions:
        rows = [
            [p["id"], p["names"][0] if p.get("names") else p["top"][0], f"{p['probabilities'][0]:.4f}"]
            for p in result.predictions(1, names)
        ]
        print(format_table(rows, ["image", "top-1", "probability"]))
        print()
    row = [
        protocol.get("name", "?") + ("" if protocol.get("flip", True) else " (no flip)"),
        scales,
        summary["images"],
        summary["skipped"],
        _fmt(m.get("top1_error_pct")),
        _fmt(m.get("top5_error_pct")),
        _fmt(m.get("top1_accuracy_pct")),
        _fmt(m.get("top5_accuracy_pct")),
        f"{summary['wall_s']:.1f}",
        f"{summary['images_per_s']:.3g}",
        _computed_precision(result.run.get("precision")),
    ]
    header = [
        "protocol",
        "scales Q",
        "images",
        "skipped",
        "top-1 err %",
        "top-5 err %",
        "top-1 acc %",
        "top-5 acc %",
        "wall s",
        "images/s",
        "precision",
    ]
    print(format_table([row], header))
    print_skipped([(x["id"], x["reason"]) for x in result.failed], "", "see --json or the scores file")
