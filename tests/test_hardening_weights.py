"""Bad weight files (safetensors, torchvision .pth, Keras .h5) are refused with one line naming
the file and what was wrong; none raises another exception, runs code, hangs or takes memory
beyond what the file holds. Every file is written here by the project's writers, then damaged.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fuzz.fuzz_keras import write_keras
from helpers import cli_error_line, one_line, random_vgg, run_cli
from safetensors.torch import save_file

import verydeep
from verydeep.errors import WeightsError
from verydeep.formats import keras
from verydeep.formats.keras import HDF5Failure, load_keras, load_keras_h5
from verydeep.formats.safetensors import MAX_HEADER_BYTES, load_safetensors, read_metadata, save_safetensors
from verydeep.formats.torchvision import MAX_WRAPPERS, load_torchvision, to_torchvision_state
from verydeep.models.build import error_reason

#: VGG-A at 1/256 of Table 1's width: channel counts are rounded (1, 1, 1, 2, 2; fc 16), files
#: of 10-40 KB.
WIDTH = 1 / 256


@pytest.fixture
def tiny() -> verydeep.VGG:
    return random_vgg("A", num_classes=3, width=WIDTH)


def refused(call, path: Path, *fragments: str, kind: type[Exception] = WeightsError) -> str:
    """``call(path)`` raises exactly ``kind``, one line that starts with the file and holds ``fragments``."""
    with pytest.raises(kind) as info:
        call(path)
    assert type(info.value) is kind, (type(info.value), str(info.value))
    message = one_line(info, *fragments)
    assert message.startswith(str(path)), message
    return message


# -- error text --------------------------------------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no")


@pytest.mark.parametrize(
    "error,expected",
    [
        (RuntimeError(""), "RuntimeError"),
        (RuntimeError("\x1b[31m\x1b[0m"), "RuntimeError"),  # colour codes only
        (OSError("..."), "OSError"),
        (ValueError("\n\n  \n"), "ValueError"),
        (KeyError(), "KeyError"),
        (Unprintable(), "Unprintable"),
        (RuntimeError("first line. second sentence\nnext line"), "RuntimeError: first line"),
        (RuntimeError("a\x00b\x1fc"), "RuntimeError: a b c"),
    ],
)
def test_error_reason_is_one_nonempty_line_with_the_type(error, expected):
    assert error_reason(error) == expected


def test_error_reason_is_bounded():
    reason = error_reason(RuntimeError("word " * 1000))
    assert len(reason) < 200 and reason.endswith("...")


# -- safetensors -------------------------------------------------------------------------------


def ours(path: Path, model, tensors: dict[str, torch.Tensor] | None = None, **changes: str) -> Path:
    """``tensors`` (by default ``model``'s) under the metadata ``save_safetensors`` writes for
    ``model``, its values (JSON text) replaced by ``changes``. Written by safetensors' own
    ``save_file``: ``save_safetensors`` refuses to write most of what the reader must refuse."""
    meta = {"format": "verydeep-weights-1", **{k: json.dumps(v) for k, v in model.meta().items()}, **changes}
    if tensors is None:
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "key,text,fragment",
    [
        ("width", "abc", "expected a positive finite number in JSON, found 'abc'"),
        ("width", "NaN", "expected a positive finite number, found 'NaN'"),
        ("width", "-1", "expected a positive finite number"),
        ("width", "1e400", "expected a positive finite number"),  # inf
        ("width", "true", "expected a positive finite number"),
        ("width", "9" * 500, "expected a positive finite number"),  # an integer no float holds
        ("width", "5000", "ValueError: NetSpec"),
        ("num_classes", "-4", "expected a positive integer"),
        ("num_classes", "2.5", "expected a positive integer"),
        ("num_classes", '"3"', "expected a positive integer"),
        ("num_classes", "true", "expected a positive integer"),
        ("config", '"Z"', "expected a Table 1 configuration"),
        ("config", "5", "expected a Table 1 configuration"),
        ("config", "A", "in JSON, found 'A'"),
        ("lrn_k", "0", "expected a positive finite number"),
        ("lrn_k", "Infinity", "expected a positive finite number"),
        ("input_space", '"rgb01"', "expected 'caffe-bgr-0-255-mean-subtracted'"),
        ("class_names", "[1, 2, 3]", "expected a list of strings, or null"),
        ("class_names", '"imagenet"', "expected a list of strings, or null"),
        ("class_names", '["a"]', "expected 3 names (num_classes), found 1"),
        ("epochs", "-1", "expected a non-negative integer"),
        ("steps", "[" * 100_000, "in JSON"),  # nested past Python's recursion limit
        ("kind", '"graph"', "expected 'caffe-graph'"),
        ("source", "{}", "expected a string"),
    ],
)
def test_safetensors_metadata_is_checked_against_its_schema(tmp_path, tiny, key, text, fragment):
    path = ours(tmp_path / "bad.safetensors", tiny, **{key: text})
    if "NetSpec" in fragment:  # a valid number, but no net: refused when the net is built
        refused(load_safetensors, path, "metadata:", fragment)
        return
    refused(load_safetensors, path, f"metadata '{key}'", fragment)
    refused(read_metadata, path, f"metadata '{key}'", fragment)  # info reads the metadata alone


def test_safetensors_net_larger_than_the_file_is_refused_before_it_is_built(tmp_path, tiny):
    for changes in ({"width": "3.0"}, {"num_classes": str(10**15), "class_names": "null"}):
        path = ours(tmp_path / "big.safetensors", tiny, **changes)
        refused(load_safetensors, path, "metadata describes VGG-A", "parameters; the file has")


def test_safetensors_graph_metadata(tmp_path, tiny):
    path = ours(tmp_path / "g.safetensors", tiny, kind='"caffe-graph"')
    refused(load_safetensors, path, "a Caffe graph's file without its 'prototxt'")
    # read_prototxt takes a string without '{' for a file name: a file must not point at one
    path = ours(tmp_path / "g.safetensors", tiny, kind='"caffe-graph"', prototxt='"/etc/passwd"')
    refused(load_safetensors, path, "metadata 'prototxt': expected the net's prototxt text")
    path = ours(tmp_path / "g.safetensors", tiny, input_shapes='{"data": [1, 3, 0, 224]}')
    refused(load_safetensors, path, "metadata 'input_shapes'")


def test_safetensors_other_metadata_is_kept_and_newer_formats_refused(tmp_path, tiny):
    path = ours(tmp_path / "note.safetensors", tiny, note="not JSON, someone's note")
    assert read_metadata(path)["note"] == "not JSON, someone's note"
    assert isinstance(load_safetensors(path), verydeep.VGG)
    path = ours(tmp_path / "new.safetensors", tiny, format="verydeep-weights-2")
    refused(load_safetensors, path, "format 'verydeep-weights-2': this verydeep reads 'verydeep-weights-1'")


def test_safetensors_header_length_is_checked_before_the_library_parses_it(tmp_path, tiny):
    good = save_safetensors(tiny, tmp_path / "good.safetensors").read_bytes()
    cases = {
        "short": (b"\x01\x02\x03", "shorter than the 8-byte header length"),
        "huge": ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + good[8:], f"more than the {MAX_HEADER_BYTES:,}"),
        "truncated": (good[:40], "truncated: the header claims"),
        "json": (good[:8] + b"!" + good[9:], "not a readable safetensors file (SafetensorError"),
    }
    for name, (data, fragment) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        refused(load_safetensors, path, "not a readable safetensors file", fragment)


def test_safetensors_tensors_must_fit_in_dtype_shape_and_value(tmp_path, tiny):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    cases = {
        "int": ({"conv1_1.weight": state["conv1_1.weight"].to(torch.int32)}, "conv1_1.weight: expected floating-point"),
        "nan": ({"fc7.weight": state["fc7.weight"].clone().fill_(float("nan"))}, "fc7.weight: 256 of 256 values"),
        "inf": ({"fc8.bias": torch.tensor([1.0, float("inf"), 0.0])}, "fc8.bias: 1 of 3 values are NaN or infinite"),
        "shape": (
            {"conv2_1.weight": torch.zeros(1, 1, 5, 5)},
            "layer conv2_1: weight expected shape 1x1x3x3, found 1x1x5x5",
        ),
    }
    for name, (change, fragment) in cases.items():
        path = ours(tmp_path / f"{name}.safetensors", tiny, {**state, **change})
        refused(load_safetensors, path, fragment)
    path = tmp_path / "plain.safetensors"  # no metadata: recognised from the shapes, or refused naming them
    save_file({**state, "conv1_1.weight": torch.zeros(())}, str(path))
    refused(load_safetensors, path, "do not form a Table 1 VGG", "found conv1_1.bias 1")


def test_rounded_narrow_nets_are_recognised_from_their_shapes(tmp_path, tiny):
    """At 1/256, conv1 and conv2 both have 1 channel: the width is read off the widest layer."""
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    assert load_safetensors(path).width == WIDTH
    torch.save(to_torchvision_state(tiny), tmp_path / "tv.pth")
    assert load_torchvision(tmp_path / "tv.pth").width == WIDTH
    assert load_keras(write_keras(tmp_path / "k.h5", tiny)).width == WIDTH


# -- torchvision .pth ------------------------------------------------------------------------------


def pth(path: Path, obj, zipped: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return path


def test_pth_values_and_keys_are_checked(tmp_path, tiny):
    tv = to_torchvision_state(tiny)
    named = dict(tiny.state_dict())
    cases = {
        "scalar_kernel": (
            {**tv, "features.0.weight": torch.tensor(1.0)},
            "features.0.weight: expected a convolution kernel OUTxINxKxK, found scalar",
        ),
        "scalar_fc8": (
            {**tv, "classifier.6.weight": torch.tensor(1.0)},
            "classifier.6.weight: expected CLASSESxIN, found scalar",
        ),
        "scalar_named": (
            {**named, "conv1_1.weight": torch.tensor(1.0)},
            "parameters in Caffe names do not form a Table 1 VGG",
        ),
        "sparse": (
            {**tv, "features.3.weight": tv["features.3.weight"].to_sparse()},
            "'features.3.weight': expected a dense tensor, found a torch.sparse_coo tensor",
        ),
        "meta": (
            {**tv, "features.3.bias": torch.zeros(1, device="meta")},
            "'features.3.bias': expected a dense tensor, found a meta tensor",
        ),
        "not_tensor": ({**tv, "features.3.bias": 3}, "'features.3.bias': expected a tensor, found int"),
        "int_key": ({**tv, 0: torch.zeros(1)}, "key 0: expected a parameter name, found int"),
        "int_dtype": (
            {**tv, "features.3.bias": torch.zeros(1, dtype=torch.int64)},
            "expected floating-point values, found dtype torch.int64",
        ),
        "empty": ({}, "an empty state dict"),
        "list": ([torch.zeros(1)], "expected a state dict (name -> tensor), found list"),
        "leading_zero": (
            {
                **{k: v for k, v in tv.items() if k != "features.6.weight"},
                "features.06.weight": tv["features.6.weight"],
            },
            "no Table 1 configuration matches",
        ),
        "shape": (
            {**tv, "features.3.weight": torch.zeros(2, 1, 3, 3)},
            "features.3.weight: layer conv2_1: weight expected shape 1x1x3x3, found 2x1x3x3",
        ),
        "nan": (
            {**tv, "classifier.3.weight": torch.full_like(tv["classifier.3.weight"], float("nan"))},
            "fc7.weight: 256 of 256 values are NaN",
        ),
    }
    for name, (obj, fragment) in cases.items():
        refused(load_torchvision, pth(tmp_path / f"{name}.pth", obj), fragment)


def test_pth_checkpoint_wrappers_nest_and_stay_bounded(tmp_path, tiny):
    inner = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    path = pth(tmp_path / "ckpt.pth", {"model": {"state_dict": inner, "epoch": 2}, "optimizer": {}})
    assert load_torchvision(path).num_classes == 3
    deep: object = inner
    for _ in range(MAX_WRAPPERS + 1):
        deep = {"state_dict": deep}
    refused(load_torchvision, pth(tmp_path / "deep.pth", deep), "'state_dict': expected a tensor, found dict")


def test_pth_claims_beyond_the_file_are_refused_before_they_are_expanded(tmp_path, tiny):
    tv = to_torchvision_state(tiny)
    # A stride-0 view: 10^12 elements in a 1.5 KB file.
    path = pth(tmp_path / "expanded.pth", {**tv, "features.0.weight": torch.zeros(1).expand(10**6, 10**6)})
    refused(load_torchvision, path, "'features.0.weight': a 1000000x1000000 view of 4 stored bytes")
    # A zip bomb: torch.load inflates deflated members; 4 MB of zeros deflate to 4 KB.
    plain = pth(tmp_path / "plain.pth", {**tv, "features.3.bias": torch.zeros(1_000_000)})
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    refused(load_torchvision, bomb, "its zip archive claims", f"more than 16x the file's {bomb.stat().st_size:,} bytes")


def test_pth_damaged_zip_is_one_line(tmp_path, tiny):
    """Fuzz finding: a central directory needing zip version 16.1 made zipfile raise NotImplementedError."""
    data = bytearray(pth(tmp_path / "ok.pth", to_torchvision_state(tiny)).read_bytes())
    at = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, at + 6, 161)  # version needed to extract
    path = tmp_path / "version.pth"
    path.write_bytes(bytes(data))
    refused(load_torchvision, path, "not a readable torch file: a damaged zip archive (NotImplementedError")


class Payload:
    """Unpickling this would run a shell command; weights_only=True must refuse it first."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_pth_pickle_with_code_never_runs(tmp_path, tiny, zipped):
    marker = tmp_path / "ran"
    path = pth(tmp_path / "evil.pth", {**to_torchvision_state(tiny), "features.0.bias": Payload(marker)}, zipped)
    refused(load_torchvision, path, "a pickled object (a whole model?)", "weights_only=True")
    assert not marker.exists()


@pytest.mark.parametrize("message", ["", "\x1b[0m", "...", "\n"])
def test_pth_library_errors_without_a_message_still_give_one(tmp_path, tiny, monkeypatch, message):
    path = pth(tmp_path / "ok.pth", to_torchvision_state(tiny))

    def broken(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "load", broken)
    refused(load_torchvision, path, "not a readable torch file", "(RuntimeError)")


# -- Keras .h5 ---------------------------------------------------------------------------------


def h5(tmp_path: Path, model, name: str = "k.h5", **kw) -> Path:
    return write_keras(tmp_path / name, model, **kw)


def edit(path: Path, change) -> Path:
    with h5py.File(path, "r+") as f:
        change(f)
    return path


def replace(group: h5py.Group, name: str, **dataset) -> None:
    del group[name]
    group.create_dataset(name, **dataset)


def test_keras_structure_errors_name_the_file_and_the_group(tmp_path, tiny):
    kernel = "block2_conv1_W_1:0"

    def unlisted_group(f):
        del f["block2_conv1"]

    def missing_dataset(f):
        del f["block2_conv1"][kernel]

    def group_not_dataset(f):
        del f["block2_conv1"][kernel]
        f["block2_conv1"].create_group(kernel)

    def numbers(f):
        f.attrs["layer_names"] = np.arange(3)

    def not_utf8(f):
        f["block2_conv1"].attrs["weight_names"] = [b"\xff\xfe", b"block2_conv1_b_1:0"]

    def missing_layer(f):
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != "block3_conv2"]

    def partial_top(f):
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != "fc2"]

    def integers(f):
        replace(f["block2_conv1"], kernel, data=np.zeros((3, 3, 1, 1), np.int32))

    def shape(f):
        replace(f["block2_conv1"], kernel, data=np.zeros((3, 3, 1, 2), np.float32))

    def nan(f):
        replace(f["block2_conv1"], kernel, data=np.full((3, 3, 1, 1), np.nan, np.float32))

    cases = {
        unlisted_group: "/block2_conv1: listed in layer_names, but no such group",
        missing_dataset: f"/block2_conv1: weight '{kernel}' listed, but not in the file",
        group_not_dataset: "/block2_conv1 (kernel): expected a dataset, found a Group",
        numbers: "attribute layer_names: expected a list of at most 4096 names, found 3 of int64",
        not_utf8: "/block2_conv1: cannot read it (Unicode",
        missing_layer: "convolutions per block (1, 1, 1, 2, 2) match no Table 1 configuration",
        partial_top: "layer fc7: missing in the Keras file (it has fc6, fc8)",
        integers: "/block2_conv1 (kernel): expected floating-point weights, found dtype int32",
        shape: "/block2_conv1 (kernel): expected 3x3x1x1, found 3x3x1x2",
        nan: "conv2_1.weight: 9 of 9 values are NaN or infinite",
    }
    for change, fragment in cases.items():
        path = edit(h5(tmp_path, tiny, f"{change.__name__}.h5"), change)
        refused(load_keras, path, fragment)


