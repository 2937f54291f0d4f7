"""``verydeep plot RUN``: draw a training run's loss/accuracy/LR curves to a PNG."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  verydeep plot runs/vgg16                      # writes runs/vgg16/curves.png
  verydeep plot runs/vgg16 -o vgg16-curves.png
  verydeep plot runs/vgg16/metrics.csv -o curves.png
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="plot a training run's curves (loss, accuracy, learning rate) to a PNG",
        description="Plot the metrics of a `verydeep train` run folder (or its metrics file) to a PNG.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="run folder, or its metrics.jsonl / metrics.csv")
    p.add_argument("-o", "--out", metavar="PNG", help="output file (default RUN/curves.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.train.curves import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
