"""Options several subcommands share, spelled once."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from verydeep.core.defaults import PRECISIONS

__all__ = [
    "add_alias",
    "add_command",
    "add_device_options",
    "add_json_option",
    "add_model_options",
    "add_weights_options",
    "precision_report",
    "print_json",
    "print_skipped",
]


def add_command(
    sub: argparse._SubParsersAction, name: str, *, help: str, examples: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """Register subcommand ``name``: ``help`` is its line in ``verydeep --help``; ``examples`` are
    printed after its options as written (argparse would re-wrap them)."""
    kwargs.setdefault("description", help[:1].upper() + help[1:] + ".")
    p = sub.add_parser(name, help=help, epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    # --debug works after the subcommand too; SUPPRESS keeps one given before it
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return p


def add_alias(p: argparse._ActionsContainer, old: str, *, dest: str, **kwargs: Any) -> None:
    """Accept ``old``, another spelling of option ``dest``, without listing it in ``--help``."""
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_weights_options(p: argparse._ActionsContainer, default: str | None = "vgg16") -> None:
    p.add_argument(
        "--weights",
        default=default,
        metavar="NAME|PATH",
        help="registry name (vgg16, vgg19), or a .caffemodel/.safetensors/.pth/.h5 path or URL (default: %(default)s)",
    )
    p.add_argument("--prototxt", metavar="PATH", help="deploy prototxt for a caffemodel whose net is not a known VGG")


def add_device_options(p: argparse._ActionsContainer, precision_default: str = "fp32") -> None:
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1); default: cuda if available")
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=precision_default,
        help="numeric precision (default: %(default)s; fp32 is exact)",
    )


def add_model_options(p: argparse._ActionsContainer, precision_default: str = "fp32") -> None:
    """The options of every command that runs a model: which weights, on which device, how precise."""
    add_weights_options(p)
    add_device_options(p, precision_default)


def precision_report(model: Any, precision: str, device: str, *, command: str, quiet: bool = False) -> dict[str, str]:
    """What ``--precision`` will really compute in, for tables and ``--json``; the reason goes to
    stderr (unless ``quiet``) when it differs from what was asked (bf16 on a CPU without it)."""
    computed, why = precision, ""
    if precision != "fp32" and callable(getattr(model, "optimized", None)):  # the fast path decides
        from verydeep.runtime.plan import effective_precision

        computed, why = effective_precision(precision, device)
    if why and not quiet:
        print(f"verydeep {command}: {why}", file=sys.stderr)
    return {"requested": precision, "computed": computed, "note": why}


def add_json_option(p: argparse._ActionsContainer) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_skipped(items: list[tuple[str, str]], what: str, more: str, limit: int = 20) -> None:
    """List skipped (unreadable) inputs on stderr: ``items`` are (path, reason); ``more`` says
    where the rest of the list is when there are more than ``limit``."""
    if not items:
        return
    print(f"\nskipped {len(items)} unreadable image(s){what}:", file=sys.stderr)
    for path, reason in items[:limit]:
        print(f"  {path}: {reason}", file=sys.stderr)
    if len(items) > limit:
        print(f"  ... and {len(items) - limit} more ({more})", file=sys.stderr)
