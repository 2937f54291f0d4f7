"""Caffe's binary weights (``.caffemodel``): read and write without per-float Python objects.

A caffemodel is a serialised NetParameter whose layers carry BlobProto messages; for VGG-16 that
is 138M floats. Protobuf's Python API would turn each into a Python object, so the reader walks
the wire format itself down to each blob's packed ``data`` field and reads those bytes straight
into the final numpy array; everything else (names, types, parameters, shapes) is small and goes
through protobuf's ``FromString``. The writer does the reverse: protobuf serialises each layer and
blob without data, and the data follows as one packed field of raw little-endian float32 (a
message's fields may come in any order, so the result is a valid file for Caffe and OpenCV).
"""

from __future__ import annotations

import io
import math
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError, Message

from verydeep.core.atomic import atomic_file
from verydeep.errors import CaffeFormatError
from verydeep.formats.caffe import caffe_pb2 as pb
from verydeep.formats.caffe.prototxt import MAX_BLOB_AXES, NetParameter, downgrade, upgrade

# Field numbers (Caffe's caffe.proto).
_NET_LAYER = {100: "V2", 2: "V1"}  # NetParameter.layer / .layers
_LAYER_NAME = {"V2": 1, "V1": 4}
_LAYER_BLOBS = {"V2": 7, "V1": 6}
_V0_LAYER = 1  # V1LayerParameter.layer: the pre-2014 format, whose blobs live elsewhere
_BLOB_DATA, _BLOB_DOUBLE_DATA = 5, 8
_LEN, _FIXED32, _FIXED64 = 2, 5, 1  # wire types


@dataclass
class CaffeModel:
    """The contents of a caffemodel.

    ``net`` is the file's net in normalised V2 form (see :func:`verydeep.formats.caffe.prototxt.upgrade`)
    without blob data; ``blobs`` maps each layer that has parameters to its blobs, in file order,
    as float32 arrays shaped as stored (V1: legacy 4-D num x channels x height x width, so fc
    weights are 1x1xOUTxIN; V2: the BlobShape dims).
    """

    path: str
    version: str  # "V1" or "V2": which layer field the file uses
    net: NetParameter
    blobs: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(a.size for arrays in self.blobs.values() for a in arrays)


# ----------------------------------------------------------------------------- reading


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeModel:
    """Read a V1 or V2 caffemodel. Errors name the file and what was expected and found."""
    path = os.fspath(path)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise CaffeFormatError(f"{path}: no such caffemodel file") from None
    except OSError as e:
        raise CaffeFormatError(f"{path}: cannot read caffemodel: {e.strerror}") from None
    with file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise CaffeFormatError(f"{path}: empty file; expected a binary Caffe NetParameter (.caffemodel)")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _Reader(path, file, buf).read()


