"""``verydeep train``: parse options, call :func:`verydeep.train.train`."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from typing import Any

from verydeep.cli.common import add_alias, add_command, output_folder, print_json
from verydeep.core.defaults import PRECISIONS

EPILOG = """\
The defaults are the paper's recipe: batch 256, SGD momentum 0.9, weight decay 5e-4, dropout 0.5
on fc6/fc7, LR 1e-2 for batch 256 (scaled linearly to other batches: 1.25e-3 at 32) after a
1-epoch linear warm-up, divided by 10 when validation top-1 stops improving for 3 epochs (at
most 3 times), 74 epochs, random 224 crops of the image rescaled to S, flips, PCA colour shift.
A run that diverges (NaN or exploding loss) or dies (a whole epoch at chance level) stops with
a message saying what to try. Options: defaults < --config-file F.toml (keys = option names,
e.g. batch_size = 256) < flags.

examples:
  # from scratch, scale jittering S in [256, 512], validating at Q = 384
  verydeep train --arch D --data train/ --val val/ --scale 256 512 -o runs/vgg16
  # the paper's way for deep nets: initialise from a trained net A
  verydeep train --arch D --init runs/vgg11/model.safetensors --data train/ --val val/
  # small images (here 32x32) are upscaled to S: the classic net needs 193..224 crops
  verydeep train --arch A --width 0.125 --data digits/train --val digits/val --batch-size 32 \\
      --epochs 8 --scale 256 -o runs/digits
  # fine-tune VGG-16 to your classes (one folder per class); fc8 is replaced
  verydeep train --weights vgg16 --data mine/train --val mine/val --lr 1e-3 --lr-mult fc8=10 \\
      --freeze-through pool5 --epochs 10 -o runs/mine
  # batch 256 on a 4 GB GPU: 16 micro-batches of 16, bf16, channels_last
  verydeep train --weights vgg16 --data mine/train --micro-batch 16 --precision bf16
  # many GPUs / hosts: the global batch stays 256
  torchrun --nproc_per_node 8 -m verydeep train --config-file vgg16.toml
  # continue a killed run (same final weights as an uninterrupted one)
  verydeep train -o runs/vgg16 --resume
  verydeep plot runs/vgg16
