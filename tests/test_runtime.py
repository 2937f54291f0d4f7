"""``model.optimized()`` (:mod:`verydeep.runtime`) against the exact path: same outputs within each precision's
tolerance for the classic net, the dense net at sizes where Caffe's round-up pooling matters, and
feature taps; the plan's choices and fallbacks; cache blocking; the compiled variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_vgg, rel

from verydeep.errors import VerydeepError
from verydeep.runtime import FastVGG, make_plan, max_pool_nhwc, native, optimize

CPU = torch.device("cpu")
#: Largest relative logit error (max |a - b| / max |b|) each precision is held to.
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 1e-2}
#: Reduced precisions the CPU can run at all (natively or emulated by oneDNN).
RUNNABLE = ["bf16"] + (
    ["fp16"] if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported() else []
)


def caffe_input(n: int, h: int = 224, w: int = 224, seed: int = 1) -> torch.Tensor:
    """Smooth random images in Caffe space (what real photos look like to the net)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, h // 16), max(2, w // 16), generator=g) * 255 - 120
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def exact(model, x, dense=False):
    with torch.inference_mode():
        return (model.dense() if dense else model)(x)


# -- classic and dense views against the exact path ----------------------------------------------
@pytest.mark.parametrize("config", ["A-LRN", "C", "D", "E"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_classic_within_1e5(config, batch):
    model = random_vgg(config)
    fast = model.optimized("fp32")
    x = caffe_input(batch)
    y = fast(x)
    ref = exact(model, x)
    assert y.dtype == torch.float32 and y.shape == ref.shape == (batch, 10)
    assert rel(y, ref) <= 1e-5


@pytest.mark.parametrize("precision", RUNNABLE)
@pytest.mark.parametrize("config", ["A-LRN", "D", "E"])
@pytest.mark.parametrize("batch", [1, 3])
def test_reduced_precision_classic(precision, config, batch):
    model = random_vgg(config)
    fast = model.optimized(precision, fallback=False)  # compute in it even where it is emulated
    assert fast.plan.dtype == precision
    x = caffe_input(batch, seed=batch)
    y = fast(x)
    ref = exact(model, x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert 0 < rel(y, ref) <= TOLERANCE[precision]
    assert torch.equal(y.argmax(1), ref.argmax(1))  # the same top-1 class for every image


# 300x419: pool1 150x210, pool2 75x105, pool3 38x53 (round-up: floor would give 37x52),
# pool4 19x27, pool5 10x14 -> a 4x8 score map (floor pooling would give 3x7).
DENSE_SIZES = [(300, 419), (257, 333), (224, 224)]


@pytest.mark.parametrize("precision", ["fp32", *RUNNABLE])
@pytest.mark.parametrize("config", ["A-LRN", "D", "E"])
@pytest.mark.parametrize("size", DENSE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_matches_exact(precision, config, size):
    model = random_vgg(config)
    fast = model.optimized(precision, fallback=False).dense()
    x = caffe_input(2, *size, seed=size[1])
    y = fast(x)
    ref = exact(model, x, dense=True)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert rel(y, ref) <= TOLERANCE[precision]


def test_round_up_pooling_shape_at_300x419():
    model = random_vgg("D")
    y = model.optimized("fp32").dense()(caffe_input(1, 300, 419))
    assert y.shape == (1, 10, 4, 8)  # PyTorch's default floor pooling would give 3x7


def test_dense_at_224_equals_classic():
    model = random_vgg("D")
    fast = model.optimized("fp32")
    x = caffe_input(2)
    assert rel(fast.dense()(x)[:, :, 0, 0], fast(x)) < 1e-6


def test_wider_net_fp32_and_bf16():
    """Width 1/4 (more terms per dot product, closer to the real net's rounding)."""
    model = random_vgg("D", width=0.25, num_classes=100)
    x = caffe_input(2)
    ref = exact(model, x)
    assert rel(model.optimized("fp32")(x), ref) <= 1e-5
    assert rel(model.optimized("bf16", fallback=False)(x), ref) <= 2e-2


@pytest.mark.slow
def test_full_vgg16_fp32_within_1e5_and_bf16():
    model = random_vgg("D", num_classes=1000, width=1.0)
    x = caffe_input(2)
    ref = exact(model, x)
    assert rel(model.optimized("fp32")(x), ref) <= 1e-5
    bf = model.optimized("bf16", fallback=False)(x)
    assert rel(bf, ref) <= 2e-2
    xd = caffe_input(1, 256, 320)
    assert rel(model.optimized("fp32").dense()(xd), exact(model, xd, dense=True)) <= 1e-5


# -- cache blocking, pooling, taps -------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cache_blocking_changes_nothing(precision):
    """Running the leading stages a few images at a time gives bit-identical results."""
    model = random_vgg("D")
    blocked = model.optimized(precision, fallback=False, cache_bytes=1)  # one image at a time
    whole = model.optimized(precision, fallback=False, cache_bytes=0)
    x = caffe_input(5)
    assert blocked._sub_batch(blocked.prepare(x)) == 1 and whole._sub_batch(whole.prepare(x)) == 5
    assert torch.equal(blocked(x), whole(x))
    xd = caffe_input(3, 300, 419)
    assert torch.equal(blocked.dense()(xd), whole.dense()(xd))


def test_cache_budget_sets_images_per_pass():
    model = random_vgg("D")  # conv1_1 has 4 channels at width 1/16
    fast = model.optimized("fp32", cache_bytes=4 * 224 * 224 * 4 * 3)
    assert fast._sub_batch(fast.prepare(caffe_input(8))) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(8, 8), (224, 224), (56, 30)])
def test_nhwc_max_pool_equals_aten(dtype, hw):
    x = torch.randn(3, 5, *hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = max_pool_nhwc(x)
    assert torch.equal(y, F.max_pool2d(x, 2, 2, ceil_mode=True))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_features_match_exact_taps(precision):
    model = random_vgg("D")
    fast = model.optimized(precision, fallback=False, cache_bytes=1)  # taps inside blocked stages too
    taps = ["conv1_2", "relu1_2", "pool1", "conv3_3", "relu4_3", "pool5", "fc6", "relu6", "drop7", "fc8", "prob"]
    x = caffe_input(3)
    with torch.inference_mode():
        ref = model.features(x, taps=taps)
    got = fast.features(x, taps=taps)
    assert list(got) == taps
    for t in taps:
        assert got[t].dtype == torch.float32 and got[t].shape == ref[t].shape, t
        assert got[t].is_contiguous()
        assert rel(got[t], ref[t]) <= TOLERANCE[precision], t
    # a conv tap is the pre-activation: it has negative values, its ReLU does not
    assert (got["conv1_2"] < 0).any() and (got["relu1_2"] >= 0).all()


def test_stages_compose_to_the_classic_view():
    """The per-layer functions the GPU benchmark times are the forward's own computation."""
    model = random_vgg("D")
    fast = model.optimized("fp32", cache_bytes=0)
    features, classifier = fast.stages()
    assert [n for n, _ in features][:3] == ["conv1_1", "conv1_2", "pool1"] and len(features) == 13 + 5
    assert [n for n, _ in classifier] == ["fc6", "fc7", "fc8"]
    x = caffe_input(2)
    with torch.inference_mode(), fast.context():
        h = fast.prepare(x)
        for _, fn in features:
            h = fn(h)
        h = torch.flatten(h.contiguous(), 1)
        for _, fn in classifier:
            h = fn(h)
    assert torch.equal(h.float(), fast(x))
    assert fast.graphs_captured == 0  # no CUDA graphs on a CPU


def test_features_stop_early_and_reject_unknown():
    model = random_vgg("D")
    fast = model.optimized("fp32")
    got = fast.features(caffe_input(2), taps=["relu2_1"])
    assert got["relu2_1"].shape == (2, 8, 112, 112)
    with pytest.raises(VerydeepError, match="unknown layer 'conv9_9'"):
        fast.features(caffe_input(1), taps=["conv9_9"])


# -- the plan -------------------------------------------------------------------------------------
def test_plan_cpu_choices():
    plan = make_plan("fp32", "cpu")
    assert plan.dtype == "fp32" and plan.channels_last and not plan.cuda_graphs and not plan.compile
    if torch.backends.mkldnn.is_available():
        assert plan.conv == "onednn-prepacked" and plan.linear == "aten" and plan.cache_bytes > 0
    assert make_plan("bf16", "cpu", cache_bytes=0).cache_bytes == 0
    d = plan.to_dict()
    assert d["notes"] == [] and d["device"] == "cpu"


def test_plan_falls_back_to_fp32_where_not_native(monkeypatch):
    import verydeep.runtime.plan as rt

    monkeypatch.setattr(rt, "native", lambda precision, device: precision == "fp32")
    plan = rt.make_plan("bf16", "cpu")
    assert plan.precision == "bf16" and plan.dtype == "fp32"
    assert any("not native" in n and "computing in fp32" in n for n in plan.notes)
    forced = rt.make_plan("bf16", "cpu", fallback=False)
    assert forced.dtype == "bf16" and any("emulated" in n for n in forced.notes)
    # the fallback module is the fp32 one: exact
    model = random_vgg("D")
    fast = optimize(model, "bf16")
    x = caffe_input(2)
    assert fast.plan.dtype == "fp32" and rel(fast(x), exact(model, x)) <= 1e-5


def test_native_bf16_follows_cpu_flags(monkeypatch):
    import verydeep.runtime.capabilities as rt

    if not (rt.onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("no oneDNN bf16 in this build")
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx512f"}))  # AVX-512 without bf16
    assert not rt.native("bf16", CPU)
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert rt.native("bf16", CPU)
    monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset({"avx512f", "avx512_fp16"}))
    assert not rt.native("fp16", CPU)  # AVX512-FP16 alone is slower than fp32


def test_plan_notes_cuda_graphs_need_cuda_and_unknown_precision():
    plan = make_plan("fp32", "cpu", cuda_graphs=True)
    assert not plan.cuda_graphs and any("CUDA graphs need a CUDA device" in n for n in plan.notes)
    with pytest.raises(VerydeepError, match="unknown precision 'int4'"):
        make_plan("int4", "cpu")


def test_module_surface():
    model = random_vgg("D")
    fast = model.optimized("bf16")
    assert isinstance(fast, FastVGG) and fast.plan.precision == "bf16"
    assert fast.num_classes == 10 and fast.config == "D"
    assert "dtype=" in repr(fast)
    assert native("fp32", CPU)
    with pytest.raises(VerydeepError, match="expected N x 3 x H x W"):
        fast(torch.zeros(2, 4, 224, 224))
    with pytest.raises(VerydeepError, match="use .dense"):
        fast(caffe_input(1, 256, 256))
    with pytest.raises(VerydeepError, match="dense view needs pool5 of at least"):
        fast.dense()(caffe_input(1, 180, 300))
    with pytest.raises(VerydeepError, match="needs a verydeep VGG"):
        optimize(torch.nn.Linear(2, 2))


def test_snapshot_of_weights():
    """The fast module keeps the weights it was built from (documented: rebuild after changes)."""
    model = random_vgg("D")
    x = caffe_input(1)
    fast = model.optimized("bf16", fallback=False)
    before = fast(x)
    with torch.no_grad():
        model.fc8.bias.add_(100.0)
    assert torch.equal(fast(x), before)
    assert rel(model.optimized("bf16", fallback=False)(x), exact(model, x)) <= 2e-2


# -- torch.compile (slow: inductor compiles C++) ----------------------------------------------------
@pytest.mark.slow
def test_compiled_variant_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = random_vgg("D")
    for precision in ("fp32", "bf16"):
        fast = optimize(model, precision, compile=True, fallback=False, cache_dir=tmp_path / "inductor")
        assert fast.plan.compile and fast.plan.conv == "aten"
        x = caffe_input(2)
        assert rel(fast(x), exact(model, x)) <= TOLERANCE[precision]
        xd = caffe_input(1, 300, 419)
        assert rel(fast.dense()(xd), exact(model, xd, dense=True)) <= TOLERANCE[precision]
    assert any((tmp_path / "inductor").iterdir())  # kernels cached where we said


def test_gpu_plan_tricks_are_exact_on_cpu():
    """The GPU plan's padded conv1_1 input and ReLU-after-pool, run on the CPU with ATen convs."""
    from dataclasses import replace

    model = random_vgg("A-LRN")
    plan = replace(make_plan("fp32", "cpu"), conv="aten", pad_channels=8, relu_after_pool=True, cache_bytes=0)
    fast = FastVGG(model, plan)
    assert fast._steps[0].weight.shape[1] == 8
    x = caffe_input(2)
    assert rel(fast(x), exact(model, x)) <= 1e-5
    xd = caffe_input(1, 300, 419)
    assert rel(fast.dense()(xd), exact(model, xd, dense=True)) <= 1e-5
    got = fast.features(x, taps=["relu1_1", "pool1", "pool2"])
    with torch.inference_mode():
        ref = model.features(x, taps=["relu1_1", "pool1", "pool2"])
    for t in got:
        assert rel(got[t], ref[t]) <= 1e-5, t


def _no_tf32():
    """The exact path with TF32 off: PyTorch's default lets cuDNN convolve fp32 in TF32."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graphs_match(precision):
    model = random_vgg("D").cuda()
    fast = model.optimized(precision)
    assert fast.plan.cuda_graphs
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for n in (1, 3, 3):  # a second call with a shape replays the captured graph
            x = caffe_input(n, seed=n).cuda()
            with _no_tf32():
                ref = exact(model, x)
            assert rel(fast(x), ref) <= TOLERANCE[precision]
        xd = caffe_input(1, 300, 419).cuda()
        with _no_tf32():
            refd = exact(model, xd, dense=True)
        assert rel(fast.dense()(xd), refd) <= TOLERANCE[precision]
        got = fast.features(x, taps=["relu3_3", "fc7"])
        with _no_tf32(), torch.inference_mode():
            taps = model.features(x, taps=["relu3_3", "fc7"])
        for t in taps:
            assert rel(got[t], taps[t]) <= TOLERANCE[precision], t
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


# -- the commands' fast-path call sites ---------------------------------------------------------------
def test_extract_bf16_uses_the_fast_path(tmp_path, image_files, monkeypatch):
    from verydeep.extract.job import extract, read_features

    calls = []
    original = FastVGG.features

    def spy(self, x, taps=("fc7",)):
        calls.append(self.plan.precision)
        return original(self, x, taps)

    monkeypatch.setattr(FastVGG, "features", spy)
    model = random_vgg("D")
    layers = ["relu5_3", "fc7"]
    kw = dict(pool="avg", batch_size=2, workers=0, device="cpu", progress=False)
    extract(model, image_files, layers, tmp_path / "a.npz", precision="fp32", **kw)
    assert calls == []  # fp32 is the exact path
    extract(model, image_files, layers, tmp_path / "b.npz", precision="bf16", **kw)
    assert calls and set(calls) == {"bf16"}
    _, exact_feats = read_features(tmp_path / "a.npz", layers)
    _, fast_feats = read_features(tmp_path / "b.npz", layers)
    for t in layers:
        assert rel(torch.as_tensor(fast_feats[t]), torch.as_tensor(exact_feats[t])) <= 2e-2


TRITON_CHECK = """
import torch, torch.nn.functional as F
from verydeep.runtime import triton_max_pool
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((2, 4, 8, 8), (1, 3, 7, 9), (2, 8, 30, 41), (1, 16, 5, 5)):
        x = torch.randn(*shape).to(dtype).contiguous(memory_format=torch.channels_last)
        y = triton_max_pool(x, block=64)
        assert torch.equal(y, F.max_pool2d(x, 2, 2, ceil_mode=True)), (dtype, shape)
        assert y.is_contiguous(memory_format=torch.channels_last)
print("ok")
"""


def test_triton_pool_kernel_in_the_interpreter():
    """The GPU plan's Triton max pool, run by Triton's CPU interpreter (no GPU needed)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
