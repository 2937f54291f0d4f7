"""Where verydeep keeps what it downloads, converts and compiles."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$VERYDEEP_HOME``, else ``$XDG_CACHE_HOME/verydeep``, else ``~/.cache/verydeep``."""
    if os.environ.get("VERYDEEP_HOME"):
        return Path(os.environ["VERYDEEP_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "verydeep"
