"""Weights by name: the typed registry of official models, download, the cache, and ``load``.

- :mod:`.registry`: :class:`WeightsEntry` records (file, checksums, net, input space, parameter
  count, the paper's results with their protocol, licence, source) and :func:`list_weights`.
- :mod:`.download`: resumable, verified downloads.
- :mod:`.cache`: :func:`fetch` a registry model once into ``$VERYDEEP_HOME`` as safetensors.
- :mod:`.loader`: :func:`load` from a name, a file of any supported format, or a URL.
- :mod:`.info`: :func:`summarize`, what ``verydeep info`` prints about a file.

The file formats themselves live in :mod:`verydeep.formats`; this package decides which one
to use and where the bytes come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verydeep.core.lazy import lazy_attributes

if TYPE_CHECKING:
    from verydeep.hub.cache import cached_path, download_path, fetch
    from verydeep.hub.loader import load
    from verydeep.hub.registry import REGISTRY, PaperResult, WeightsEntry, get_entry, list_weights

#: Public name -> its module. Imported on first use: the registry and the cache paths need no
#: torch (``verydeep weights list`` stays quick), loading does.
_DEFINED_IN = {
    "cached_path": "verydeep.hub.cache",
    "download_path": "verydeep.hub.cache",
    "fetch": "verydeep.hub.cache",
    "load": "verydeep.hub.loader",
    "REGISTRY": "verydeep.hub.registry",
    "PaperResult": "verydeep.hub.registry",
    "WeightsEntry": "verydeep.hub.registry",
    "get_entry": "verydeep.hub.registry",
    "list_weights": "verydeep.hub.registry",
}

__all__ = [
    "REGISTRY",
    "PaperResult",
    "WeightsEntry",
    "cached_path",
    "download_path",
    "fetch",
    "get_entry",
    "list_weights",
    "load",
]


__getattr__ = lazy_attributes(__name__, _DEFINED_IN)
