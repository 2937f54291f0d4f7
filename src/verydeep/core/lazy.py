"""Packages whose public names are imported on first use (PEP 562).

``import verydeep`` and the command line's ``--help`` must not pay for torch; a package's
``__init__`` therefore names where each public object lives and imports it when first asked.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, defined_in: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``defined_in`` maps each public name to
    the module that defines it; the object found is kept on the package, so later lookups are
    plain attribute reads."""

    def __getattr__(name: str) -> Any:
        module = defined_in.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