def test_keras_claims_are_checked_against_the_file_before_reading(tmp_path, tiny, monkeypatch):
    kernel = "block1_conv1_W_1:0"
    # 27 GiB declared, never written: a 40 KB file
    path = edit(
        h5(tmp_path, tiny, "huge.h5"),
        lambda f: replace(f["block1_conv1"], kernel, shape=(3, 3, 3, 2**28), chunks=(3, 3, 3, 2**14), dtype="f4"),
    )
    refused(
        load_keras,
        path,
        "/block1_conv1 (kernel): the weights read so far claims 28,991,029,",
        "more than 16x the file's",
    )
    # the right shape, never written: fill values, not weights
    path = edit(
        h5(tmp_path, tiny, "unwritten.h5"),
        lambda f: replace(f["block1_conv1"], kernel, shape=(3, 3, 3, 1), chunks=(1, 1, 1, 1), dtype="f4"),
    )
    refused(load_keras, path, "/block1_conv1 (kernel): 3x3x3x1 float32 (108 bytes) from 0 stored bytes")
    # tiny chunks cost HDF5 time per chunk, whatever their bytes
    monkeypatch.setattr(keras, "MAX_CHUNKS", 20)
    weights = tiny.state_dict()["conv1_1.weight"].numpy().transpose(2, 3, 1, 0)
    path = edit(
        h5(tmp_path, tiny, "chunks.h5"), lambda f: replace(f["block1_conv1"], kernel, data=weights, chunks=(1, 1, 1, 1))
    )
    refused(load_keras, path, "/block1_conv1 (kernel): stored in chunks of 1x1x1x1: more than 20 chunks")


