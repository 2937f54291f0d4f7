"""The ``verydeep`` command: parses arguments and calls the library; nothing else.

Each subcommand lives in ``verydeep/cli/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. User errors (:class:`VerydeepError`) print one line and exit 1; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from verydeep.errors import VerydeepError

#: Subcommands in the order ``--help`` lists them.
COMMANDS = (
    "classify",
    "info",
    "convert",
    "weights",
    "evaluate",
    "train",
    "plot",
    "extract",
    "export",
    "bench",
    "explain",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verydeep",
        description="The VGG very deep networks (Simonyan & Zisserman, arXiv:1409.1556) without Caffe.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"verydeep.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except VerydeepError as e:
        if args.debug:
            raise
        print(f"verydeep {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"verydeep {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `verydeep ... | head` closed the pipe: stop quietly, like other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
