"""``verydeep plot RUN``: draw a training run's loss/accuracy/LR curves to a PNG."""

from __future__ import annotations

import argparse

from verydeep.cli.common import add_alias, add_command, output_file

EPILOG = """\
examples:
  verydeep plot runs/vgg16                      # writes runs/vgg16/curves.png
  verydeep plot runs/vgg16 -o vgg16-curves.png
  verydeep plot runs/vgg16/metrics.csv -o curves.png
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    what = "plot a training run's curves (loss, accuracy, learning rate) to a PNG"
    p = add_command(sub, "plot", help=what, examples=EPILOG)
    p.add_argument("run_dir", metavar="RUN", help="run folder, or its metrics.jsonl / metrics.csv")
    png = "output file (default RUN/curves.png)"
    p.add_argument("-o", "--output", dest="out", type=output_file, metavar="PNG", help=png)
    add_alias(p, "--out", dest="out", type=output_file, metavar="PNG")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.train import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
