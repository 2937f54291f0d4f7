"""Options several subcommands share, spelled once."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verydeep.configs import CROP, MAX_LOADER_WORKERS, MAX_SCALE
from verydeep.core.atomic import file_in_the_way
from verydeep.core.defaults import CALIBRATION_IMAGES, INFERENCE_PRECISIONS, PRECISIONS

__all__ = [
    "add_alias",
    "add_command",
    "add_calibration_options",
    "add_device_options",
    "add_json_option",
    "add_model_options",
    "calibration_for",
    "add_weights_options",
    "float_range",
    "image_side",
    "int_range",
    "output_file",
    "output_folder",
    "positive_int",
    "precision_report",
    "print_json",
    "print_skipped",
    "test_scale",
    "workers_count",
]


def _bounds(low: float, high: float | None, low_open: bool = False) -> str:
    if high is None:
        return f"{'greater than' if low_open else 'at least'} {low:g}"
    return f"in ({low:g}, {high:g}]" if low_open else f"{low:g}..{high:g}"


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``low..high`` (no upper bound when ``high`` is None).
    A value outside is argparse's one-line error naming the option, the range and the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high)}, found {value}")
        return value

    return parse


def float_range(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number from ``low`` (excluded when ``low_open``) to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
        inside = (value > low if low_open else value >= low) and (high is None or value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(low, high, low_open)}, found {text}")
        return value

    return parse


#: Sizes, counts and batch sizes: at least one.
positive_int = int_range(1)
#: Decoding processes (0 decodes in the main process).
workers_count = int_range(0, MAX_LOADER_WORKERS)
#: A rescale's shorter side (S or Q) or a crop: a pixel at least, :data:`MAX_SCALE` at most.
image_side = int_range(1, MAX_SCALE)
#: A test scale Q: the classic net's crop must fit in it.
test_scale = int_range(CROP, MAX_SCALE)


def _not_under_a_file(text: str) -> None:
    blocker = file_in_the_way(text)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {blocker} is a file, not a folder")


def output_file(text: str) -> str:
    """An argparse ``type`` for a file a command writes: refused before any work when a file
    stands where a folder must be (``notes.txt/out.npz``) or the path is a folder."""
    _not_under_a_file(text)
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return text


def output_folder(text: str) -> str:
    """An argparse ``type`` for a folder a command writes into (refused when it is a file)."""
    _not_under_a_file(text)
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return text


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


def add_device_options(p: argparse._ActionsContainer, precision_default: str = "fp32", *, int8: bool = True) -> None:
    """``--device`` and ``--precision`` (with int8's calibration options unless ``int8=False``)."""
    p.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1); default: cuda if available")
    p.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS if int8 else tuple(PRECISIONS),
        default=precision_default,
        help="numeric precision (default: %(default)s; fp32 is exact"
        + ("; int8 is calibrated, see --calibration)" if int8 else ")"),
    )
    if int8:
        add_calibration_options(p)


def add_calibration_options(p: argparse._ActionsContainer, *, capped: bool = True) -> None:
    """``--calibration DIR`` and ``--calibration-images N``: what ``--precision int8`` is calibrated on.
    ``capped``: the runtime calibrates on at most :data:`CALIBRATION_IMAGES` (export's onnxruntime on all N)."""
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="int8: images to calibrate the activation ranges on (a folder or list file; default: generated images "
        "for bench, the command's own first images otherwise)",
    )
    p.add_argument(
        "--calibration-images",
        type=positive_int,
        default=CALIBRATION_IMAGES,
        metavar="N",
        help="int8: how many calibration images to use"
        + (f", up to {CALIBRATION_IMAGES}" if capped else "")
        + " (default: %(default)s)",
    )


def add_model_options(p: argparse._ActionsContainer, precision_default: str = "fp32", *, int8: bool = True) -> None:
    """The options of every command that runs a model: which weights, on which device, how precise."""
    add_weights_options(p)
    add_device_options(p, precision_default, int8=int8)


def calibration_for(
    args: argparse.Namespace, inputs: Any, *, command: str, quiet: bool = False, capped: bool = True
) -> Any:
    """The int8 calibration batch (None unless ``--precision int8``): ``--calibration``'s images,
    else the first of the command's own ``inputs``, which it says on stderr. ``capped`` decodes at
    most :data:`CALIBRATION_IMAGES`, all the runtime's calibration keeps (export's onnxruntime uses all)."""
    if getattr(args, "precision", None) != "int8":
        return None
    from verydeep.data.calibration import calibration_images

    count = min(args.calibration_images, CALIBRATION_IMAGES) if capped else args.calibration_images
    if not args.calibration and not quiet:
        print(
            f"verydeep {command}: int8 is calibrated on the first {count} of its own images "
            "(--calibration DIR chooses others)",
            file=sys.stderr,
        )
    return calibration_images(args.calibration or inputs, count)


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