def test_keras_reads_only_data_stored_in_the_file(tmp_path, tiny):
    kernel = "block1_conv1_W_1:0"
    weights = tiny.state_dict()["conv1_1.weight"].numpy().transpose(2, 3, 1, 0)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("w", data=weights)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # external storage on a FIFO would block HDF5's read forever

    def soft(f):
        f["block1_conv1"].move(kernel, "moved")
        f["block1_conv1"][kernel] = h5py.SoftLink("/block1_conv1/moved")

    def external_link(f):
        del f["block1_conv1"][kernel]
        f["block1_conv1"][kernel] = h5py.ExternalLink(str(other), "/w")

    def external_storage(f):
        replace(f["block1_conv1"], kernel, shape=weights.shape, dtype="f4", external=[(str(fifo), 0, weights.nbytes)])

    def virtual(f):
        layout = h5py.VirtualLayout(shape=weights.shape, dtype="f4")
        layout[...] = h5py.VirtualSource(str(other), "w", shape=weights.shape)
        del f["block1_conv1"][kernel]
        f["block1_conv1"].create_virtual_dataset(kernel, layout)

    cases = {
        soft: f"/block1_conv1/{kernel}: a SoftLink; verydeep reads only data stored in the file",
        external_link: f"/block1_conv1/{kernel}: a ExternalLink; verydeep reads only data stored in the file",
        external_storage: "its data lives in other files (a virtual dataset or external storage)",
        virtual: "its data lives in other files (a virtual dataset or external storage)",
    }
    for change, fragment in cases.items():
        path = edit(h5(tmp_path, tiny, f"{change.__name__}.h5"), change)
        refused(load_keras, path, fragment)


