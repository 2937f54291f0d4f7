"""Caffe files that must not bring verydeep down (issue 12): each defect class found by fuzzing and
by hand, with its minimal input written here, refused with one line naming the file and the layer.

- prototxt text: the declared input is what ``info`` describes; absurd inputs, parameters out of
  the range the graph computes with, axes past a blob's last, nets too large to build, deep
  nesting, unknown layer types, non-UTF-8 text, oversized or special files;
- caffemodel: claimed shapes that wrap around or are negative, doubles beyond float32, NaN
  weights, non-UTF-8 names; a prototxt claiming more than the caffemodel holds allocates nothing;
- ``verydeep info URL`` shows the URL as given.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import Server, cli_error_line, one_line, run_cli

from verydeep import configs
from verydeep.cli import main
from verydeep.errors import CaffeFormatError, VerydeepError, WeightsError
from verydeep.formats.caffe import caffe_pb2 as pb
from verydeep.formats.caffe.caffemodel import _key, _varint, read_caffemodel, write_caffemodel
from verydeep.formats.caffe.graph import MAX_PARAMS, CaffeGraph
from verydeep.formats.caffe.load import load_caffemodel
from verydeep.formats.caffe.prototxt import (
    MAX_BLOB_ELEMENTS,
    MAX_PROTOTXT_BYTES,
    format_prototxt,
    parse_prototxt,
    read_prototxt,
    vgg_net,
)
from verydeep.hub.info import summarize

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from fuzz_prototxt import BRANCHY_NET, check_inferred_shapes  # the fuzz target's seed net and its check


def net_text(dims: tuple[int, ...], *layers: str) -> str:
    """A V2 net with one input of shape ``dims`` and ``layers`` (their text) after it."""
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'input: "data"\ninput_shape {{ {shape} }}\n' + "\n".join(f"layer {{ {layer} }}" for layer in layers) + "\n"


def conv(name: str = "conv1", bottom: str = "data", params: str = "num_output: 4 kernel_size: 3") -> str:
    return f'name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ {params} }}'


def write(tmp_path: Path, text: str | bytes, name: str = "deploy.prototxt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ----------------------------------------------------------------------------- info at the declared input


def test_info_describes_the_net_at_its_declared_input(tmp_path):
    path = write(tmp_path, net_text((2, 3, 8, 10), conv()))
    info = summarize(path)
    assert info["inputs"] == {"data": [2, 3, 8, 10]}
    assert info["layers"] == [{"name": "conv1", "type": "Convolution", "output": [2, 4, 6, 8], "params": 112}]
    assert info["flops"] == 2 * (2 * 4 * 6 * 8) * (3 * 3 * 3)
    assert "flops_224" not in info  # the figure is at 2x3x8x10, not the paper's input


def test_info_of_a_table_1_prototxt_at_another_input_reports_what_caffe_would_build(tmp_path):
    small = write(tmp_path, format_prototxt(vgg_net("A", 1 / 16, 10, size=32)), "small.prototxt")
    info = summarize(small)
    assert info["inputs"] == {"data": [1, 3, 32, 32]}
    pool5 = next(r for r in info["layers"] if r["name"] == "pool5")
    assert pool5["output"] == [1, 32, 1, 1]  # not 7x7: the net runs at 32x32
    assert "config" not in info  # fc6 sized for 1x1 pool5 is not Table 1's fc6
    batch = write(tmp_path, format_prototxt(vgg_net("A", 1 / 16, 10, batch=2)), "batch.prototxt")
    info = summarize(batch)
    assert info["config"] == "A" and info["inputs"] == {"data": [2, 3, 224, 224]}
    assert info["flops"] == 2 * 2 * configs.multiply_adds("A", width=1 / 16, num_classes=10)


@pytest.mark.parametrize(
    "dims, found",
    [
        ((1, 3, 100_000, 100_000), "elements"),  # 30 G elements
        ((1, 3, 0, 8), "positive"),
        ((), "axes"),
    ],
)
def test_absurd_declared_input_is_refused(tmp_path, dims, found):
    path = write(tmp_path, net_text(dims, conv()))
    with pytest.raises(CaffeFormatError) as err:
        read_prototxt(path)
    one_line(err.value, str(path), "input 'data'", found)


def test_negative_v1_input_dim_is_refused(tmp_path):
    text = 'input: "data"\ninput_dim: 1 input_dim: 3 input_dim: -5 input_dim: 8\n'
    text += 'layers { name: "r" type: RELU bottom: "data" top: "r" }\n'
    with pytest.raises(CaffeFormatError) as err:
        read_prototxt(write(tmp_path, text))
    one_line(err.value, "deploy.prototxt", "input 'data'", "-5")


def test_input_shape_given_to_the_graph_is_checked_too():
    net = parse_prototxt(net_text((1, 3, 8, 8), conv()))
    with pytest.raises(CaffeFormatError) as err:
        CaffeGraph(net, input_shape=(1, 3, 1 << 20, 1 << 20))
    one_line(err.value, "input 'data'", f"{MAX_BLOB_ELEMENTS:,}")


# ----------------------------------------------------------------------------- parameters in range

POOL = 'name: "pool1" type: "Pooling" bottom: "data" top: "pool1" pooling_param {{ {} }}'
ONE = 'name: "{0}" type: "{1}" bottom: "data" top: "{0}" {2}'

#: (case, layer texts, substring of the message): each was accepted by validate() and crashed later
#: (or computed garbage) before; now validate() or the graph refuses it naming the layer.
BAD_LAYERS = [
    ("kernel 0", [conv(params="num_output: 4 kernel_size: 0")], "kernel must be at least 1"),
    ("stride 0", [conv(params="num_output: 4 kernel_size: 3 stride: 0")], "stride must be at least 1"),
    ("kernel_h alone", [conv(params="num_output: 4 kernel_h: 3")], "kernel_h and kernel_w go together"),
    ("3-D kernel", [conv(params="num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3")], "2-D"),
    ("kernel twice", [conv(params="num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3")], "not both"),
    ("dilation 0", [conv(params="num_output: 4 kernel_size: 3 dilation: 0")], "dilation must be at least 1"),
    ("group", [conv(params="num_output: 4 kernel_size: 3 group: 3")], "group 3 does not divide num_output 4"),
    ("conv axis", [conv(params="num_output: 4 kernel_size: 3 axis: 2")], "axis must be 1"),
    ("num_output 0", [conv(params="num_output: 0 kernel_size: 3")], "num_output must be at least 1"),
    ("kernel > input", [conv(params="num_output: 4 kernel_size: 9")], "larger than the 8x8 input"),
    ("dilated > input", [conv(params="num_output: 4 kernel_size: 3 dilation: 5")], "larger than the 8x8 input"),
    ("pool kernel 0", [POOL.format("pool: MAX kernel_size: 0")], "kernel must be at least 1"),
    ("pool no kernel", [POOL.format("pool: MAX")], "kernel_size is missing"),
    ("pool pad >= kernel", [POOL.format("pool: MAX kernel_size: 2 pad: 2")], "must be smaller than the kernel"),
    ("global + kernel", [POOL.format("pool: AVE global_pooling: true kernel_size: 2")], "global_pooling"),
    ("pool > input", [POOL.format("pool: MAX kernel_size: 20 pad: 5")], "larger than the 8x8 input"),
    ("dropout 5.5", [ONE.format("d", "Dropout", "dropout_param { dropout_ratio: 5.5 }")], "dropout_ratio"),
    ("dropout 1", [ONE.format("d", "Dropout", "dropout_param { dropout_ratio: 1 }")], "[0, 1)"),
    ("dropout nan", [ONE.format("d", "Dropout", "dropout_param { dropout_ratio: nan }")], "[0, 1)"),
    ("lrn even", [ONE.format("n", "LRN", "lrn_param { local_size: 4 }")], "local_size must be odd"),
    ("lrn alpha inf", [ONE.format("n", "LRN", "lrn_param { alpha: inf }")], "alpha must be a finite"),
    ("lrn too wide", [ONE.format("n", "LRN", "lrn_param { local_size: 11 }")], "wider than 9, a window"),
    ("relu slope nan", [ONE.format("r", "ReLU", "relu_param { negative_slope: nan }")], "negative_slope"),
    ("softmax axis 40", [ONE.format("s", "Softmax", "softmax_param { axis: 40 }")], "out of range"),
    ("softmax axis 4", [ONE.format("s", "Softmax", "softmax_param { axis: 4 }")], "axis 4 is out of range"),
    ("softmax axis -5", [ONE.format("s", "Softmax", "softmax_param { axis: -5 }")], "axis -5 is out of range"),
    ("concat axis 7", [ONE.format("c", "Concat", "concat_param { axis: 7 }")], "axis 7 is out of range"),
    ("concat_dim 9", [ONE.format("c", "Concat", "concat_param { concat_dim: 9 }")], "axis 9 is out of range"),
    ("flatten axis", [ONE.format("f", "Flatten", "flatten_param { axis: 6 }")], "axis 6 is out of range"),
    ("flatten order", [ONE.format("f", "Flatten", "flatten_param { axis: 3 end_axis: 1 }")], "after end_axis"),
    ("ip axis", [ONE.format("fc", "InnerProduct", "inner_product_param { num_output: 2 axis: 9 }")], "axis 9"),
    ("ip no output", [ONE.format("fc", "InnerProduct", "")], "num_output is missing"),
    (
        "concat shapes",
        [
            conv("a"),
            conv("b", params="num_output: 4 kernel_size: 1"),
            'name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c"',
        ],
        "agree on every axis but 1",
    ),
    (
        "eltwise shapes",
        [
            conv("a"),
            conv("b", params="num_output: 4 kernel_size: 1"),
            'name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "e"',
        ],
        "one shape",
    ),
    ("eltwise one bottom", [ONE.format("e", "Eltwise", "")], "bottoms: expected at least 2, found 1"),
    (
        "eltwise coeff",
        [conv("a"), 'name: "e" type: "Eltwise" bottom: "a" bottom: "a" top: "e" eltwise_param { coeff: 1 }'],
        "coeff: expected one per bottom",
    ),
    ("two bottoms", ['name: "r" type: "ReLU" bottom: "data" bottom: "data" top: "r"'], "bottoms: expected 1, found 2"),
    ("no top", ['name: "r" type: "ReLU" bottom: "data"'], "tops: expected 1, found 0"),
    ("same name", [conv("x"), conv("x", bottom="x")], "a second layer of this name with weights"),
]


@pytest.mark.parametrize("case, layers, found", BAD_LAYERS, ids=[c[0] for c in BAD_LAYERS])
def test_layer_parameters_the_graph_cannot_use_are_refused(tmp_path, case, layers, found):
    path = write(tmp_path, net_text((1, 5, 8, 8), *layers))
    with pytest.raises(CaffeFormatError) as err:
        summarize(path)  # what `verydeep info` does: read, validate, build the graph
    layer = layers[-1].split('"')[1]
    one_line(err.value, str(path), f"layer {layer!r}", found)


def test_the_graph_computes_the_shapes_it_infers():
    """Every layer type, through torch: the shapes `info` reports are the ones a run produces."""
    check_inferred_shapes(CaffeGraph(parse_prototxt(BRANCHY_NET)))


# ----------------------------------------------------------------------------- sizes verydeep will build


def test_a_200_byte_prototxt_cannot_ask_for_terabytes(tmp_path):
    fc = ONE.format("fc", "InnerProduct", "inner_product_param { num_output: 100000000 }")
    text = net_text((1, 3, 224, 224), fc)
    assert len(text) < 200
    path = write(tmp_path, text)
    for build in (lambda: CaffeGraph(read_prototxt(path), source=str(path)), lambda: summarize(path)):
        with pytest.raises(CaffeFormatError) as err:  # refused before allocating, on any device
            build()
        one_line(err.value, str(path), "layer 'fc'", f"{MAX_PARAMS:,}")


_PEAK_MEMORY = """
import sys
from verydeep.errors import VerydeepError
from verydeep.formats.caffe.load import load_caffemodel
def hwm_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
before = hwm_kib()
try:
    load_caffemodel(sys.argv[1], sys.argv[2])
