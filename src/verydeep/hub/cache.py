"""The local cache of official weights: download once, verify, convert to safetensors, reuse.

``fetch("vgg16")`` downloads the caffemodel (resumable, size and md5 verified) into
``<home>/downloads/``, converts it to ``<home>/vgg16.safetensors`` whose metadata records the
configuration, the input space, the class names and the source's sha256, and deletes the
caffemodel; from then on the safetensors file is mapped. A caffemodel put in ``downloads/`` by
hand (machines without network) is verified and converted the same way.
"""

from __future__ import annotations

from pathlib import Path

from verydeep.core.paths import home
from verydeep.errors import WeightsError
from verydeep.hub.registry import get_entry, list_weights, url_of


def cached_path(name: str) -> Path:
    """Where the converted registry model ``name`` lives once fetched."""
    return home() / f"{name}.safetensors"


def download_path(name: str) -> Path:
    """Where the registry model's caffemodel is downloaded to (or put by hand)."""
    return home() / "downloads" / get_entry(name).filename


def fetch(name: str, *, progress: bool = True) -> Path:
    """Make sure the registry model ``name`` is in the cache as safetensors; return its path."""
    # The converters import torch: only fetching pays for them, not listing or locating the cache.
    from verydeep.formats.caffe.load import load_caffemodel
    from verydeep.formats.safetensors import save_safetensors
    from verydeep.hub.download import download, verify

    entry = get_entry(name)
    target = cached_path(name)
    if target.exists():
        return target
    source = download_path(name)
    try:
        if source.exists():  # put there by hand (offline machines): verify, no network needed
            sha256 = verify(source, size=entry.size, md5=entry.md5)
        else:
            sha256 = download(url_of(entry), source, size=entry.size, md5=entry.md5, progress=progress)
    except WeightsError as e:
        raise WeightsError(
            f"{e}. Without network: download {entry.url} ({entry.size:,} bytes, md5 {entry.md5}) "
            f"and give its path (/path/to/{entry.filename}) where you gave {name!r}, or put it at {source}"
        ) from None
    model = load_caffemodel(source)
    save_safetensors(model, target, source=entry.url, source_sha256=sha256, license=entry.license)
    source.unlink()  # the safetensors file holds the same arrays; keep one copy
    return target


def describe_registry() -> list[dict[str, object]]:
    """One row per registry entry, with whether it is in the cache (for ``verydeep weights list``)."""
    return [
        {
            "name": e.name,
            "config": e.config,
            "description": e.description,
            "cached": cached_path(e.name).exists(),
            "path": str(cached_path(e.name)),
            "url": url_of(e),
            "size": e.size,
            "md5": e.md5,
        }
        for e in list_weights()
    ]