class _Reader:
    """One pass over the file: the structure through ``buf`` (an mmap, only small parts of which
    are touched), the float data through ``file.readinto`` into the arrays it will live in."""

    def __init__(self, path: str, file: io.BufferedReader, buf: mmap.mmap) -> None:
        self.path, self.file, self.buf, self.size = path, file, buf, len(buf)

    def read(self) -> CaffeModel:
        head = bytearray()
        layers: list[tuple[Any, list[np.ndarray]]] = []
        versions: set[str] = set()
        for number, wire, start, value, end in self._fields(0, self.size, "the net"):
            if number in _NET_LAYER and wire == _LEN:
                versions.add(_NET_LAYER[number])
                layers.append(self._layer(value, end, _NET_LAYER[number], len(layers)))
            else:
                head += self.buf[start:end]
        if not layers:
            self._fail(0, "no layers found")
        if len(versions) > 1:
            raise CaffeFormatError(f"{self.path}: mixes V1 'layers' and V2 'layer' entries")
        version = versions.pop()
        net = self._parse(pb.NetParameter, bytes(head), "the net header")
        blobs: dict[str, list[np.ndarray]] = {}
        for layer, arrays in layers:
            (net.layers if version == "V1" else net.layer).append(layer)
            if arrays:
                if layer.name in blobs:
                    raise CaffeFormatError(f"{self.path}: layer {layer.name!r}: appears twice with weights")
                blobs[layer.name] = arrays
        return CaffeModel(self.path, version, upgrade(net, self.path), blobs)

    def _layer(self, start: int, end: int, version: str, index: int) -> tuple[Any, list[np.ndarray]]:
        rest, name = bytearray(), f"#{index}"
        blobs: list[tuple[int, int]] = []  # read once the name is known, so that errors can give it
        for number, wire, tag, value, stop in self._fields(start, end, f"layer {name}"):
            if number == _LAYER_BLOBS[version] and wire == _LEN:
                blobs.append((value, stop))
                continue
            if number == _LAYER_NAME[version] and wire == _LEN:
                name = repr(bytes(self.buf[value:stop]).decode("utf-8", "replace"))
            elif version == "V1" and number == _V0_LAYER:
                raise CaffeFormatError(
                    f"{self.path}: layer {name}: uses the pre-2014 V0 layer format; upgrade the file with "
                    "Caffe's upgrade_net_proto_binary first"
                )
            rest += self.buf[tag:stop]
        message = pb.V1LayerParameter if version == "V1" else pb.LayerParameter
        arrays = [self._blob(value, stop, name, i) for i, (value, stop) in enumerate(blobs)]
        return self._parse(message, bytes(rest), f"layer {name}"), arrays

    def _blob(self, start: int, end: int, layer: str, index: int) -> np.ndarray:
        where = f"layer {layer}: blob {index}"
        rest, chunks = bytearray(), []
        pos = start
        while pos < end:
            number, wire, value, stop = self._field(pos, end, where)
            if number in (_BLOB_DATA, _BLOB_DOUBLE_DATA) and wire == _LEN:
                chunks.append(self._floats(value, stop, "<f4" if number == _BLOB_DATA else "<f8", where))
            elif (number, wire) in ((_BLOB_DATA, _FIXED32), (_BLOB_DOUBLE_DATA, _FIXED64)):
                array, stop = self._unpacked(pos, end, number, wire)  # old writers: one tag per value
                chunks.append(array)
            else:
                rest += self.buf[pos:stop]
            pos = stop
        meta = self._parse(pb.BlobProto, bytes(rest), where)
        data = chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else np.empty(0, np.float32)
        if data.dtype != np.float32:
            data = self._to_float32(data, where)
        if meta.HasField("shape"):
            shape = tuple(meta.shape.dim)
        elif any(meta.HasField(f) for f in ("num", "channels", "height", "width")):
            shape = (meta.num, meta.channels, meta.height, meta.width)
        else:
            shape = (data.size,)
        if len(shape) > MAX_BLOB_AXES:
            raise CaffeFormatError(
                f"{self.path}: {where}: shape has {len(shape)} dims; a blob has at most {MAX_BLOB_AXES}"
            )
        dims = "x".join(map(str, shape)) or "(no dims)"
        if any(d < 0 for d in shape):
            raise CaffeFormatError(f"{self.path}: {where}: shape {dims} has a negative dim")
        count = math.prod(shape)  # Python ints: a claimed 2^64-element shape cannot wrap around to match
        if count != data.size:
            raise CaffeFormatError(f"{self.path}: {where}: shape {dims} needs {count} values, found {data.size}")
        return data.reshape(shape)

    def _to_float32(self, data: np.ndarray, where: str) -> np.ndarray:
        """``double_data`` as float32, refusing finite values that float32 cannot hold (they would
        become infinities); NaN and infinities carry over, for the model builders to refuse."""
        limit = float(np.finfo(np.float32).max)
        too_large = np.isfinite(data) & (np.abs(data) > limit)
        if too_large.any():
            i = int(np.argmax(too_large))
            raise CaffeFormatError(
                f"{self.path}: {where}: value {i} of {data.size} is {data[i]:g}, beyond float32's range "
                f"(+-{limit:.3g}); verydeep holds weights as float32"
            )
        return data.astype(np.float32)

    def _floats(self, start: int, end: int, dtype: str, where: str) -> np.ndarray:
        """A packed float/double field, read from the file into a fresh array (no mmap pages)."""
        itemsize = np.dtype(dtype).itemsize
        if (end - start) % itemsize:
            self._fail(start, f"{where}: packed data of {end - start} bytes is not a whole number of values")
        array = np.empty((end - start) // itemsize, dtype)
        self.file.seek(start)
        if self.file.readinto(array.view(np.uint8).data) != end - start:
            self._fail(start, f"{where}: data ends early")
        return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))

    def _unpacked(self, pos: int, end: int, number: int, wire: int) -> tuple[np.ndarray, int]:
        """A run of non-packed float (or double) fields: tag byte + value, as a strided view."""
        width = 5 if wire == _FIXED32 else 9
        rows = np.frombuffer(self.buf, np.uint8, (end - pos) // width * width, pos).reshape(-1, width)
        tag = number << 3 | wire
        run = int(np.argmin(rows[:, 0] == tag)) if not (rows[:, 0] == tag).all() else len(rows)
        values = rows[:run, 1:].copy().view("<f4" if wire == _FIXED32 else "<f8").ravel()
        return values.astype(values.dtype.newbyteorder("=")), pos + run * width

    def _fields(self, start: int, end: int, where: str) -> Iterator[tuple[int, int, int, int, int]]:
        """(number, wire type, tag offset, value offset, end offset) of each field in [start, end)."""
        pos = start
        while pos < end:
            number, wire, value, stop = self._field(pos, end, where)
            yield number, wire, pos, value, stop
            pos = stop

    def _field(self, pos: int, end: int, where: str) -> tuple[int, int, int, int]:
        key, value = self._varint(pos, end, where)
        number, wire = key >> 3, key & 7
        if number == 0 or wire in (3, 4, 6, 7):
            self._fail(pos, f"{where}: invalid field (number {number}, wire type {wire})")
        if wire == 0:
            _, stop = self._varint(value, end, where)
        elif wire == _LEN:
            length, value = self._varint(value, end, where)
            stop = value + length
        else:
            stop = value + (8 if wire == _FIXED64 else 4)
        if stop > end:
            self._truncated(pos, stop, end, where)
        return number, wire, value, stop

    def _varint(self, pos: int, end: int, where: str) -> tuple[int, int]:
        result = shift = 0
        while True:
            if pos >= end:
                self._truncated(pos, pos + 1, end, where)
            if shift > 63:
                self._fail(pos, f"{where}: a varint longer than 10 bytes")
            byte = self.buf[pos]
            result |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if byte < 0x80:
                return result, pos

    def _parse(self, message: Any, data: bytes, where: str) -> Any:  # a protobuf message
        try:
            parsed = message.FromString(data)
        except DecodeError as e:
            raise CaffeFormatError(f"{self.path}: {where}: not a valid Caffe message ({e})") from None
        field = _non_utf8_field(parsed)
        if field is not None:
            raise CaffeFormatError(f"{self.path}: {where}: field {field} is not UTF-8 text")
        return parsed

    def _truncated(self, pos: int, needed: int, end: int, where: str) -> None:
        if end < self.size:  # the length of an enclosing message was already checked against the file
            self._fail(pos, f"{where}: field runs past the end of its message")
        if where == "the net":
            where = self._peek_layer(pos) or where
        raise CaffeFormatError(
            f"{self.path}: truncated: {where} at byte {pos} needs {needed - pos} bytes but the file ends at "
            f"byte {self.size} (incomplete download?)" + self._looks_like()
        )

    def _peek_layer(self, pos: int) -> str | None:
        """Best effort: 'layer <name>' if the field at ``pos`` is a layer (for error messages)."""
        try:
            key, value = self._varint(pos, self.size, "")
            if key >> 3 not in _NET_LAYER:
                return None
            _, value = self._varint(value, self.size, "")
            name_field = _LAYER_NAME[_NET_LAYER[key >> 3]]
            for number, wire, _, start, stop in self._fields(value, self.size, ""):
                if number == name_field and wire == _LEN:
                    return f"layer {bytes(self.buf[start:stop]).decode('utf-8', 'replace')!r}"
        except CaffeFormatError:
            pass
        return "a layer"

    def _fail(self, pos: int, what: str) -> None:
        raise CaffeFormatError(
            f"{self.path}: expected a binary Caffe NetParameter (.caffemodel), found {what} at byte {pos}"
            + self._looks_like()
        )

    def _looks_like(self) -> str:
        head = bytes(self.buf[:16])
        for magic, kind in _MAGIC:
            if head.startswith(magic):
                return f"; the file looks like {kind}"
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            return "; the file looks like text (a .prototxt? pass it as the prototxt)"
        return ""


def _non_utf8_field(message: Any) -> str | None:
    """The first string field holding bytes that are not UTF-8, or None. Protobuf's parser keeps
    such a proto2 string as ``bytes``, which fails later wherever a ``str`` is needed."""
    for descriptor, value in message.ListFields():
        items = (value,) if isinstance(value, (str, bytes, Message)) else value  # else repeated
        if descriptor.message_type is not None:
            for item in items:
                inner = _non_utf8_field(item)
                if inner is not None:
                    return f"{descriptor.name}.{inner}"
        elif descriptor.type == descriptor.TYPE_STRING and any(isinstance(item, bytes) for item in items):
            return descriptor.name
    return None


_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .pth or .npz?)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<", "an HTML or XML page (a failed download?)"),
)


