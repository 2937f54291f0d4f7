"""The ``verydeep`` command: parses arguments and calls the library; nothing else.

Each subcommand lives in ``verydeep/cli/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. User errors (:class:`VerydeepError`), bad arguments (argparse's checks and
the range of every numeric option, :mod:`.common`) and OS errors print one line and exit 1;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

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


class UsageError(Exception):
    """A command line argparse refused; ``prog`` is the (sub)command it belongs to."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse's parser with verydeep's convention for errors: one line (no usage block), exit
    status 1, like every other error (subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 1
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
    except OSError as e:  # the OS refused something no check foresaw: still one line
        if args.debug:
            raise
        print(f"verydeep {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 1


def _os_error(e: OSError) -> str:
    """``PATH: reason`` for an OSError (its own text when it names no file), on one line."""
    if e.filename is not None and e.strerror:
        return f"{os.fsdecode(e.filename)}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
