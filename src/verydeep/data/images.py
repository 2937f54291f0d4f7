"""Image lists and a loader that decodes in worker processes and skips unreadable files.

Long runs (evaluate, extract, train) must not die on one corrupt JPEG among 50,000: a failed
decode becomes a ``Failed`` record that the job counts, lists and reports, never a zero row.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from verydeep.core.defaults import default_workers
from verydeep.data.preprocess import to_uint8_chw
from verydeep.errors import ImageError, VerydeepError

#: File endings treated as images when scanning folders (the formats of ``preprocess.FORMATS``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: The most bytes of a list, label or config file read: a list of 10 million image paths of
#: 100 characters (ImageNet-21k holds 14 million images in 1.3 TB); beyond that it is no list.
MAX_TEXT_BYTES = 2**30
#: The longest path and file name a list line may hold, in bytes: Linux's PATH_MAX and
#: NAME_MAX. A longer one names no file, and the OS refuses it with an error, not "no such file".
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255
#: What reading one image for a dataset may raise: decoding raises ImageError only; the others
#: come from the transform (a rescale out of memory). Each becomes a ``Failed`` record.
TRANSFORM_ERRORS = (ImageError, OSError, ValueError, RuntimeError, MemoryError)

_Key = TypeVar("_Key")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder``, recursively, in sorted (deterministic) order."""
    root = Path(folder)
    if not root.is_dir():
        raise VerydeepError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def quoted(value: object, limit: int = 80) -> str:
    """``value``'s repr for a one-line message, cut to ``limit`` characters (a bad line or value
    may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def reason(error: BaseException, limit: int = 200) -> str:
    """A third-party reader's exception as ``Type: message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_text(source: str | os.PathLike, what: str = "list file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a user's list, label or config file (``'-'``: stdin), decoded as UTF-8.

    Every way reading can fail (no such file, a folder, a NUL in the path, more than
    ``max_bytes``, bytes that are not UTF-8) is one :class:`VerydeepError` line naming the file
    (and for bad bytes, the line); ``what`` says what the file was expected to be.
    """
    name = "stdin" if str(source) == "-" else os.fspath(source)
    try:
        if str(source) == "-":
            if sys.stdin is None:  # a process started without one (pythonw, some daemons)
                raise VerydeepError(f"stdin: there is none to read a {what} from")
            stream = getattr(sys.stdin, "buffer", None)
            if stream is None:  # a text stream put in place of stdin (tests, embedding)
                text = sys.stdin.read(max_bytes + 1)
                if len(text) > max_bytes:
                    raise VerydeepError(f"stdin: more than {max_bytes:,} characters; not a {what}")
                return text
            data = stream.read(max_bytes + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise VerydeepError(f"{name}: no such {what}") from None
    except IsADirectoryError:
        raise VerydeepError(f"{name}: is a folder, expected a {what}") from None
    except OSError as e:
        raise VerydeepError(f"{name}: cannot read the {what} ({e.strerror or e})") from None
    except ValueError:  # a NUL byte in the path: no file can have that name
        raise VerydeepError(f"{name!r}: not a valid path for a {what} (it holds a NUL character)") from None
    if len(data) > max_bytes:
        raise VerydeepError(f"{name}: more than {max_bytes:,} bytes; not a {what}")
    return decode_utf8(data, name)


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as UTF-8 (a leading byte-order mark dropped); bad bytes are an error naming the line."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise VerydeepError(
            f"{name}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} in column {column}); save it as UTF-8"
        ) from None


def read_lines(source: str | os.PathLike, what: str = "list file") -> list[tuple[int, str]]:
    """(line number, stripped text) of each line of a text file that is neither blank nor a ``#`` comment.

    Lines are split at newlines only (not at the other characters ``str.splitlines`` breaks
    at), so the numbers are the ones an editor shows.
    """
    lines = read_text(source, what).split("\n")
    return [
        (n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")
    ]


def check_path_text(text: str, source: str | os.PathLike, line: int) -> str:
    """``text``, a path read from line ``line`` of ``source``, if a file could have it as its name."""
    name = "stdin" if str(source) == "-" else os.fspath(source)
    if "\0" in text:
        raise VerydeepError(f"{name}: line {line}: a path holds a NUL character, which no file name can")
    size = len(text.encode("utf-8", "surrogateescape"))
    longest = max(len(part.encode("utf-8", "surrogateescape")) for part in text.split("/"))
    if size > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        shown = text[:60] + "..."
        raise VerydeepError(
            f"{name}: line {line}: a path of {size:,} bytes ({shown!r}); paths are at most {MAX_PATH_BYTES} bytes "
            f"and each name in them at most {MAX_NAME_BYTES}"
        )
    return text


def listed_once(first: dict[_Key, int], key: _Key, line: int, source: object, shown: str | None = None) -> None:
    """Note that ``key`` is on line ``line`` of ``source`` in ``first`` (key -> its first line); a
    key seen before is an error naming both lines, as results are keyed by it. ``shown``: how the
    message names the key (default: the key itself)."""
    if key in first:
        shown = str(key) if shown is None else shown
        raise VerydeepError(f"{source}: line {line}: {shown} is listed twice (first on line {first[key]})")
    first[key] = line


def path_exists(path: Path) -> bool:
    """Whether ``path`` names a file or folder; one the OS refuses to look at (no permission) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def read_path_list(source: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """Paths from a list file (first column of each non-empty line; '-' reads stdin).

    A line that names an existing file as a whole is kept whole (names with spaces). Relative
    paths are relative to ``root`` (default: the list file's folder, or the working folder for
    stdin). A path listed twice is an error: results are keyed by path. An empty list file is
    an error too; empty stdin (a search that found nothing) gives no paths.
    """
    base = Path(root) if root is not None else (Path(source).parent if str(source) != "-" else Path("."))
    name = "stdin" if str(source) == "-" else os.fspath(source)
    first: dict[Path, int] = {}  # path -> its line, in list order
    for n, line in read_lines(source):
        p = Path(check_path_text(line, source, n))
        column = line.split()[0]
        if column != line and not path_exists(p if p.is_absolute() else base / p):
            p = Path(column)  # the whole line names no file: the first column is the path
        p = p if p.is_absolute() else base / p
        listed_once(first, p, n, name)
    paths = list(first)
    if not paths and str(source) != "-":
        raise VerydeepError(f"{name}: no image paths in the list file")
    return paths


def resolve_inputs(data: str | os.PathLike) -> list[Path]:
    """A folder (scanned), a list file, or '-' (paths on stdin) -> image paths."""
    if str(data) == "-":
        return read_path_list("-")
    p = Path(data)
    if p.is_dir():
        return find_images(p)
    if p.is_file():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return [p]
        return read_path_list(p)
    raise VerydeepError(f"{p}: no such file or folder")


@dataclass(frozen=True)
class Failed:
    """An item that could not be read: its index in the input and why."""

    index: int
    path: str
    reason: str


def failed_to_json(failed: Sequence[Failed]) -> str:
    """``failed`` as JSON text, for the partial results of a resumable job."""
    return json.dumps([[f.index, f.path, f.reason] for f in failed])


def failed_from_json(text: str) -> list[Failed]:
    """The records :func:`failed_to_json` wrote."""
    return [Failed(int(i), str(p), str(r)) for i, p, r in json.loads(text)]


def reason_of(error: Exception, path: str | os.PathLike) -> str:
    """Why an image could not be read, on one line, without the path (reports print it beside)."""
    return " ".join(str(error).removeprefix(f"{os.fspath(path)}: ").split()) or type(error).__name__


class ImageDataset(Dataset):
    """Decodes ``paths[i]`` and applies ``transform`` (uint8 3xHxW RGB -> anything).

    Returns ``(i, transformed)`` or ``(i, Failed)``; never raises for a bad image.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable[[torch.Tensor], Any] | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            image = to_uint8_chw(self.paths[i])
            return i, (self.transform(image) if self.transform else image)
        except TRANSFORM_ERRORS as e:
            return i, Failed(i, self.paths[i], reason_of(e, self.paths[i]))


def collate_skipping(batch: list[tuple[int, Any]]) -> tuple[list[int], Any, list[Failed]]:
    """Stack the good items (tensors of one shape, or lists kept as lists), set aside failures."""
    good = [(i, x) for i, x in batch if not isinstance(x, Failed)]
    failed = [x for _, x in batch if isinstance(x, Failed)]
    indices = [i for i, _ in good]
    items = [x for _, x in good]
    if items and all(isinstance(x, torch.Tensor) for x in items) and len({tuple(x.shape) for x in items}) == 1:
        return indices, torch.stack(items), failed
    return indices, items, failed


def loader(
    dataset: Dataset,
    batch_size: int,
    workers: int | None = None,
    indices: Iterable[int] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``indices`` (default all) in order, decoding in worker processes."""
    workers = default_workers(workers)
    subset: Dataset = torch.utils.data.Subset(dataset, list(indices)) if indices is not None else dataset
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
