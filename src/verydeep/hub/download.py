"""Resumable, verified downloads into the cache.

The bytes go to ``<dest>.part``; an interrupted transfer continues from there with an HTTP
Range request. Only a file whose size and md5 match is renamed to ``dest``, so the cache never
holds a half-written or wrong file under its final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from verydeep.errors import WeightsError

CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK * 8), b""):
            h.update(block)
    return h.hexdigest()


def _hashes_of(path: Path) -> tuple[hashlib._Hash, hashlib._Hash]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    if path.exists():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK * 8), b""):
                md5.update(block)
                sha.update(block)
    return md5, sha


def verify(path: str | os.PathLike, *, size: int | None = None, md5: str | None = None) -> str:
    """Check a complete local file (one put in the cache by hand) against ``size`` and ``md5``;
    return its sha256. A mismatch raises :class:`WeightsError` naming the file, expected and found."""
    path = Path(path)
    found = path.stat().st_size
    if size is not None and found != size:
        raise WeightsError(f"{path}: expected {size:,} bytes, found {found:,} (incomplete or another file?)")
    md5_h, sha_h = _hashes_of(path)
    if md5 is not None and md5_h.hexdigest() != md5:
        raise WeightsError(f"{path}: md5 mismatch: expected {md5}, found {md5_h.hexdigest()}")
    return sha_h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> str:
    """Download ``url`` to ``dest``, resuming a previous ``.part``; verify size and md5.

    Returns the sha256 of the verified file. Raises :class:`WeightsError` when the network is
    unreachable (saying where to get the file), or when the size or md5 does not match (the
    partial file is removed so the next attempt starts clean).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
    md5_h, sha_h = _hashes_of(part)
    have = part.stat().st_size if part.exists() else 0
    if size is None or have < size:
        request = urllib.request.Request(url, headers={"User-Agent": "verydeep"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and size is not None and have == size:
                response = None  # already complete
            else:
                raise WeightsError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise WeightsError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
        if response is not None:
            with response:
                if have and response.status != 206:  # server ignored the Range: start over
                    have, (md5_h, sha_h) = 0, (hashlib.md5(), hashlib.sha256())
                    mode = "wb"
                else:
                    mode = "ab"
                length = response.headers.get("Content-Length")
                total = size if size is not None else (have + int(length) if length else None)
                bar = tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                    leave=False,
                )
                try:
                    with open(part, mode) as f:
                        while block := response.read(CHUNK):
                            f.write(block)
                            md5_h.update(block)
                            sha_h.update(block)
                            bar.update(len(block))
                except (OSError, http.client.HTTPException) as e:
                    raise WeightsError(
                        f"{url}: download interrupted at {part.stat().st_size} bytes ({e}); "
                        f"run the same command again to resume from {part}"
                    ) from None
                finally:
                    bar.close()
    found = part.stat().st_size
    if size is not None and found != size:
        if found > size:
            part.unlink()
        raise WeightsError(
            f"{url}: expected {size} bytes, found {found}"
            + ("; run the same command again to resume" if found < size else "; removed the partial file")
        )
    if md5 is not None and md5_h.hexdigest() != md5:
        part.unlink()
        raise WeightsError(f"{dest.name}: md5 mismatch: expected {md5}, found {md5_h.hexdigest()}; removed it")
    os.replace(part, dest)
    return sha_h.hexdigest()
