"""Mechanisms every other package shares, each written once; no VGG knowledge lives here.

- :mod:`.atomic`: atomic file writes (:func:`atomic_path`, :func:`write_json`, ...).
- :mod:`.store`: the resumable chunk store that ``evaluate`` and ``extract`` write their
  partial results to (:class:`ChunkStore`), with one model fingerprint.
- :mod:`.distributed`: the torchrun context, sharding, and :func:`main_rank_first`.
- :mod:`.defaults`: the default device, loader workers and the precision table.
- :mod:`.numerics`: :func:`relative_error`, the metric every check reports.
- :mod:`.tables`: :func:`format_table` for terminal output.
- :mod:`.paths`: :func:`home`, where caches live.

Only :mod:`verydeep.errors` is below this package; submodules import torch where they need
it, so ``defaults``, ``tables``, ``paths`` and ``atomic`` stay cheap to import.
"""

from verydeep.core.atomic import atomic_path, write_bytes, write_json, write_text
from verydeep.core.defaults import PRECISIONS, default_device, default_workers
from verydeep.core.numerics import relative_error
from verydeep.core.paths import home
from verydeep.core.tables import format_table

__all__ = [
    "PRECISIONS",
    "atomic_path",
    "default_device",
    "default_workers",
    "format_table",
    "home",
    "relative_error",
    "write_bytes",
    "write_json",
    "write_text",
]
