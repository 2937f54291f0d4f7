"""Resumable, verified downloads into the cache.

The bytes go to ``<dest>.part``; an interrupted transfer continues from there with an HTTP
Range request. Only a file whose size (given, or the one the server announced) and md5 match is
renamed to ``dest``, so the cache never holds a half-written or wrong file under its final name.

One process at a time: callers hold the cache entry's lock (:mod:`verydeep.hub.cache`) around a
download, so two processes never append to one ``.part``. The cache follows no symbolic links:
the ``.part`` and the files verified are opened with ``O_NOFOLLOW``, and a link found where a
``.part`` or a downloaded file belongs is removed (with a one-line note) before anything is
written, so a download can never land in the link's target.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from verydeep.core.atomic import make_dirs, to_stderr, write_error
from verydeep.errors import WeightsError

CHUNK = 1 << 20
#: Open flags that refuse a symbolic link as the last path component (0 where the OS has none).
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


#: The URL schemes verydeep downloads from.
URL_SCHEMES = ("http", "https", "ftp")


def is_url(text: str) -> bool:
    """Whether a weights argument is a URL to download rather than a local path."""
    return "://" in text and urllib.parse.urlsplit(text).scheme.lower() in URL_SCHEMES


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The digest of a user's file (``verydeep convert``'s input: links followed, it is theirs)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK * 8), b""):
            h.update(block)
    return h.hexdigest()


def open_in_cache(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> IO[bytes]:
    """A cache file opened unbuffered without following a symbolic link (``ELOOP`` is refused
    with a one-line error: a link appeared between the check and the open)."""
    try:
        fd = os.open(path, flags | NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise WeightsError(f"{path}: a symbolic link in the cache; verydeep does not follow links there") from None
        raise (write_error(path, e) if flags & os.O_CREAT else None) or e from None
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb", buffering=0)


def drop_link(path: Path, note: Callable[[str], None] = to_stderr) -> None:
    """Remove a symbolic link where the cache keeps a file (only the link, not what it names)."""
    if path.is_symlink():
        path.unlink()
        note(f"{path}: a symbolic link in the cache (verydeep does not follow links there); removed it")


def _hashes(f: IO[bytes], *, md5: bool) -> tuple[Any, Any]:
    """md5 (None unless ``md5``: only registry files have one to check) and sha256 of an open
    file from its start; leaves it at its end."""
    md5_h, sha = (hashlib.md5() if md5 else None), hashlib.sha256()
    f.seek(0)
    while block := f.read(CHUNK * 8):
        if md5_h is not None:
            md5_h.update(block)
        sha.update(block)
    return md5_h, sha


def verify(
    path: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
) -> str:
    """Check a complete file in the cache against ``size``, ``md5`` and ``sha256``; return its
    sha256. A mismatch raises :class:`WeightsError` naming the file, expected and found; a
    symbolic link is refused."""
    path = Path(path)
    with open_in_cache(path) as f:
        found = os.fstat(f.fileno()).st_size
        if size is not None and found != size:
            raise WeightsError(f"{path}: expected {size:,} bytes, found {found:,} (incomplete or another file?)")
        md5_h, sha_h = _hashes(f, md5=md5 is not None)
    if md5 is not None and md5_h.hexdigest() != md5:
        raise WeightsError(f"{path}: md5 mismatch: expected {md5}, found {md5_h.hexdigest()}")
    if sha256 is not None and sha_h.hexdigest() != sha256:
        raise WeightsError(f"{path}: sha256 mismatch: expected {sha256}, found {sha_h.hexdigest()}")
    return str(sha_h.hexdigest())


def _announced(response: Any, have: int) -> int | None:
    """The complete file's size as the server announced it: Content-Range's total for a
    resumed (206) response, else Content-Length."""
    if response.status == 206:
        found = re.search(r"/(\d+)\s*$", response.headers.get("Content-Range") or "")
        if found:
            return int(found[1])
    length = response.headers.get("Content-Length")
    return (have if response.status == 206 else 0) + int(length) if length and length.isdigit() else None


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
    note: Callable[[str], None] = to_stderr,
) -> str:
    """Download ``url`` to ``dest``, resuming a previous ``.part``; verify size and md5.

    Call it holding the cache entry's lock. Returns the sha256 of the verified file. Raises
    :class:`WeightsError` when the network is unreachable (saying where to get the file), when
    the size or md5 does not match (a partial file that cannot be a prefix of the real one is
    removed so the next attempt starts clean), or when the disk refuses the bytes.
    """
    dest = Path(dest)
    make_dirs(dest.parent)
    part = dest.with_name(dest.name + ".part")
    drop_link(part, note)
    drop_link(dest, note)
    with open_in_cache(part, os.O_RDWR | os.O_CREAT) as f:
        have = os.fstat(f.fileno()).st_size
        if size is not None and have > size:  # longer than the real file: cannot be a prefix of it
            f.truncate(0)
            have = 0
        md5_h, sha_h = _hashes(f, md5=md5 is not None)
        expected = size
        if size is None or have < size:
            response = _request(url, have, size, timeout)
            if response is not None:
                with response:
                    if have and response.status != 206:  # server ignored the Range: start over
                        f.seek(0)
                        f.truncate(0)
                        have, (md5_h, sha_h) = 0, (hashlib.md5() if md5 is not None else None, hashlib.sha256())
                    expected = size if size is not None else _announced(response, have)
                    _receive(response, f, part, url, md5_h, sha_h, have=have, total=expected, progress=progress)
        found = os.fstat(f.fileno()).st_size
    if expected is not None and found != expected:
        if found > expected:
            part.unlink()
        raise WeightsError(
            f"{url}: expected {expected} bytes, found {found}"
            + ("; run the same command again to resume" if found < expected else "; removed the partial file")
        )
    if md5 is not None and md5_h.hexdigest() != md5:
        part.unlink()
        raise WeightsError(f"{dest.name}: md5 mismatch: expected {md5}, found {md5_h.hexdigest()}; removed it")
    os.replace(part, dest)  # replaces a link put there since, never writes through it
    return str(sha_h.hexdigest())


def _request(url: str, have: int, size: int | None, timeout: float) -> Any:
    """The response for the bytes from ``have`` on; None when the file is already complete."""
    request = urllib.request.Request(url, headers={"User-Agent": "verydeep"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and size is not None and have == size:
            return None  # already complete
        raise WeightsError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None


def _receive(
    response: Any,
    f: IO[bytes],
    part: Path,
    url: str,
    md5_h: Any,
    sha_h: Any,
    *,
    have: int,
    total: int | None,
    progress: bool,
) -> None:
    """Append the response's body to the open ``.part``, hashing it on the way (md5 when ``md5_h``)."""
    bar = tqdm(
        total=total,
        initial=have,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name[: -len(".part")],
        disable=not progress,
        leave=False,
    )
    try:
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise WeightsError(
                    f"{url}: download interrupted at {f.tell()} bytes ({e}); "
                    f"run the same command again to resume from {part}"
                ) from None
            if not block:
                return
            try:
                view = memoryview(block)
                while view:  # an unbuffered write may take part of the block
                    written = f.write(view)
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view = view[written:]
            except OSError as e:
                raise (write_error(part, e) or e) from None
            if md5_h is not None:
                md5_h.update(block)
            sha_h.update(block)
            bar.update(len(block))
    finally:
        bar.close()
