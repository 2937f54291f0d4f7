"""Keras' VGG16/VGG19 weight files (``.h5``, every HDF5 layout Keras has written) onto verydeep.

Keras stores conv kernels HWIO and dense kernels (in, out), and its ``Flatten`` after pool5 runs
in H, W, C order (channels_last) where Caffe's InnerProduct reads C, H, W: fc6's rows are
permuted accordingly. Keras' files were converted from the Caffe models and expect Caffe
preprocessing, so conv1_1 needs no unfolding.

A damaged or hostile file must cost a bounded amount of work. Only the groups of VGG layers are
looked up, through hard links only (no soft or external link, external storage or virtual
dataset sends HDF5 elsewhere); every dataset's type, shape, bytes against the file's size and
chunk count are checked before it is read (:class:`_Budget`); and HDF5 runs in a child process
with a time limit (:func:`_isolated`), since the library itself can loop forever or crash on a
damaged heap, which no check made through it can rule out.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from verydeep import configs
from verydeep.errors import WeightsError
from verydeep.formats.torchvision import build_from_meta
from verydeep.models.build import (
    MAX_EXPANSION,
    candidate_widths,
    check_claimed,
    error_reason,
    format_shape,
    to_float32,
)
from verydeep.models.vgg import VGG

if TYPE_CHECKING:
    import h5py

#: Every Keras layer name a Table 1 VGG can have (block5_conv4 in VGG19 at most) -> Caffe's
#: (``block3_conv2`` -> ``conv3_2``, ``fc1`` -> ``fc6``).
KERAS_LAYERS = {
    **{f"block{s}_conv{i}": f"conv{s}_{i}" for s in range(1, 6) for i in range(1, 5)},
    "fc1": "fc6",
    "fc2": "fc7",
    "predictions": "fc8",
}

#: Entries of a ``layer_names`` or ``weight_names`` attribute read at most: Keras' largest
#: applications model (NASNetLarge) has about 1,040 layers, a layer a handful of weights.
MAX_NAMES = 4096
#: Groups from a layer's group down to a weight (``fc1/kernel:0`` under ``fc1`` is one, Keras 3's
#: ``vars/0`` one): a bound on the links followed for one weight name.
MAX_DEPTH = 4
#: Chunks read in all: HDF5 looks each chunk up in its index, so a dataset cut into tiny chunks
#: costs time per chunk whatever its size (about 4 us each). Keras writes contiguous datasets;
#: h5py's automatic chunking of a whole VGG-16 gives about 9,000; 65,536 is well under a second.
MAX_CHUNKS = 1 << 16


@contextmanager
def _reading(path: Path, where: str) -> Iterator[None]:
    """Whatever h5py raises while ``where`` is read becomes one WeightsError naming it."""
    try:
        yield
    except WeightsError:
        raise
    except (KeyError, OSError, ValueError, TypeError, RuntimeError, UnicodeError) as e:
        raise WeightsError(f"{path}: {where}: cannot read it ({error_reason(e)})") from None


def _member(path: Path, group: h5py.Group, name: str, where: str) -> Any:
    """``group[name]`` through hard links only, one path component at a time; None if absent.

    A soft or external link (to another file, to a FIFO, to a cycle) is refused: a weights
    file's weights are in the file.
    """
    import h5py

    parts = [p for p in name.split("/") if p]
    if not parts or len(parts) > MAX_DEPTH:
        raise WeightsError(f"{path}: {where}: weight name {name[:60]!r}: expected 1 to {MAX_DEPTH} path parts")
    obj: Any = group
    for part in parts:
        if not isinstance(obj, h5py.Group):
            raise WeightsError(f"{path}: {where}/{name}: {part!r} is inside a dataset, not a group")
        link = obj.get(part, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise WeightsError(
                f"{path}: {where}/{name}: a {type(link).__name__}; verydeep reads only data stored in the file"
            )
        obj = obj[part]
    return obj


def _names(path: Path, obj: h5py.Group | h5py.File, attr: str, where: str) -> list[str] | None:
    """A string-list attribute (``layer_names``, ``weight_names``), its size checked before it is read."""
    if attr not in obj.attrs:
        return None
    info = obj.attrs.get_id(attr)
    count = math.prod(info.shape or ())
    if len(info.shape or ()) > 1 or count > MAX_NAMES or info.dtype.kind not in "SUO":
        raise WeightsError(
            f"{path}: {where}: attribute {attr}: expected a list of at most {MAX_NAMES} names, found "
            f"{format_shape(info.shape or ())} of {info.dtype}"
        )
    values = np.atleast_1d(obj.attrs[attr])
    names = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values.tolist()]
    if not all(isinstance(n, str) for n in names):
        raise WeightsError(f"{path}: {where}: attribute {attr}: expected names (strings)")
    return names


class _Budget:
    """What the datasets read so far may cost: bytes against the file's size, chunks in all."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.claimed = 0
        self.chunks = 0

    def check(self, dset: h5py.Dataset, where: str) -> None:
        """Refuse a dataset that is not plain floating-point data in this file, or that would
        cost more than what is left of the budget, before HDF5 is asked to read it."""
        import h5py

        if not isinstance(dset, h5py.Dataset):
            raise WeightsError(f"{self.path}: {where}: expected a dataset, found a {type(dset).__name__}")
        if dset.shape is None or dset.dtype.kind != "f":
            found = "an empty dataspace" if dset.shape is None else f"dtype {dset.dtype}"
            raise WeightsError(f"{self.path}: {where}: expected floating-point weights, found {found}")
        plist = dset.id.get_create_plist()
        if dset.is_virtual or plist.get_external_count():
            raise WeightsError(
                f"{self.path}: {where}: its data lives in other files (a virtual dataset or external storage); "
                "verydeep reads only data stored in the file"
            )
        nbytes = math.prod(dset.shape) * dset.dtype.itemsize
        self.claimed += nbytes
        check_claimed(f"{self.path}: {where}", "the weights read so far", self.claimed, self.size)
        chunks = dset.chunks
        self.chunks += math.prod(-(-n // max(c, 1)) for n, c in zip(dset.shape, chunks)) if chunks else 1
        if self.chunks > MAX_CHUNKS:
            raise WeightsError(
                f"{self.path}: {where}: stored in chunks of {format_shape(chunks or ())}: more than {MAX_CHUNKS:,} "
                "chunks in all to read"
            )
        stored = dset.id.get_storage_size()
        if nbytes > MAX_EXPANSION * stored:
            raise WeightsError(
                f"{self.path}: {where}: {format_shape(dset.shape)} {dset.dtype} ({nbytes:,} bytes) from {stored:,} "
                f"stored bytes: unwritten, or compressed more than {MAX_EXPANSION}x"
            )


def _keras_datasets(path: Path, f: h5py.File) -> dict[str, tuple[str, list[Any]]]:
    """Keras layer name -> (its group's path, its weight datasets, unread) for the VGG layers of
    any of Keras' HDF5 weight layouts:

    * Keras 1/2 weight files (``save_weights``, the published ``vgg16_weights_tf_*.h5``):
      root attribute ``layer_names``; each layer group lists ``weight_names``, old style
      ``block1_conv1_W_1:0`` or new style ``block1_conv1/kernel:0``;
    * Keras 2 whole-model files: the same under a ``model_weights`` group;
    * Keras 3 ``.weights.h5``: ``layers/<name>/vars/0`` (kernel) and ``/1`` (bias).
    """
    import h5py

    with _reading(path, "/model_weights"):
        whole = _member(path, f, "model_weights", "")  # a whole-model file keeps the weights here
    if whole is not None and not isinstance(whole, h5py.Group):
        raise WeightsError(f"{path}: /model_weights: expected a group, found a {type(whole).__name__}")
    root, prefix = (f, "") if whole is None else (whole, "/model_weights")
    out: dict[str, tuple[str, list[Any]]] = {}
    with _reading(path, f"{prefix or '/'} attributes"):
        listed = _names(path, root, "layer_names", prefix or "/")
    if listed is not None:
        for name in (n for n in listed if n in KERAS_LAYERS):
            where = f"{prefix}/{name}"
            with _reading(path, where):
                group = _member(path, root, name, prefix or "/")
                if group is None:
                    raise WeightsError(f"{path}: {where}: listed in layer_names, but no such group")
                weights = _names(path, group, "weight_names", where) or []
                found = [(w, _member(path, group, w, where)) for w in weights]
            missing = [w for w, d in found if d is None]
            if missing:
                raise WeightsError(f"{path}: {where}: weight {missing[0][:60]!r} listed, but not in the file")
            if found:
                out[name] = (where, [d for _, d in found])
        return out
    with _reading(path, f"{prefix}/layers"):
        layers = _member(path, root, "layers", prefix or "/")
    if layers is None:
        raise WeightsError(f"{path}: no Keras weights found (no 'layer_names' attribute, no 'layers' group)")
    for name in KERAS_LAYERS:
        where = f"{prefix}/layers/{name}/vars"
        with _reading(path, where):
            found = [_member(path, layers, f"{name}/vars/{i}", f"{prefix}/layers") for i in ("0", "1")]
        if any(d is not None for d in found):
            out[name] = (where, [d for d in found if d is not None])
    return out


def _read(path: Path, where: str, dset: h5py.Dataset) -> np.ndarray:
    with _reading(path, where):
        return to_float32(dset[()])


def load_keras_h5(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Keras VGG16/VGG19 ``.h5`` weights file -> (state dict in verydeep names, meta).

    Kernels HWIO -> OIHW; dense kernels (in, out) -> (out, in); fc1's input rows go from Keras'
    channels_last flatten order (H, W, C) to Caffe's (C, H, W). Keras' VGG expects Caffe
    preprocessing (BGR, mean pixel subtracted), so no input unfolding. A file without the top
    (``include_top=False``) has no fc layers: ``meta["top"]`` is False and the state has no fc6-fc8
    (:func:`load_keras` makes them NaN so that no score computed from them can pass for a real one).

    Every dataset's shape is checked against the net the file's layers form, and its cost
    against the file (:class:`_Budget`), before any is read; HDF5 reads the file in a child
    process with a time limit (:func:`_isolated`), since a damaged file can make the library
    itself loop forever or crash, which no check of ours can rule out.
    """
    path = Path(path)
    arrays, meta = _isolated(path) if ISOLATE else read_keras_arrays(path)
    return {k: torch.from_numpy(a) for k, a in arrays.items()}, meta


def read_keras_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`load_keras_h5`'s work in this process: arrays in Caffe's layout (float32), meta."""
    import h5py

    try:
        size = path.stat().st_size
        f = h5py.File(path, "r")
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({error_reason(e)})") from None
    with f:
        datasets: dict[str, tuple[str, h5py.Dataset]] = {}
        for keras_name, (where, values) in _keras_datasets(path, f).items():
            name = KERAS_LAYERS[keras_name]
            if len(values) != 2:
                raise WeightsError(f"{path}: {where}: expected kernel and bias, found {len(values)} arrays")
            for kind, dset in zip(("weight", "bias"), values):
                datasets[f"{name}.{kind}"] = (f"{where} ({'kernel' if kind == 'weight' else 'bias'})", dset)
        budget = _Budget(path, size)
        for where, dset in datasets.values():
            with _reading(path, where):
                budget.check(dset, where)
        config, width, num_classes, top = _net(path, {k: (w, tuple(d.shape)) for k, (w, d) in datasets.items()})
        shapes = configs.param_shapes(config, width, num_classes)
        for key, shape in shapes.items():
            if key not in datasets:
                if top or not key.startswith("fc"):
                    raise WeightsError(f"{path}: layer {key.rsplit('.', 1)[0]}: missing in the Keras file")
                continue
            where, dset = datasets[key]
            expected = _keras_shape(shape)
            if tuple(dset.shape) != expected:
                raise WeightsError(
                    f"{path}: {where}: expected {format_shape(expected)}, found {format_shape(dset.shape)}"
                )
        arrays = {key: _from_keras(key, _read(path, *datasets[key]), shapes[key]) for key in shapes if key in datasets}
    meta = {
        "source": str(path),
        "source_format": "keras",
        "config": config,
        "width": width,
        "num_classes": num_classes,
        "top": top,
        "file_input_space": "caffe",
    }
    return arrays, meta


# -- HDF5 in a child process -------------------------------------------------------------------

#: Read in a forked child on Linux, where fork is cheap (about 10 ms) and the child runs only h5py
#: and numpy, never torch's thread pools or CUDA (unusable after fork). Elsewhere (macOS' system
#: frameworks, Windows without fork) the reading stays in this process, guarded by the checks.
ISOLATE = sys.platform.startswith("linux")
#: The child's time limit: a fixed allowance plus the file at a slow disk's pace. A whole VGG-16
#: file (528 MB) reads in about a second from a page cache, so 10 s + 20 MB/s (36 s for it) only
#: ends what would never end: HDF5 looping on a damaged heap or B-tree.
READ_SECONDS = 10.0
READ_BYTES_PER_SECOND = 20e6


#: Address space the child may add to what it inherits: the arrays it reads (at most
#: MAX_EXPANSION x the file's bytes) four times over (HDF5's buffer, float32, transposed, sent)
#: plus 512 MiB for HDF5 itself. A damaged heap object claiming gigabytes in a small file (a
#: vlen string's length is not visible before HDF5 allocates it) fails there as an allocation.
CHILD_MEMORY_BASE = 512 * 2**20
CHILD_MEMORY_PER_BYTE = 4 * MAX_EXPANSION


class HDF5Failure(WeightsError):
    """HDF5 itself hung or crashed on a file (contained in the child process)."""


def _isolated(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`read_keras_arrays` in a forked child, its results sent back through a pipe: a
    length-prefixed JSON header (meta and shapes, or the error), then the arrays' raw bytes. A
    child that runs past its time limit is killed; one that dies is reported, not followed."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e.strerror or error_reason(e)})") from None
    limit = READ_SECONDS + size / READ_BYTES_PER_SECOND
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns of fork in a threaded process; see ISOLATE
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no process to spare (EAGAIN, ENOMEM): read here, unguarded
        os.close(read_end)
        os.close(write_end)
        return read_keras_arrays(path)
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers
        os.close(read_end)
        # Its own end, even if the parent is killed first: SIGALRM's default action ends a
        # process stuck in C code, where no Python handler would run.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(math.ceil(limit) + 1)
        limit_memory(CHILD_MEMORY_BASE + CHILD_MEMORY_PER_BYTE * size)
        status = 1
        try:
            _send(path, write_end)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + limit
    try:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            return _receive(path, pipe, deadline, limit)
    finally:
        _reap(pid)


def limit_memory(extra: int) -> None:
    """Let this process map at most ``extra`` bytes beyond what it maps now (Linux), so that an
    allocation past it fails as an error instead of taking the machine's memory."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError):  # no /proc, or a limit this process may not set: unbounded
        pass


def _send(path: Path, fd: int) -> None:
    """The child's side: run the reader, write the header and the arrays to ``fd``."""
    try:
        arrays, meta = read_keras_arrays(path)
        header: dict[str, Any] = {"meta": meta, "shapes": {k: list(a.shape) for k, a in arrays.items()}}
    except WeightsError as e:
        arrays, header = {}, {"error": str(e)}
    except Exception:  # a bug, not a bad file: the parent raises it with this traceback
        arrays, header = {}, {"bug": traceback.format_exc()}
    text = json.dumps(header).encode()
    with os.fdopen(fd, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for a in arrays.values():
            out.write(np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint8).data)


def _receive(path: Path, pipe: Any, deadline: float, limit: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The parent's side: read what the child sends, within ``deadline``."""

    def fill(buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                raise HDF5Failure(
                    f"{path}: HDF5 did not finish reading the file within {limit:.0f} s (a damaged file?)"
                )
            n = pipe.readinto(buffer[done:])
            if not n:
                raise HDF5Failure(f"{path}: HDF5 crashed reading the file (a damaged file?)")
            done += n

    head = bytearray(8)
    fill(memoryview(head))
    text = bytearray(int.from_bytes(head, "little"))
    fill(memoryview(text))
    header = json.loads(text)
    if "error" in header:
        raise WeightsError(header["error"])
    if "bug" in header:
        raise RuntimeError(f"reading {path} in a child process failed:\n{header['bug']}")
    arrays = {k: np.empty(tuple(shape), dtype=np.float32) for k, shape in header["shapes"].items()}
    for a in arrays.values():
        fill(a.reshape(-1).view(np.uint8).data)  # a view: the bytes land in ``a``
    return arrays, header["meta"]


def _reap(pid: int) -> None:
    """End the child (if it still runs) and collect it, so that no zombie is left."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):  # already collected (SIGCHLD ignored or handled)
        pass


def _net(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[str, float, int, bool]:
    """(config, width, num_classes, top) from the datasets' shapes (nothing read yet); the width
    is the first candidate (:func:`candidate_widths`) that every dataset fits, if any does."""
    convs = sorted(k[: -len(".weight")] for k in shapes if k.startswith("conv") and k.endswith(".weight"))
    if not convs:
        raise WeightsError(f"{path}: no Keras VGG layers (block1_conv1 ...) found")
    counts = tuple(sum(1 for c in convs if c.startswith(f"conv{s}_")) for s in range(1, 6))
    config = next(
        (
            c
            for c, stages in configs.TABLE_1.items()
            if tuple(len(st) for st in stages) == counts
            and "LRN" not in sum(stages, ())
            and all(k == 3 for st in stages for k in st)
        ),
        None,
    )
    if config is None:
        raise WeightsError(f"{path}: convolutions per block {counts} match no Table 1 configuration")
    k11 = shapes["conv1_1.weight"][1] if "conv1_1.weight" in shapes else None
    if k11 is None or len(k11) != 4 or tuple(k11[:3]) != (3, 3, 3) or k11[3] < 1:
        found = "no kernel" if k11 is None else format_shape(k11)
        raise WeightsError(
            f"{path}: layer block1_conv1: expected an HWIO kernel 3x3x3xOUT (TensorFlow ordering), found "
            f"{found}; use the *_tf_dim_ordering_tf_kernels.h5 file"
        )
    fc = [k for k in ("fc6", "fc7", "fc8") if f"{k}.weight" in shapes]
    top = bool(fc)
    if top and len(fc) < 3:
        missing = next(k for k in ("fc6", "fc7", "fc8") if k not in fc)
        raise WeightsError(f"{path}: layer {missing}: missing in the Keras file (it has {', '.join(fc)})")
    num_classes = 1000
    if top:
        where8, k8 = shapes["fc8.weight"]
        if len(k8) != 2 or k8[1] < 1:
            raise WeightsError(f"{path}: {where8}: expected a Dense kernel INxCLASSES, found {format_shape(k8)}")
        num_classes = int(k8[1])

    def out(key: str) -> int | None:  # output channels of a kernel stored HWIO or (in, out)
        shape = shapes[key][1] if key in shapes else ()
        return int(shape[-1]) if len(shape) in (2, 4) else None

    widths = candidate_widths(
        {configs.FC_WIDTH: out("fc7.weight"), configs.STAGE_CHANNELS[4]: out("conv5_1.weight"), 64: int(k11[3])}
    )

    def fits(width: float) -> bool:
        expected = configs.param_shapes(config, width, num_classes)
        return all(shapes[k][1] == _keras_shape(s) for k, s in expected.items() if k in shapes)

    return config, next((w for w in widths if fits(w)), widths[0]), num_classes, top


def _keras_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape Keras stores a parameter of Caffe's ``shape`` in: kernels HWIO, Dense (in, out)."""
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _from_keras(key: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A Keras array (shape checked) in Caffe's layout."""
    if a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif key == "fc6.weight":
        c, h, w = shape[1] // configs.POOL5_SIZE**2, configs.POOL5_SIZE, configs.POOL5_SIZE
        a = a.reshape(h, w, c, shape[0]).transpose(3, 2, 0, 1).reshape(shape)  # (H,W,C,out) -> (out,C,H,W)
    elif a.ndim == 2:
        a = a.T  # Dense (in, out) -> (out, in)
    return np.ascontiguousarray(a)


def load_keras(path: str | os.PathLike[str]) -> VGG:
    """A Keras VGG16/VGG19 ``.h5`` as a ready verydeep VGG (eval mode, Caffe input space)."""
    state, meta = load_keras_h5(path)
    absent = () if meta["top"] else ("fc6", "fc7", "fc8")
    model = build_from_meta(state, meta, str(path), absent=absent)
    if not meta["top"]:
        model.class_names = None
    return model