def poison_global_heap(path: Path) -> Path:
    """Give the file's global heap a free-space object of size 0 (where vlen strings such as
    ``layer_names`` live): HDF5 2.0's heap decoder never moves past it. Found by fuzzing."""
    data = bytearray(path.read_bytes())
    at = data.index(b"GCOL")
    end = at + struct.unpack_from("<Q", data, at + 8)[0]
    p = at + 16
    while p + 16 <= end:
        index, _, _, size = struct.unpack_from("<HHIQ", data, p)
        if index == 0:
            struct.pack_into("<Q", data, p + 8, 0)
            path.write_bytes(bytes(data))
            return path
        p += 16 + (size + 7) // 8 * 8
    raise AssertionError("no free space in the global heap")


def test_keras_hdf5_that_never_returns_is_contained(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(keras, "READ_SECONDS", 2.0)
    path = poison_global_heap(h5(tmp_path, tiny))
    refused(load_keras, path, "HDF5 did not finish reading the file within 2 s", kind=HDF5Failure)


def inflate_a_name(path: Path) -> Path:
    """Make one vlen string of ``layer_names`` claim 4 GiB (its 16-byte reference holds the
    length): HDF5 allocates and fills that much before it finds the heap object shorter. Found by
    fuzzing (4.6 GB from a 36 KB file)."""
    data = bytearray(path.read_bytes())
    heap = struct.pack("<Q", data.index(b"GCOL"))
    at = data.index(heap)
    while not 0 < struct.unpack_from("<I", data, at - 4)[0] < 64:  # a name's length precedes its heap address
        at = data.index(heap, at + 1)
    struct.pack_into("<I", data, at - 4, 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    return path


def test_keras_hdf5_memory_is_bounded_in_the_child(tmp_path, tiny):
    path = inflate_a_name(h5(tmp_path, tiny))
    refused(load_keras, path, "cannot read it (OSError", "memory allocation failed")
    # The reading child's peak, measured from a fresh process: this one's RUSAGE_CHILDREN holds
    # every earlier child of the test session (and a forked child starts at its parent's peak).
    probe = (
        "import resource, sys\n"
        "from verydeep.errors import WeightsError\n"
        "from verydeep.formats.keras import load_keras\n"
        "try:\n    load_keras(sys.argv[1])\nexcept WeightsError:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) < 3 * 2**20  # KiB: the child never took the 4 GiB it was asked for


def test_keras_hdf5_crash_is_contained_and_a_bug_is_not_hidden(tmp_path, tiny, monkeypatch):
    path = h5(tmp_path, tiny)
    monkeypatch.setattr(
        keras, "read_keras_arrays", lambda p: os.kill(os.getpid(), signal.SIGKILL)
    )  # dies like a crash, quietly
    refused(load_keras, path, "HDF5 crashed reading the file", kind=HDF5Failure)

    def bug(p):
        raise ZeroDivisionError("a bug in verydeep")

    monkeypatch.setattr(keras, "read_keras_arrays", bug)
    with pytest.raises(RuntimeError, match="ZeroDivisionError: a bug in verydeep"):
        load_keras(path)


def test_keras_in_a_child_process_equals_in_this_one(tmp_path, tiny, monkeypatch):
    path = h5(tmp_path, tiny, layout="new")
    state, meta = load_keras_h5(path)
    monkeypatch.setattr(keras, "ISOLATE", False)
    state2, meta2 = load_keras_h5(path)
    assert meta == meta2 and all(torch.equal(state[k], state2[k]) for k in state2)
    assert all(torch.equal(state[k], v) for k, v in tiny.state_dict().items())


# -- any format --------------------------------------------------------------------------------


def test_caffemodel_with_nan_is_refused_by_the_same_rule(tmp_path, tiny):
    from verydeep.formats.caffe.caffemodel import write_caffemodel
    from verydeep.formats.caffe.load import load_caffemodel

    blobs: dict[str, list[np.ndarray]] = {}
    for key, value in tiny.state_dict().items():
        blobs.setdefault(key.rsplit(".", 1)[0], []).append(value.numpy().copy())
    blobs["conv3_1"][0][0, 0, 0, 0] = np.inf
    path = tmp_path / "nan.caffemodel"
    write_caffemodel(path, blobs)
    refused(load_caffemodel, path, "conv3_1.weight: 1 of 9 values are NaN or infinite")


def test_loader_hands_readers_regular_files_only(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    refused(verydeep.load, tmp_path / "dir.safetensors", "a directory; expected a weights file")
    os.mkfifo(tmp_path / "fifo.pth")
    refused(verydeep.load, tmp_path / "fifo.pth", "not a regular file")
    with pytest.raises(WeightsError, match="cannot open the file"):
        verydeep.load(str(tmp_path / "nul\0.pth"))


@pytest.mark.parametrize("name", ["nan_width.safetensors", "sparse.pth"])
def test_cli_reports_a_bad_weights_file_on_one_line(tmp_path, tiny, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        ours(path, tiny, width="NaN")
    else:
        tv = to_torchvision_state(tiny)
        pth(path, {**tv, "features.0.weight": tv["features.0.weight"].to_sparse()})
    proc = run_cli(["info", str(path)], check=False)
    assert proc.returncode == 1, proc.stderr
    one_line(cli_error_line(proc.stderr), path)