"""

#: argparse dests that are not TrainConfig options.
NOT_OPTIONS = {"command", "run", "debug", "config_file", "resume", "json"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train",
        help="train or fine-tune a VGG net with the paper's recipe",
        description="Train or fine-tune a VGG net (paper Sec. 3.1) on an ImageFolder; writes RUN_DIR.",
        examples=EPILOG,
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the config file
    )
    p.add_argument("--config-file", metavar="F.toml", default=None, help="options as TOML (flags override it)")
    p.add_argument(
        "--resume", action="store_true", default=False, help="continue the run in -o RUN_DIR from its newest checkpoint"
    )
    p.add_argument("--json", action="store_true", default=False, help="print the result as JSON")

    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="TRAIN", help="training ImageFolder (one sub-folder of images per class)")
    g.add_argument("--val", metavar="VAL", help="validation ImageFolder (same class folders); drives the LR schedule")
    g.add_argument(
        "--scale", type=int, nargs="+", metavar="S", help="training scale S, or S_min S_max for jittering (default 256)"
    )
    g.add_argument("--val-scale", type=int, metavar="Q", help="validation scale Q (default S, or (S_min+S_max)/2)")
    g.add_argument("--crop", type=int, help="crop size, 193..224 (fc6 needs pool5 7x7; default 224)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips (default on)")
    g.add_argument("--lighting-std", type=float, metavar="STD", help="PCA colour shift std (default 0.1; 0 = off)")
    g.add_argument("--workers", type=int, help="loader processes per rank (default min(8, cpus))")

    g = p.add_argument_group("model")
    g.add_argument("--arch", metavar="CONFIG", help="A, A-LRN, B, C, D (VGG-16), E (VGG-19) (default D)")
    g.add_argument("--width", type=float, help="channel multiplier for narrow nets (default 1)")
    g.add_argument("--num-classes", type=int, metavar="N", help="must equal the number of class folders (checked)")
    g.add_argument("--weights", metavar="NAME|PATH", help="fine-tune from these weights (vgg16, vgg19, a file or URL)")
    g.add_argument("--prototxt", metavar="PATH", help="deploy prototxt for a caffemodel --weights")
    g.add_argument(
        "--init",
        metavar="FROM",
        help="balanced (default: He's fan-in variance, scaled for Caffe-space input), glorot, normal (the paper's), "
        "or a trained shallower net's weights file",
    )
    g.add_argument(
        "--init-std",
        type=float,
        metavar="STD",
        help="std of --init normal (default 0.01; the paper's 'variance 1e-2', 0.1, explodes at full width)",
    )
    g.add_argument(
        "--init-layers",
        nargs="+",
        metavar="LAYER",
        help="layers --init FROM copies (default: its first 4 conv + fc6-fc8)",
    )
    g.add_argument("--freeze-through", metavar="LAYER", help="do not train this layer and those before it (e.g. pool5)")
    g.add_argument(
        "--lr-mult",
        action="append",
        metavar="LAYER=M",
        help="per-layer LR multiplier like Caffe's (repeatable): fc8=10",
    )
    g.add_argument("--dropout", type=float, metavar="P", help="dropout on fc6 and fc7 (default 0.5)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default 74")
    g.add_argument("--batch-size", type=int, metavar="B", help="global batch over all ranks (default 256)")
    g.add_argument("--micro-batch", type=int, metavar="M", help="per-rank forward batch; gradients accumulate to B")
    g.add_argument("--lr", type=float, help="learning rate (default 0.01 x batch/256: the paper's, scaled)")
    g.add_argument(
        "--warmup",
        type=float,
        metavar="EPOCHS",
        help="linear LR warm-up over this many epochs (default 1; 0 = off)",
    )
    g.add_argument(
        "--clip-grad-norm", type=float, metavar="MAX", help="rescale gradients whose global L2 norm exceeds MAX"
    )
    g.add_argument(
        "--divergence-checks",
        action=argparse.BooleanOptionalAction,
        help="stop when the loss explodes or the net sits at chance for an epoch (default on; NaN always stops)",
    )
    g.add_argument("--momentum", type=float, help="default 0.9")
    g.add_argument("--weight-decay", type=float, help="default 5e-4")
    g.add_argument("--lr-factor", type=float, help="LR multiplier on a plateau (default 0.1)")
    g.add_argument("--max-lr-drops", type=int, help="default 3")
    g.add_argument(
        "--plateau-patience", type=int, metavar="EPOCHS", help="epochs without a new best val top-1 (default 3)"
    )
    g.add_argument("--plateau-threshold", type=float, help="top-1 gain that counts as improving (default 0)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")

    g = p.add_argument_group("run")
    g.add_argument(
        "-o",
        "--output",
        dest="out",
        type=output_folder,
        metavar="RUN_DIR",
        help="run folder (default runs/<arch>-<date>-<time>)",
    )
    add_alias(g, "--out", dest="out", type=output_folder, metavar="RUN_DIR")
    g.add_argument(
        "--checkpoint-every", type=int, metavar="STEPS", help="also at each epoch end (default 1000; 0 = epochs only)"
    )
    g.add_argument("--keep-checkpoints", type=int, metavar="K", help="default 3")
    g.add_argument("--seed", type=int, help="default 0")
    g.add_argument(
        "--deterministic", action=argparse.BooleanOptionalAction, help="deterministic kernels (bit-exact resume on CPU)"
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available; cuda:LOCAL_RANK under torchrun)")
    g.add_argument("--precision", choices=tuple(PRECISIONS), help="autocast precision (default fp32)")
    g.add_argument(
        "--channels-last", choices=("auto", "on", "off"), help="NHWC memory format (default auto: on for CPU and CUDA)"
    )
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the net")
    g.add_argument("--log-every", type=int, metavar="STEPS", help="default 10")
    g.add_argument("--metrics-format", choices=("jsonl", "csv"), help="default jsonl")
    g.add_argument(
        "--tensorboard", action=argparse.BooleanOptionalAction, help="event files too, if installed (default on)"
    )
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar on stderr (default on)")
    p.set_defaults(run=run)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig options given on the command line."""
    from verydeep.train import parse_lr_mult

    out = {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS}
    if "lr_mult" in out:
        out["lr_mult"] = parse_lr_mult(out["lr_mult"])
    return out


def run(args: argparse.Namespace) -> int:
    from verydeep.train import TrainingStopped, prepare_config, train

    config = prepare_config(args.config_file, overrides_from(args), resume=args.resume)
    main_rank = os.environ.get("RANK", "0") == "0"  # one result under torchrun
    try:
        result = train(config, resume=args.resume)
    except TrainingStopped as e:  # the one-line message follows as the error; the JSON says the same
        if args.json and main_rank:
            print_json(asdict(e.result))
        raise
    if args.json and main_rank:
        print_json(asdict(result))
    return 0
