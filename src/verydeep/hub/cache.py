"""The local cache of weights: download once, verify, convert to safetensors, reuse.

``fetch("vgg16")`` downloads the caffemodel (resumable, size and md5 verified) into
``<home>/downloads/``, converts it to ``<home>/vgg16.safetensors`` whose metadata records the
configuration, the input space, the class names and the source's sha256, and deletes the
caffemodel; from then on the safetensors file is mapped. A caffemodel put in ``downloads/`` by
hand (machines without network) is verified and converted the same way.

``fetch_url(url)`` keeps a file downloaded from a URL under ``<home>/urls/<key>-<name>``: the key
is a short sha256 of the whole URL (two URLs ending in the same file name are two entries), the
name is the URL's for humans (and for its suffix, which picks the reader). ``<entry>.json``
records the URL, size and sha256 of what was downloaded.

Safe under concurrency and tampering: one process at a time downloads and converts an entry
(an exclusive lock on ``<entry>.lock``; the others wait, saying so, then use the verified file),
what the cache holds is verified again before every use (a safetensors file's size against its
header, a URL download's size and sha256 against its record), an entry that fails is removed
and fetched again with a one-line note, and no symbolic link in the cache is followed.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from verydeep.core.atomic import file_lock, to_stderr, write_json
from verydeep.core.paths import home
from verydeep.errors import WeightsError
from verydeep.hub.registry import get_entry, list_weights, url_of

#: Hex digits of the URL's sha256 in a URL entry's name: 64 bits, so distinct URLs never meet.
URL_KEY_LENGTH = 16
#: Longest file name kept from a URL (file systems allow 255 bytes; the key and suffixes need some).
URL_NAME_LENGTH = 120


def cached_path(name: str) -> Path:
    """Where the converted registry model ``name`` lives once fetched."""
    return home() / f"{name}.safetensors"


def download_path(name: str) -> Path:
    """Where the registry model's caffemodel is downloaded to (or put by hand)."""
    return home() / "downloads" / get_entry(name).filename


def url_path(url: str) -> Path:
    """Where the file downloaded from ``url`` lives: ``urls/<sha256 of the URL>-<its name>``."""
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:URL_KEY_LENGTH]
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[-URL_NAME_LENGTH:] or "weights"
    return home() / "urls" / f"{key}-{name}"


def entry_lock(entry: Path, what: str) -> AbstractContextManager[None]:
    """The lock of one cache entry, held around its download, verification and conversion; a
    second process waits for it (saying so once) and then finds the verified file."""

    def busy(holder: str) -> str:
        return f"waiting for another verydeep process ({holder}) downloading {what}"

    return file_lock(entry.with_name(entry.name + ".lock"), busy, wait=True)


def _removed(path: Path, why: str, note: Callable[[str], None]) -> None:
    path.unlink(missing_ok=True)
    note(f"{path}: {why}; removed it, fetching it again")


# -- registry models ------------------------------------------------------------------------------
def fetch(name: str, *, progress: bool = True, note: Callable[[str], None] = to_stderr) -> Path:
    """Make sure the registry model ``name`` is in the cache as verified safetensors; return its path."""
    entry = get_entry(name)
    target = cached_path(name)
    if _valid_safetensors(target, entry.config) is None:
        return target  # verified, no lock needed: the file is replaced atomically, never rewritten
    with entry_lock(target, name):
        if target.is_symlink():
            _removed(target, "a symbolic link in the cache (verydeep does not follow links there)", note)
        elif target.exists():
            problem = _valid_safetensors(target, entry.config)
            if problem is None:  # another process fetched it while this one waited
                return target
            _removed(target, problem, note)
        _download_and_convert(name, target, progress=progress, note=note)
    return target


def _valid_safetensors(path: Path, config: str) -> str | None:
    """None when ``path`` is a whole verydeep safetensors file of ``config`` (its header
    accounts for every byte: a truncated or appended file fails), else what is wrong."""
    from verydeep.formats.safetensors import read_metadata

    if path.is_symlink():
        return "a symbolic link in the cache"
    if not path.exists():
        return "missing"
    try:
        meta = read_metadata(path)
    except WeightsError as e:
        return str(e).removeprefix(f"{path}: ")
    if meta.get("config") != config:
        return f"holds configuration {meta.get('config')!r}, expected {config!r}"
    return None


def _download_and_convert(name: str, target: Path, *, progress: bool, note: Callable[[str], None]) -> None:
    """Under the entry's lock: the verified caffemodel (downloaded, or put by hand) to ``target``."""
    # The converters import torch: only fetching pays for them, not listing or locating the cache.
    from verydeep.formats.caffe.load import load_caffemodel
    from verydeep.formats.safetensors import save_safetensors
    from verydeep.hub.download import download, verify

    entry = get_entry(name)
    source = download_path(name)
    try:
        if source.is_symlink():
            raise WeightsError(
                f"{source}: a symbolic link; verydeep does not follow links in its cache (copy the file there)"
            )
        if source.exists():  # put there by hand (offline machines): verify, no network needed
            sha256 = verify(source, size=entry.size, md5=entry.md5)
        else:
            url = url_of(entry)
            sha256 = download(url, source, size=entry.size, md5=entry.md5, progress=progress, note=note)
    except WeightsError as e:
        raise WeightsError(
            f"{e}. Without network: download {entry.url} ({entry.size:,} bytes, md5 {entry.md5}) "
            f"and give its path (/path/to/{entry.filename}) where you gave {name!r}, or put it at {source}"
        ) from None
    model = load_caffemodel(source)
    save_safetensors(model, target, source=entry.url, source_sha256=sha256, license=entry.license)
    source.unlink()  # the safetensors file holds the same arrays; keep one copy


# -- any URL ----------------------------------------------------------------------------------------
def fetch_url(url: str, *, progress: bool = True, note: Callable[[str], None] = to_stderr) -> Path:
    """The verified local copy of the file at ``url`` (downloaded once); return its path."""
    entry = url_path(url)
    if _url_entry_problem(entry, url) is None:
        return entry
    with entry_lock(entry, url):
        record = _record_path(entry)
        if entry.is_symlink():
            _removed(entry, "a symbolic link in the cache (verydeep does not follow links there)", note)
        elif entry.exists():
            problem = _url_entry_problem(entry, url)
            if problem is None:  # another process fetched it while this one waited
                return entry
            _removed(entry, problem, note)
        record.unlink(missing_ok=True)
        from verydeep.hub.download import download

        sha256 = download(url, entry, progress=progress, note=note)
        write_json(record, {"url": url, "size": entry.stat().st_size, "sha256": sha256})
    return entry


def _record_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".json")


def _url_entry_problem(entry: Path, url: str) -> str | None:
    """None when ``entry`` is what was downloaded from ``url`` (size and sha256 as recorded)."""
    from verydeep.hub.download import verify

    if entry.is_symlink():
        return "a symbolic link in the cache"
    if not entry.exists():
        return "missing"
    try:
        record = json.loads(_record_path(entry).read_text(encoding="utf-8"))
        size, sha256, recorded_url = record["size"], record["sha256"], record["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no record of its download (size and sha256)"
    if recorded_url != url:
        return f"downloaded from {recorded_url}, not {url}"
    try:
        verify(entry, size=size, sha256=sha256)
    except WeightsError as e:
        return str(e).removeprefix(f"{entry}: ")
    return None


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