except VerydeepError as e:
    print(type(e).__name__, hwm_kib() - before, e)
"""


def test_a_prototxt_claiming_more_than_the_caffemodel_holds_allocates_nothing(tmp_path):
    """250M parameters declared (1 GB of zeros, within MAX_PARAMS), a few bytes in the file."""
    fc = ONE.format("fc", "InnerProduct", "inner_product_param { num_output: 5000000 }")
    prototxt = write(tmp_path, net_text((1, 50), fc))
    caffemodel = tmp_path / "small.caffemodel"
    write_caffemodel(caffemodel, {"fc": [np.ones((2, 50), np.float32), np.ones(2, np.float32)]})
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY, str(caffemodel), str(prototxt)], capture_output=True, text=True
    )
    kind, extra_kib, message = run.stdout.split(" ", 2)
    assert kind == "CaffeFormatError" and "layer 'fc'" in message and "expected shape 5000000x50" in message
    assert int(extra_kib) < 200_000, f"{extra_kib} KiB allocated for a net the file does not hold"


def test_a_prototxt_larger_than_the_cap_is_refused(tmp_path):
    filler = "# " + "x" * 1000 + "\n"
    text = net_text((1, 3, 8, 8), conv()) + filler * (MAX_PROTOTXT_BYTES // len(filler) + 1)
    path = write(tmp_path, text)
    with pytest.raises(CaffeFormatError) as err:
        read_prototxt(path)
    one_line(err.value, str(path), f"{MAX_PROTOTXT_BYTES:,}")
    with pytest.raises(CaffeFormatError):
        parse_prototxt(text)


# ----------------------------------------------------------------------------- text that is not a net


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    text = net_text((1, 3, 8, 8), 'name: "x" type: "ReLU" bottom: "data" top: "x" foo ' + "{ a " * 5000 + "}" * 5001)
    path = write(tmp_path, text)
    with pytest.raises(CaffeFormatError) as err:
        read_prototxt(path)
    one_line(err.value, f"{path}:3:", "syntax error")


@pytest.mark.parametrize(
    "block",
    [
        'layers { name: "pool1" type: SPP bottom: "data" top: "pool1" }',  # V1: no such enum value in the schema
        'layer { name: "pool1" type: SPP bottom: "data" top: "pool1" }',  # V2, unquoted
        'layer { name: "pool1" type: "SPP" bottom: "data" top: "pool1" spp_param { pyramid_height: 2 } }',
        'layer { name: "pool1" type: "SPP" bottom: "data" top: "pool1" }',  # parses: validate() names it
    ],
)
def test_an_unknown_layer_type_is_named_not_a_syntax_error(tmp_path, block):
    header = 'input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
    path = write(tmp_path, header + block + "\n")
    with pytest.raises(CaffeFormatError) as err:
        read_prototxt(path)
    message = one_line(err.value, str(path), "layer 'pool1'", "type SPP is not supported", "(supported:")
    assert "syntax error" not in message
    assert ("POOLING" in message) == block.startswith("layers")  # V1 files get V1 names


def test_non_utf8_prototxt_names_file_and_line(tmp_path):
    text = net_text((1, 3, 8, 8), conv()).encode().replace(b'name: "conv1"', b'name: "conv\xff1"')
    path = write(tmp_path, text)
    with pytest.raises(CaffeFormatError) as err:
        read_prototxt(path)
    one_line(err.value, f"{path}:3:", "UTF-8", "0xff")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "deploy.prototxt"
    import os

    os.mkfifo(fifo)
    errors: list[BaseException] = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(CaffeFormatError, read_prototxt, fifo).value))
    reader.daemon = True  # a blocked open() would otherwise hold the test run
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "read_prototxt blocked on a FIFO"
    one_line(errors[0], str(fifo), "not a regular file")


def test_saved_graph_metadata_is_text_never_a_path(tmp_path):
    secret = write(tmp_path, "secret-token-123\n", "secret.txt")
    with pytest.raises(CaffeFormatError) as err:
        CaffeGraph.from_saved({"prototxt": str(secret), "input_shapes": {}}, {}, source="model.safetensors")
    message = one_line(err.value, "model.safetensors")
    assert "secret" not in message.replace(str(secret), "")
    with pytest.raises(CaffeFormatError):
        CaffeGraph.from_saved({"prototxt": 7, "input_shapes": {}}, {}, source="model.safetensors")


# ----------------------------------------------------------------------------- caffemodel


def raw_caffemodel(
    path: Path, blob: pb.BlobProto, data: bytes = b"", double: bool = False, name: bytes = b"fc"
) -> Path:
    """One V2 InnerProduct layer with one blob whose packed data is ``data`` (written by hand,
    so that the claimed shape need not match)."""
    body = blob.SerializeToString() + (_key(8 if double else 5) + _varint(len(data)) + data if data else b"")
    layer = _key(1) + _varint(len(name)) + name + pb.LayerParameter(type="InnerProduct").SerializeToString()
    layer += _key(7) + _varint(len(body)) + body
    path.write_bytes(_key(100) + _varint(len(layer)) + layer)
    return path


@pytest.mark.parametrize(
    "dims, found",
    [
        ((1 << 32, 1 << 32), "needs 18446744073709551616 values, found 0"),  # wraps to 0 in int64
        ((-1, -1), "negative"),  # -1 x -1 = 1 value
        ((1,) * 40, "at most 32"),
    ],
)
def test_claimed_blob_shapes_are_checked_in_whole_numbers(tmp_path, dims, found):
    blob = pb.BlobProto()
    blob.shape.dim.extend(dims)
    path = raw_caffemodel(tmp_path / "x.caffemodel", blob, np.ones(1, "<f4").tobytes() if -1 in dims else b"")
    with pytest.raises(CaffeFormatError) as err:
        read_caffemodel(path)
    one_line(err.value, str(path), "layer 'fc'", "blob 0", found)


def test_negative_legacy_blob_dims_are_refused(tmp_path):
    blob = pb.BlobProto(num=-1, channels=-1, height=1, width=1)
    path = raw_caffemodel(tmp_path / "x.caffemodel", blob, np.ones(1, "<f4").tobytes())
    with pytest.raises(CaffeFormatError) as err:
        read_caffemodel(path)
    one_line(err.value, str(path), "layer 'fc'", "negative")


def test_double_blobs_beyond_float32_are_refused_without_a_warning(tmp_path):
    blob = pb.BlobProto()
    blob.shape.dim.extend([3])
    path = raw_caffemodel(tmp_path / "x.caffemodel", blob, np.array([1.0, 1e300, 2.0], "<f8").tobytes(), double=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning "overflow encountered in cast", then inf
        with pytest.raises(CaffeFormatError) as err:
            read_caffemodel(path)
    one_line(err.value, str(path), "layer 'fc'", "value 1 of 3 is 1e+300", "float32")


def test_double_blobs_within_float32_still_read(tmp_path):
    blob = pb.BlobProto()
    blob.shape.dim.extend([2])
    path = raw_caffemodel(tmp_path / "x.caffemodel", blob, np.array([0.5, -3e38], "<f8").tobytes(), double=True)
    (array,) = read_caffemodel(path).blobs["fc"]
    assert array.dtype == np.float32 and array.tolist() == [0.5, np.float32(-3e38)]


def test_non_utf8_layer_name_in_a_caffemodel_is_refused(tmp_path):
    blob = pb.BlobProto()
    blob.shape.dim.extend([1])
    path = raw_caffemodel(tmp_path / "x.caffemodel", blob, np.ones(1, "<f4").tobytes(), name=b"\x9dfc")
    with pytest.raises(CaffeFormatError) as err:
        read_caffemodel(path)
    one_line(err.value, str(path), "field name is not UTF-8")


def test_nan_weights_are_refused_when_a_graph_loads_them(tmp_path):
    net = parse_prototxt(net_text((1, 3, 8, 8), conv()))
    weight = np.zeros((4, 3, 3, 3), np.float32)
    weight[1, 2, 0, 0] = np.nan
    path = tmp_path / "nan.caffemodel"
    write_caffemodel(path, {"conv1": [weight, np.zeros(4, np.float32)]}, net)
    with pytest.raises(WeightsError) as err:
        load_caffemodel(path)
    one_line(err.value, str(path), "layer 'conv1'", "weight", "NaN")


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(
    "text, found",
    [
        (net_text((1, 3, 100_000, 100_000), conv()), "input 'data'"),
        (
            net_text(
                (1, 3, 224, 224), ONE.format("fc", "InnerProduct", "inner_product_param { num_output: 100000000 }")
            ),
            "layer 'fc'",
        ),
        ('layers { name: "pool1" type: SPP }\n', "type SPP is not supported"),
    ],
    ids=["huge input", "huge fc", "SPP"],
)
def test_info_errors_are_one_line_with_exit_status_1(tmp_path, text, found):
    path = write(tmp_path, text)
    run = run_cli(["info", str(path)], check=False, timeout=120)
    assert run.returncode == 1
    one_line(cli_error_line(run.stderr), path, found)


def test_info_of_a_url_shows_the_url_as_given(tmp_path, capsys):
    net = parse_prototxt(net_text((1, 3, 8, 8), conv()))
    local = tmp_path / "net.caffemodel"
    write_caffemodel(local, {"conv1": [np.ones((4, 3, 3, 3), np.float32), np.ones(4, np.float32)]}, net)
    server = Server({"x/net.caffemodel": local.read_bytes()})
    try:
        url = f"{server.base}/x/net.caffemodel"
        assert main(["info", url, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["source"] == url and "caffemodel" in info["format"] and info["parameters"] == 112
        assert main(["info", url]) == 0
        assert capsys.readouterr().out.startswith(f"{url}: ")
        with pytest.raises(VerydeepError) as err:
            summarize(f"{server.base}/x/deploy.prototxt")
        one_line(err.value, f"{server.base}/x/deploy.prototxt")
    finally:
        server.close()
