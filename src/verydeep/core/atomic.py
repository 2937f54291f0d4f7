"""Safe file writes: atomic, concurrency-safe, and OS errors as one line naming the path.

Every writer in verydeep goes through :func:`atomic_path`: the bytes go to a temporary file in
the same folder (``os.replace`` is atomic only within one file system), which replaces the
target only once it is complete. A crash or a kill leaves at most a temporary file whose name
matches :data:`TEMP_GLOB`, which :func:`remove_stale` clears; concurrent writers of one target
never share a temporary file (the name carries the process id and a random tag).

A write that the OS refuses (disk full, an output path under a regular file, a read-only or
unwritable place) becomes a :class:`~verydeep.errors.VerydeepError` naming the target and the
OS's reason (:func:`write_error`), and leaves no temporary file behind. :func:`make_dirs`
creates folders with the same errors.

:func:`file_lock` is the one inter-process lock (``fcntl.flock`` on a ``.lock`` file): the cache
holds it around an entry's download and conversion (a second process waits), the jobs around
their output (a second run refuses at once).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from verydeep.errors import VerydeepError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): no flock
    fcntl = None  # type: ignore[assignment]

#: Descriptors of the lock files this process holds: a forked child (a DataLoader worker) closes
#: its copies at once, so the lock dies with the process that took it, not with its last child.
_HELD: set[int] = set()
#: The names of temporary files left behind by an interrupted write (in the target's folder).
TEMP_GLOB = ".*.tmp-*"
#: What a user can do about each OS error a write meets (``os.strerror`` says what happened).
WRITE_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "the file size limit (ulimit -f, or the file system's) is reached; write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "write elsewhere, or change the folder's permissions",
    errno.EPERM: "write elsewhere, or change the folder's permissions",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENAMETOOLONG: "use a shorter name",
}
#: Libraries that write in C or Rust (h5py, safetensors, pyarrow) report the OS error inside
#: their own exception's text; this finds its number there.
_ERRNO_IN_TEXT = re.compile(r"(?:errno\s*=?\s*|os error |\[errno )(\d+)", re.IGNORECASE)


# -- OS errors as one line ----------------------------------------------------------------------
def errno_of(error: BaseException) -> int | None:
    """The OS error number behind ``error``: an OSError's, or one a library quotes in its text."""
    if isinstance(error, OSError) and error.errno:
        return int(error.errno)
    found = _ERRNO_IN_TEXT.search(str(error))
    return int(found[1]) if found and int(found[1]) in errno.errorcode else None


def write_error(path: str | os.PathLike[str], error: BaseException) -> VerydeepError | None:
    """``error`` (raised while writing ``path``) as a one-line error naming ``path`` and the OS's
    reason; None when ``error`` carries no OS error (a bug, not the disk)."""
    code = errno_of(error)
    if code is None:
        return None
    path = Path(path)
    if code in (errno.ENOTDIR, errno.EEXIST):  # a file stands where a folder must be
        blocker = file_in_the_way(path)
        if blocker is not None:
            return VerydeepError(f"{path}: cannot write: {blocker} is a file, not a folder")
    advice = WRITE_ADVICE.get(code)
    return VerydeepError(f"{path}: cannot write: {os.strerror(code)}" + (f"; {advice}" if advice else ""))


def file_in_the_way(path: str | os.PathLike[str]) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (ENOTDIR's culprit): an
    output under a regular file can be refused before any work is done."""
    for parent in Path(path).parents:
        with suppress(OSError):
            if parent.exists() or parent.is_symlink():
                return None if parent.is_dir() else parent
    return None


def make_dirs(folder: str | os.PathLike[str], *, target: str | os.PathLike[str] | None = None) -> Path:
    """``mkdir -p folder``; a file in the way or an unwritable place is a one-line error naming
    ``target`` (the file to be written there; by default the folder)."""
    folder = Path(folder)
    named = Path(target) if target is not None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if folder.exists() and not folder.is_dir():
            raise VerydeepError(f"{named}: cannot write: {folder} is a file, not a folder") from None
        raise (write_error(named, e) or e) from None
    return folder


def _check_target(path: Path) -> None:
    """Refuse to replace anything but a file: a folder, a device (``/dev/null``), a socket."""
    with suppress(OSError):
        if path.is_symlink() or not path.exists() or path.is_file():
            return
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise VerydeepError(f"{path}: cannot write: it exists and is {kind}; give a file name")


# -- atomic writes --------------------------------------------------------------------------------
def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path`` that keeps its suffix (``.fc7.npz.tmp-123-ab12cd34.npz``):
    writers that infer the format from the suffix (numpy, matplotlib, onnx) see the right one."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``,
    on any error (or interrupt) it is removed and ``path`` is left as it was. An OS error (raised
    by the body's writer or by the rename) becomes a one-line :class:`VerydeepError`.

    ``durable`` also survives a power cut, not only a killed process: the bytes are flushed to
    disk before the rename, and the rename itself after (for checkpoints and converted weights).
    """
    path = Path(path)
    _check_target(path)
    make_dirs(path.parent, target=path)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.exists():  # writers that create private files (safetensors: 0600) get the usual mode
            os.chmod(tmp, _usual_mode())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, VerydeepError) and _about(e, path, tmp):
            error = write_error(path, e)
            if error is not None:
                raise error from e
        raise


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[IO[bytes]]:
    """:func:`atomic_path` with the temporary file open for writing (binary). Writers that turn
    the OS's error into their own (``torch.save``: "unexpected pos") still give the OS's reason:
    the file records the first error its ``write`` met."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, "xb") as raw:
        f = _RecordingFile(raw)
        try:
            yield f  # type: ignore[misc]
        except Exception as e:
            if f.error is not None and errno_of(e) is None:
                raise f.error from e  # atomic_path turns it into the one-line error
            raise


class _RecordingFile(io.RawIOBase):
    """A binary file that remembers the first OSError its ``write`` raised."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def write(self, data: Any) -> int:
        try:
            return self.raw.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        if self.raw.closed:
            return
        try:
            self.raw.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()


