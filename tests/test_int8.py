"""int8 inference and the plan per CPU class.

References: the exact fp32 path (the tolerance every reduced precision is held to), a float64
simulation of the quantization scheme written here from the scheme's definition (per-channel
symmetric weights, per-tensor min-max activations), and onnxruntime's own static int8.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import photo, random_vgg, rel

import verydeep.runtime.capabilities as caps
from verydeep.errors import VerydeepError
from verydeep.formats.checks import probe
from verydeep.runtime import TOLERANCE, make_plan

pytestmark = pytest.mark.skipif(
    not caps.native("int8", torch.device("cpu")), reason="no oneDNN x86 int8 kernels on this machine"
)

#: /proc/cpuinfo flags of the machines this project has run on, and two more classes.
FLAGS = {
    "sapphire-rapids": {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"},
    "zen4": {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"},
    "ice-lake": {"avx2", "fma", "avx512f", "avx512_vnni"},
    "skylake-sp": {"avx2", "fma", "avx512f"},
    "alder-lake": {"avx2", "fma", "avx_vnni"},
    "zen3": {"avx2", "fma", "sse4_2"},
    "arm": {"fp", "asimd", "sve"},
}
CLASS = {
    "sapphire-rapids": "amx",
    "zen4": "avx512-bf16",
    "ice-lake": "avx512-vnni",
    "skylake-sp": "avx512",
    "alder-lake": "avx2-vnni",
    "zen3": "avx2",
    "arm": "generic",
}


@pytest.mark.parametrize("machine", list(FLAGS))
def test_plan_follows_the_cpu_class(machine, monkeypatch):
    monkeypatch.setattr(caps, "cpu_flags", lambda: frozenset(FLAGS[machine]))
    assert caps.cpu_class() == CLASS[machine]
    plan = make_plan("int8", "cpu")
    assert plan.isa == CLASS[machine]
    if machine == "arm":  # no x86 int8 kernels: fp32, said in the notes
        assert plan.dtype == "fp32" and any("int8 is not native" in n for n in plan.notes)
        return
    assert plan.dtype == "int8" and plan.conv == "onednn-int8"
    vnni = machine in ("sapphire-rapids", "zen4", "ice-lake", "alder-lake")
    assert plan.int8_levels == (255 if vnni else 127)
    assert any("7 bits" in n for n in plan.notes) != vnni
    assert make_plan("fp32", "cpu").isa == CLASS[machine]


def _scheme_in_float64(model, x: torch.Tensor, calibration: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """The int8 scheme simulated in float64: weights rounded per output channel to 127 levels,
    each activation rounded per tensor on a scale fixed by its largest value on ``calibration``."""
    names = [s.name for s in model.specs]
    relus = [names[i + 1] for i, s in enumerate(model.specs) if s.kind in ("conv", "fc") and names[i + 1 : i + 2]]
    relus = [r for r in relus if r.startswith("relu")]
    with torch.no_grad():
        taps = model.features(calibration, relus)
    top = {r: float(taps[r].max()) for r in relus}
    lo, hi = min(float(calibration.min()), 0.0), max(float(calibration.max()), 0.0)
    in_scale = (hi - lo) / levels
    zero = round(-lo / in_scale)
    x = x.double()
    h = (torch.clamp(torch.round(x / in_scale) + zero, 0, levels) - zero) * in_scale
    specs = model.specs
    with torch.no_grad():
        for i, s in enumerate(specs):
            if s.kind in ("conv", "fc"):
                layer = model.conv(s.name) if s.kind == "conv" else model.linear(s.name)
                w = layer.weight.double()
                step = w.abs().flatten(1).amax(1) / 127
                wq = torch.round(w / step.view(-1, *[1] * (w.dim() - 1))) * step.view(-1, *[1] * (w.dim() - 1))
                if s.kind == "conv":
                    h = F.conv2d(h, wq, layer.bias.double(), padding=1)
                else:
                    h = F.linear(torch.flatten(h, 1), wq, layer.bias.double())
                relu = specs[i + 1].name if i + 1 < len(specs) and specs[i + 1].kind == "relu" else None
                if relu:
                    scale = top[relu] / levels
                    h = torch.clamp(torch.round(torch.relu(h) / scale), 0, levels) * scale
            elif s.kind == "pool":
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
    return h


def test_int8_follows_its_scheme_and_stays_near_the_exact_path():
    model = random_vgg(num_classes=10)
    calibration, x = probe(16, seed=1), probe(8)
    fast = model.optimized("int8", calibration=calibration)
    assert fast.plan.dtype == "int8"
    y = fast(x)
    with torch.no_grad():
        exact = model(x)
    # the scheme in float64: only rounding ties and oneDNN's float requantization differ
    assert rel(y, _scheme_in_float64(model, x, calibration, fast.plan.int8_levels)) < 5e-3
    assert rel(y, exact) < TOLERANCE["int8"]
    assert rel(y, exact) > 1e-5  # really reduced: an int8 plan that ran fp32 would pass the rest


def test_int8_top1_agrees_with_fp32_on_generated_photos():
    model = random_vgg(num_classes=10, seed=3)
    from verydeep.data.preprocess import center_crop_caffe

    images = torch.stack([center_crop_caffe(photo(256, 320, seed=s)) for s in range(48)])
    calibration, test = images[:16], images[16:]  # judged on images it was not calibrated on
    fast = model.optimized("int8", calibration=calibration)
    with torch.no_grad():
        exact = model(test)
    found = fast(test)
    agree = float((found.argmax(1) == exact.argmax(1)).float().mean())
    assert agree >= 0.9, f"int8 top-1 agreed with fp32 on {agree:.0%} of {len(test)} photos"


def test_int8_dense_view_and_taps():
    model = random_vgg(num_classes=10)
    fast = model.optimized("int8", calibration=probe(8, seed=1))
    x = probe(1, 256, 300)  # odd pooled sizes on the way
    with torch.no_grad():
        exact = model.dense()(x)
    assert rel(fast.dense()(x), exact) < TOLERANCE["int8"]
    taps = ["conv3_3", "relu4_2", "pool5", "fc6", "fc7", "prob"]
    x = probe(4)
    found, expected = fast.features(x, taps), model.features(x, taps)
    for t in taps:
        assert found[t].dtype == torch.float32 and found[t].shape == expected[t].shape
        assert rel(found[t], expected[t]) < TOLERANCE["int8"], t


def test_int8_7_bit_activations_where_sums_would_saturate(monkeypatch):
    monkeypatch.setattr(caps, "cpu_flags", lambda: frozenset(FLAGS["zen3"]))
    model = random_vgg(num_classes=10)
    calibration, x = probe(8, seed=1), probe(4)
    fast = model.optimized("int8", calibration=calibration)
    assert fast.plan.int8_levels == 127
    assert rel(fast(x), _scheme_in_float64(model, x, calibration, levels=127)) < 5e-3


def test_int8_calibration_errors():
    model = random_vgg(num_classes=10)
    with pytest.raises(VerydeepError, match="needs calibration images"):
        model.optimized("int8")
    with pytest.raises(VerydeepError, match="expected N x 3 x H x W"):
        model.optimized("int8", calibration=torch.zeros(3, 224, 224))
    bad = probe(2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(VerydeepError, match="NaN"):
        model.optimized("int8", calibration=bad)
    with pytest.raises(VerydeepError, match="unknown precision 'int4'"):
        model.optimized("int4")


def test_a_calibration_is_reusable():
    model = random_vgg(num_classes=10)
    first = model.optimized("int8", calibration=probe(8, seed=1))
    again = model.optimized("int8", calibration=first.calibration)
    x = probe(2)
    assert torch.equal(first(x), again(x))


def test_calibration_images_from_a_folder(tmp_path):
    from verydeep.data.calibration import calibration_images

    for i in range(5):
        photo(240, 320, seed=i).save(tmp_path / f"{i}.jpg")
    (tmp_path / "9-broken.jpg").write_bytes(b"not a jpeg")
    batch = calibration_images(tmp_path, 3)
    assert batch.shape == (3, 3, 224, 224)
    assert calibration_images(tmp_path, 100).shape[0] == 5  # the broken file is skipped
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"nope")
    with pytest.raises(VerydeepError, match="no readable images"):
        calibration_images(empty, 4)


def test_onnxruntime_int8_export_agrees(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from verydeep.bench.engines import onnx_file
    from verydeep.formats.onnx import quantize_onnx

    model = random_vgg(num_classes=10)
    calibration, x = probe(8, seed=1), probe(4)
    path = quantize_onnx(onnx_file(model, tmp_path, False), tmp_path / "int8.onnx", calibration.numpy())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = torch.from_numpy(np.asarray(session.run(None, {"data": x.numpy()})[0]))
    ours = model.optimized("int8", calibration=calibration)(x)
    with torch.no_grad():
        exact = model(x)
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert rel(theirs, exact) < TOLERANCE["int8"]
    assert rel(ours, exact) < TOLERANCE["int8"]


def test_export_int8_onnx_is_checked_and_quantized(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from verydeep.formats.export import export

    model = random_vgg(num_classes=10)
    report = export(model, tmp_path / "vgg.onnx", "onnx", precision="int8", calibration=probe(8, seed=3))
    assert not report.exact and report.max_rel_error < TOLERANCE["int8"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "vgg.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 13  # every conv's input at least
    with pytest.raises(VerydeepError, match="only the onnx format"):
        export(model, tmp_path / "vgg.pth", "torchvision", precision="int8", calibration=probe(2))
    with pytest.raises(VerydeepError, match="needs calibration images"):
        export(model, tmp_path / "x.onnx", "onnx", precision="int8")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_commands_take_int8(tmp_path, narrow_weights, image_files):
    """classify, extract, evaluate and export with --precision int8, end to end."""
    import json

    from helpers import make_image_folder, run_cli

    out = run_cli(["classify", *image_files, "--weights", narrow_weights, "--precision", "int8", "--json"])
    assert "calibrated on the first" in out.stderr  # its own images, and it says so
    results = json.loads(out.stdout)
    assert len(results) == 3 and results[0]["precision"]["computed"] == "int8"
    exact = json.loads(run_cli(["classify", *image_files, "--weights", narrow_weights, "--json"]).stdout)
    assert [r["predictions"][0]["index"] for r in results] == [r["predictions"][0]["index"] for r in exact]

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        photo(240, 300, seed=10 + i).save(calib / f"{i}.jpg")
    listed = tmp_path / "images.txt"
    listed.write_text("\n".join(image_files) + "\n")
    feats = tmp_path / "feats.npz"
    run_cli(["extract", str(listed), "--weights", narrow_weights, "--layer", "fc7", "-o", str(feats),
             "--precision", "int8", "--calibration", str(calib), "--no-progress"])  # fmt: skip
    exact_feats = tmp_path / "exact.npz"
    run_cli(["extract", str(listed), "--weights", narrow_weights, "--layer", "fc7", "-o", str(exact_feats),
             "--no-progress"])  # fmt: skip
    assert rel(np.load(feats)["fc7"], np.load(exact_feats)["fc7"]) < TOLERANCE["int8"]

    from helpers import CLASSES

    from verydeep.formats.safetensors import save_safetensors

    four = random_vgg(num_classes=len(CLASSES))
    four.class_names = list(CLASSES)
    four_path = str(save_safetensors(four, tmp_path / "four.safetensors"))
    data = make_image_folder(tmp_path / "val", per_class=2, seed=0)
    ev = run_cli(["evaluate", str(data), "--weights", four_path, "--protocol", "center", "--precision", "int8",
                  "--json", "--no-progress"])  # fmt: skip
    assert json.loads(ev.stdout)["images"] == 2 * len(list(data.iterdir()))

    onnx_out = tmp_path / "net.onnx"
    run_cli(["export", narrow_weights, "--format", "onnx", "--precision", "int8", "--calibration", str(calib),
             "-o", str(onnx_out)])  # fmt: skip
    assert onnx_out.stat().st_size > 0
    bad = run_cli(["export", narrow_weights, "--format", "onnx", "--precision", "int8"], check=False)
    assert bad.returncode == 1 and "needs --calibration" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_measures_int8_against_onnxruntime_int8():
    pytest.importorskip("onnxruntime")
    from verydeep.bench import run_bench

    report = run_bench(
        arch="A", width=1 / 16, num_classes=10, batches=(2,), precisions=("fp32", "int8"), dense=None,
        repeats=1, warmup=0, baselines=("torchvision", "onnxruntime"), calibration_images=4,
    )  # fmt: skip
    rows = {f"{r['engine']} {r['precision']}": r for r in report["results"]}
    assert {"verydeep int8", "onnxruntime int8", "onnxruntime fp32"} <= set(rows)
    ours = rows["verydeep int8"]
    assert ours["fidelity"] == "reduced" and ours["best_peer"] == "onnxruntime int8"
    assert ours["vs_best_peer"] > 0 and rows["verydeep fp32"]["best_peer"] == "onnxruntime fp32"
    assert ours["rel_error"] < TOLERANCE["int8"] and 0 <= ours["top5_overlap"] <= 1
    assert report["plans"]["int8"]["isa"] == caps.cpu_class()
    assert "int8" in ours["plan"] and report["settings"]["calibration_images"] == 4
