"""``verydeep bench --json`` on a narrow net: the report's fields and their consistency.
No timing assertions (the machine may be busy); only that numbers are positive and agree."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import random_vgg

from verydeep.bench import BenchOptions, dense_flops, format_report, random_model, run_bench, torchvision_twin
from verydeep.cli import main

#: Table 1: 3x3 convolutions per stage; the stages have 64, 128, 256, 512 and 512 channels.
CONVS_PER_STAGE = {"A": (1, 1, 2, 2, 2), "D": (2, 2, 3, 3, 3), "E": (2, 2, 4, 4, 4)}
#: Multiply-adds of the classic net at 224x224 with 1000 classes (VGG-11, VGG-16, VGG-19).
MULTIPLY_ADDS_224 = {"A": 7_609_090_048, "D": 15_470_264_320, "E": 19_632_062_464}


def multiply_adds(config: str, height: int, width: int, narrow: int = 1, classes: int = 1000) -> int:
    """The paper's nets counted by hand: 3x3 convolutions at each stage's size (Caffe's pooling
    rounds up: ceil(h / 2)), then fc6 (7x7 over pool5), fc7 and fc8 at every 7x7 window of pool5.
    ``narrow`` divides every channel count (width 1/narrow)."""
    total, channels = 0, 3
    for out, convs in zip((64, 128, 256, 512, 512), CONVS_PER_STAGE[config]):
        for _ in range(convs):
            total += height * width * channels * (out // narrow) * 9
            channels = out // narrow
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    fc = 4096 // narrow
    windows = (height - 6) * (width - 6)
    return windows * (channels * 49 * fc + fc * fc + fc * classes) + total


FIELDS = {
    "view",
    "batch",
    "height",
    "width",
    "engine",
    "precision",
    "compute_dtype",
    "images_per_s",
    "latency_ms",
    "latency_ms_min",
    "gflops",
    "baseline",
    "speedup",
    "rel_error",
    "top1_agreement",
    "first_call_s",
    "build_s",
    "repeats",
    "call_mb",
}


@pytest.fixture(scope="module")
def report():
    return run_bench(
        arch="D",
        width=1 / 16,
        num_classes=10,
        batches=(1, 3),
        precisions=("fp32", "bf16"),
        dense=256,
        repeats=2,
        warmup=1,
        device="cpu",
    )


def test_cli_json(capsys):
    code = main(
        [
            "bench",
            "--arch",
            "D",
            "--width",
            "0.0625",
            "--num-classes",
            "10",
            "--batch",
            "1",
            "2",
            "--precision",
            "fp32",
            "bf16",
            "--dense",
            "256",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--baselines",
            "torchvision,onnxruntime",
            "--device",
            "cpu",
            "--quiet",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"machine", "model", "settings", "plans", "results", "skipped", "load"} <= set(out)
    assert out["model"]["config"] == "D" and out["model"]["num_classes"] == 10
    assert out["settings"]["repeats"] == 2 and out["settings"]["dense"] == [256, 341]
    assert set(out["plans"]) == {"fp32", "bf16"}
    keys = {(r["view"], r["batch"], r["engine"], r["precision"]) for r in out["results"]}
    for b in (1, 2):
        assert ("classic", b, "verydeep", "fp32") in keys and ("classic", b, "verydeep", "bf16") in keys
        assert ("classic", b, "torchvision", "fp32") in keys
    assert ("dense", 1, "verydeep", "bf16") in keys and ("dense", 1, "exact", "fp32") in keys
    if "onnxruntime" not in out["skipped"]:
        assert ("classic", 1, "onnxruntime", "fp32") in keys


def test_fields_and_consistency(report):
    m = report["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["torch"] == torch.__version__ and m["torch_threads"] >= 1
    gflop = report["model"]["gflop_per_image_224"]
    assert gflop == pytest.approx(2 * multiply_adds("D", 224, 224, narrow=16, classes=10) / 1e9, rel=1e-3)
    assert report["results"]
    for r in report["results"]:
        assert FIELDS <= set(r), set(FIELDS) - set(r)
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0 and r["latency_ms_min"] > 0
        assert r["latency_ms_min"] <= r["latency_ms"] + 1e-9
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["latency_ms"] / 1000), rel=1e-2)
        assert r["repeats"] == 2
        assert r["peak_rss_mb"] > 0 and r["call_mb"] >= 0
        assert r["speedup"] > 0
        assert 0 <= r["rel_error"] and 0 <= r["top1_agreement"] <= 1
        flops = 2 * multiply_adds("D", r["height"], r["width"], narrow=16, classes=10)
        assert r["gflops"] == pytest.approx(flops * r["images_per_s"] / 1e9, rel=0.05, abs=0.2)


def test_ratios_refer_to_the_baseline(report):
    rows = report["results"]
    for view, batch in {(r["view"], r["batch"]) for r in rows}:
        group = [r for r in rows if r["view"] == view and r["batch"] == batch]
        base_name = "torchvision" if view == "classic" else "exact"
        base = next(r for r in group if r["engine"] == base_name)
        assert base["speedup"] == pytest.approx(1.0) and base["baseline"] == f"{base_name} fp32"
        for r in group:
            assert r["speedup"] == pytest.approx(r["images_per_s"] / base["images_per_s"], rel=1e-2)


def test_fidelity(report):
    for r in report["results"]:
        if r["engine"] in ("exact",):
            assert r["rel_error"] == 0
        limit = 2e-2 if r["compute_dtype"] in ("bf16", "fp16") else 1e-5
        assert r["rel_error"] <= limit, r


def test_table_mentions_everything(report):
    text = format_report(report)
    assert "img/s" in text and "vs baseline" in text and "verydeep bf16" in text and "torchvision fp32" in text
    assert "plan bf16" in text and "dense 1x256x341" in text


def test_torchvision_twin_is_the_same_function():
    model = random_vgg("D")
    twin = torchvision_twin(model)
    assert twin is not None
    x = torch.randn(2, 3, 224, 224) * 50
    with torch.inference_mode():
        assert torch.allclose(twin(x), model(x), rtol=1e-5, atol=1e-5)
    assert torchvision_twin(random_vgg("A-LRN")) is None


def test_random_model_keeps_scale():
    model = random_model("D", width=1 / 16, num_classes=10)
    with torch.inference_mode():
        y = model(torch.randn(2, 3, 224, 224) * 50)
    assert y.abs().max() > 1e-3  # He init: the signal survives 16 layers


def test_hand_count_is_the_published_one():
    for config, count in MULTIPLY_ADDS_224.items():
        assert multiply_adds(config, 224, 224) == count


def test_dense_flops():
    for config, count in MULTIPLY_ADDS_224.items():
        assert dense_flops(config, 224, 224) == 2 * count  # one window: the classic net
    # 384x512: pool5 12x16, fc6 at 6x10 windows; 300x419: round-up pooling gives pool5 10x14
    for h, w in ((384, 512), (300, 419)):
        assert dense_flops("D", h, w) == 2 * multiply_adds("D", h, w)
    assert dense_flops("D", 256, 341, 1 / 16, 10) == 2 * multiply_adds("D", 256, 341, narrow=16, classes=10)


def test_bad_arguments():
    from verydeep.errors import VerydeepError

    with pytest.raises(VerydeepError, match="unknown baseline"):
        run_bench(width=1 / 16, baselines=("tensorflow",), repeats=1)
    with pytest.raises(VerydeepError, match="unknown precision"):
        run_bench(width=1 / 16, precisions=("int4",), repeats=1)
    with pytest.raises(VerydeepError, match="Q >= 224"):
        run_bench(width=1 / 16, dense=200, repeats=1, baselines=())
    with pytest.raises(VerydeepError, match="--repeats and --batch must be at least 1"):
        BenchOptions(batches=(0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_report():
    rep = run_bench(
        arch="D",
        width=1 / 16,
        num_classes=10,
        batches=(2,),
        precisions=("fp32", "bf16"),
        dense=256,
        repeats=2,
        warmup=1,
        device="cuda",
    )
    assert rep["machine"]["gpu"] and rep["plans"]["bf16"]["cuda_graphs"]
    assert {"onnxruntime", "opencv"} <= set(rep["skipped"])  # CPU engines
    for r in rep["results"]:
        assert r["images_per_s"] > 0 and r["peak_gpu_mb"] > 0 and r["speedup"] > 0
        if r["engine"] in ("torchvision", "exact"):
            assert r["rel_error"] <= 1e-2  # PyTorch's default on GPU: fp32 convolutions in TF32
        else:
            assert r["rel_error"] <= (2e-2 if r["compute_dtype"] != "fp32" else 1e-5)