def _about(error: BaseException, path: Path, tmp: Path) -> bool:
    """Whether an OSError concerns this write (no file named, or the target, the temporary
    file or a folder above them), not a file the body happened to read."""
    name = getattr(error, "filename", None)
    if not isinstance(error, OSError) or name is None:
        return True
    named = Path(os.fsdecode(name))
    return named in (path, tmp) or named in path.parents


def _usual_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk; a no-op where folders cannot be opened."""
    if path.is_dir() and sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (strict JSON: NaN and infinities are refused)."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files an interrupted write left in ``folder``; return them."""
    found = sorted(Path(folder).glob(TEMP_GLOB)) if Path(folder).is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


# -- one process at a time --------------------------------------------------------------------------
def to_stderr(message: str) -> None:
    """Show ``message`` on stderr at once (flushed, so it is not held behind a progress bar): the
    default ``note`` of the locks, downloads and cache."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def file_lock(
    path: str | os.PathLike[str],
    busy: Callable[[str], str],
    *,
    wait: bool,
    note: Callable[[str], None] = to_stderr,
    target: str | os.PathLike[str] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created; removed on release) for the body.

    When another process holds it, ``busy(holder)`` (``holder``: "pid 123") is either the
    :class:`VerydeepError` raised at once (``wait=False``) or the note shown once before waiting
    for it (``wait=True``). The kernel drops the lock of a killed process, so a
    lock file left by a SIGKILL blocks nobody. Without ``fcntl`` (not POSIX) there is no lock:
    a note says so and the body runs. ``target``: what an OS error creating the lock file names
    (the output it guards; by default the lock file).
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        note(f"note: {path}: no file locks on this system (they need POSIX fcntl); run one verydeep process at a time")
        yield
        return
    fd = _acquire(path, busy, wait, note, Path(target) if target is not None else path)
    _HELD.add(fd)
    try:
        yield
    finally:
        # Unlink while still holding it: a process waiting on this inode then sees it is stale.
        with suppress(OSError):
            os.unlink(path)
        _HELD.discard(fd)
        os.close(fd)


def _acquire(path: Path, busy: Callable[[str], str], wait: bool, note: Callable[[str], None], target: Path) -> int:
    """The descriptor of ``path``, locked by this process (the protocol that lets the holder
    remove the lock file: lock, then check that the path still names the locked file)."""
    assert fcntl is not None
    noted = False
    while True:
        make_dirs(path.parent, target=target)
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644
            )
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise VerydeepError(f"{path}: a symbolic link where verydeep keeps a lock file; remove it") from None
            raise (write_error(target, e) or e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                message = busy(_holder(fd))
                if not wait:
                    raise VerydeepError(message) from None
                if not noted:
                    note(message)
                    noted = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, fd):
                _sign(fd)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file as it finished: lock the new one


def _close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the parent keeps its
    lock; without this a worker left behind by a killed run would hold it on)."""
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _sign(fd: int) -> None:
    """Write who holds the lock into it (for the other process's message); best effort."""
    with suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def _holder(fd: int) -> str:
    """ "pid N" (and the host when it is another one) of the process holding the lock."""
    with suppress(OSError, ValueError):
        pid, _, host = os.pread(fd, 300, 0).decode("utf-8", "replace").strip().partition(" ")
        if pid.isdigit():
            return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
    return "pid unknown"
