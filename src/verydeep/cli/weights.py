"""verydeep weights [list|download NAME|path NAME] — the registry of official models."""

from __future__ import annotations

import argparse
import sys

from verydeep.cli.common import add_command, add_json_option, print_json
from verydeep.core.tables import format_table

EXAMPLES = """examples:
  verydeep weights list
  verydeep weights download vgg16      # once: download, verify size+md5, convert to safetensors
  verydeep weights path vgg16
environment:
  VERYDEEP_HOME    cache folder (default: ~/.cache/verydeep)
  VERYDEEP_MIRROR  base URL to download the caffemodels from instead of the VGG site
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "weights", help="list, download or locate the official weights", examples=EXAMPLES)
    p.add_argument("action", nargs="?", default="list", choices=("list", "download", "path"))
    p.add_argument("name", nargs="?", help="registry name (vgg16, vgg19)")
    add_json_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from verydeep.errors import VerydeepError
    from verydeep.hub.cache import cached_path, describe_registry, fetch
    from verydeep.hub.registry import REGISTRY

    if args.action == "list":
        rows = describe_registry()
        if args.json:
            print_json(rows)
        else:
            print(
                format_table(
                    [[r["name"], r["config"], "yes" if r["cached"] else "no", r["description"]] for r in rows],
                    ["name", "config", "cached", "description"],
                )
            )
        return 0
    if args.name not in REGISTRY:
        raise VerydeepError(f"weights {args.action}: expected a registry name (vgg16, vgg19), found {args.name!r}")
    if args.action == "download":
        print(fetch(args.name))
    else:
        path = cached_path(args.name)
        print(path)
        if not path.exists():
            print(f"verydeep weights path: {path} is not there yet; `verydeep weights download {args.name}` fetches it",
                  file=sys.stderr)  # fmt: skip
    return 0