# ----------------------------------------------------------------------------- writing


def write_caffemodel(
    path: str | os.PathLike[str],
    blobs: Mapping[str, Sequence[np.ndarray]],
    net: NetParameter | None = None,
    *,
    version: str = "V2",
) -> None:
    """Write ``blobs`` (layer name -> arrays) as a V2 or V1 caffemodel, atomically.

    With ``net`` every layer of it is written (blobs attached by name, any blobs inside ``net``
    ignored); without, one layer per entry, typed by its first blob (4-D: Convolution, else
    InnerProduct). V2 blobs carry their shape as BlobShape; V1 blobs the legacy 4-D
    num/channels/height/width, leading 1s added (fc weights 1x1xOUTxIN, biases 1x1x1xOUT).
    """
    if version not in ("V1", "V2"):
        raise ValueError(f"version must be 'V1' or 'V2', not {version!r}")
    path = os.fspath(path)
    net = upgrade(net, path) if net is not None else _net_for(blobs)
    unknown = set(blobs) - {layer.name for layer in net.layer}
    if unknown:
        raise CaffeFormatError(f"{path}: layer {sorted(unknown)[0]!r}: has weights but no such layer in the net")
    if version == "V1":
        net = downgrade(net, path)
    layers = net.layers if version == "V1" else net.layer
    head = pb.NetParameter()
    head.CopyFrom(net)
    head.ClearField("layers" if version == "V1" else "layer")
    layer_field, blob_field = (2, 6) if version == "V1" else (100, 7)
    with atomic_file(path, durable=True) as out:
        out.write(head.SerializeToString())
        for layer in layers:
            meta = type(layer)()
            meta.CopyFrom(layer)
            meta.ClearField("blobs")
            parts = [_blob_parts(np.asarray(a), version, path, layer.name) for a in blobs.get(layer.name, ())]
            body = meta.SerializeToString()
            blob_sizes = [len(h) + len(d) + a.nbytes for h, d, a in parts]
            size = len(body) + sum(len(_key(blob_field)) + len(_varint(n)) + n for n in blob_sizes)
            out.write(_key(layer_field) + _varint(size) + body)
            for (header, data_key, array), n in zip(parts, blob_sizes):
                out.write(_key(blob_field) + _varint(n) + header + data_key)
                out.write(array.view(np.uint8).data)


def _net_for(blobs: Mapping[str, Sequence[np.ndarray]]) -> NetParameter:
    net = pb.NetParameter()
    for name, arrays in blobs.items():
        kind = "Convolution" if arrays and np.ndim(arrays[0]) == 4 else "InnerProduct"
        net.layer.add(name=name, type=kind)
    return net


def _blob_parts(array: np.ndarray, version: str, path: str, layer: str) -> tuple[bytes, bytes, np.ndarray]:
    """(BlobProto without data, the data field's key and length, the little-endian float32 data)."""
    data = np.ascontiguousarray(array, dtype="<f4")
    meta = pb.BlobProto()
    if version == "V2":
        meta.shape.dim.extend(data.shape)
    elif data.ndim > 4:
        raise CaffeFormatError(f"{path}: layer {layer!r}: V1 blobs have at most 4 dims, found {data.shape}")
    else:
        meta.num, meta.channels, meta.height, meta.width = (1,) * (4 - data.ndim) + data.shape
    data_key = _key(_BLOB_DATA) + _varint(data.nbytes) if data.size else b""
    return meta.SerializeToString(), data_key, data.reshape(-1)


def _key(number: int, wire: int = _LEN) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
