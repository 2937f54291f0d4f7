"""The fp32 CPU plan's Winograd kernel (F(2x2,3x3) and F(4x4,3x3)) against float64 convolution:
per layer at VGG-16's full sizes, edge tiles, batch and thread invariance, the plan's choice, and
the fallback when the kernel cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_vgg, rel

from verydeep.runtime import make_plan, winograd
from verydeep.runtime import plan as plan_module
from verydeep.runtime.capabilities import cpu_flags
from verydeep.runtime.winograd import Winograd, tile_size, winograd_kernel


@pytest.fixture
def kernel():
    """The compiled kernel, built (on the first use in this process) inside the test's own
    ``VERYDEEP_HOME``; the test is skipped where it cannot be built, with the reason."""
    fn, why = winograd_kernel()
    if fn is None:
        pytest.skip(why)
    return fn


needs_kernel = pytest.mark.usefixtures("kernel")

#: Largest relative error (max |a - b| / max |b|) of one layer against float64, per tile size.
#: Measured on VGG-16's shapes: F(2x2) up to 6.8e-7 (the direct kernel: up to 2.3e-6), F(4x4)
#: up to 1.3e-5 (its interpolation points +-2 scale the rounding of the transforms).
LAYER_BOUND = {2: 2e-6, 4: 4e-5}
#: VGG-16's 3x3 layers the kernel takes, one per distinct shape: (in, out, size).
VGG16_LAYERS = [(64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56), (256, 512, 28),
                (512, 512, 28), (512, 512, 14)]  # fmt: skip


def layer(cin: int, cout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """He-initialised weights and small biases, as in a trained VGG's scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
    return w, torch.randn(cout, generator=g) * 0.1


def activations(n: int, c: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    """Post-ReLU inputs (half zeros), channels-last like the plan's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).relu_().contiguous(memory_format=torch.channels_last)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, relu: bool) -> torch.Tensor:
    y = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    return y.relu() if relu else y


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize(("cin", "cout", "size"), VGG16_LAYERS)
def test_full_size_layers_within_bound(cin, cout, size):
    w, b = layer(cin, cout)
    x = activations(1, cin, size, size)
    ref = reference(x, w, b, relu=True)
    conv = Winograd(w, b)
    for m, bound in LAYER_BOUND.items():
        y = conv(x, relu=True, m=m)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert rel(y, ref) <= bound, (m, cin, cout, size)


@needs_kernel
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (5, 7), (13, 17), (30, 41)])
def test_edge_tiles_and_odd_sizes(m, relu, h, w):
    """Maps that are not a multiple of the tile: the padded border and the cropped last tiles."""
    wt, b = layer(16, 32)
    x = torch.randn(2, 16, h, w).contiguous(memory_format=torch.channels_last)  # signed: relu matters
    y = Winograd(wt, b)(x, relu=relu, m=m)
    assert y.shape == (2, 32, h, w)
    assert rel(y, reference(x, wt, b, relu)) <= LAYER_BOUND[m]


@needs_kernel
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(("h", "w"), [(28, 28), (19, 27), (3, 3)])
def test_an_image_gives_the_same_bits_in_any_batch_and_thread_count(m, h, w):
    """Each tile's result does not depend on which block or thread computed it (a 3x3 map is one
    tile per image: the one-row GEMM case)."""
    wt, b = layer(32, 48)
    x = activations(5, 32, h, w)
    conv = Winograd(wt, b)
    whole = conv(x, relu=True, m=m)
    alone = torch.cat([conv(x[i : i + 1], relu=True, m=m) for i in range(5)])
    assert torch.equal(whole, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = conv(x, relu=True, m=m)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, one_thread)


@needs_kernel
@pytest.mark.parametrize("m", [2, 4])
def test_nan_in_is_nan_out(m):
    """A NaN pixel is not hidden by the fused ReLU (as with torch's relu)."""
    wt, b = layer(16, 16)
    x = activations(1, 16, 12, 12)
    x[0, 3, 5, 6] = float("nan")
    ref = reference(x, wt, b, relu=True)
    y = Winograd(wt, b)(x, relu=True, m=m)
    assert ref.isnan().any() and y[ref.isnan()].isnan().all()


def test_tile_size_depends_on_the_map_only():
    assert tile_size(28, 28) == 4  # 49 F(4x4) tiles
    assert tile_size(14, 14) == 2  # 16: too few for F(4x4)'s GEMMs
    assert tile_size(24, 32) == 4  # conv5 of the dense view at Q=384
    assert tile_size(224, 224, (2,)) == 2
    assert tile_size(2, 2) == 2


def test_weight_transform_is_g_w_gt_in_float64():
    """U[a, b] = (G w G^T)[a, b] for one filter, written out by hand for F(2x2): row 1 of G is
    (1/2)(1, 1, 1), so U[1, 1] is a quarter of the filter's sum."""
    w = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3) + 1  # 1..9
    u = winograd.transform_weight(w, 2).reshape(4, 4)
    assert u[0, 0] == 1 and u[0, 3] == 3 and u[3, 0] == 7 and u[3, 3] == 9
    assert u[1, 1] == pytest.approx(45 / 4)
    assert u[0, 1] == pytest.approx((1 + 2 + 3) / 2)


@needs_kernel
def test_refuses_other_channel_counts_and_dtypes():
    wt, b = layer(16, 16)
    conv = Winograd(wt, b)
    with pytest.raises(ValueError, match="16 channels"):
        conv(torch.randn(1, 32, 8, 8), relu=True)
    with pytest.raises(ValueError, match="float32"):
        conv(torch.randn(1, 16, 8, 8, dtype=torch.float64), relu=True)
    with pytest.raises(ValueError, match="tile sizes"):
        Winograd(wt, b, sizes=(3,))


# -- the plan ----------------------------------------------------------------------------------
@needs_kernel
def test_plan_uses_winograd_for_fp32_only():
    assert make_plan("fp32", "cpu").winograd == (4, 2)
    assert make_plan("fp32", "cpu", winograd=False).winograd == ()
    assert make_plan("bf16", "cpu", fallback=False).winograd == ()
    assert make_plan("fp32", "cpu", compile=True).winograd == ()


def test_generic_cpus_keep_the_direct_kernel(monkeypatch):
    monkeypatch.setattr(plan_module, "cpu_class", lambda: "generic")
    assert make_plan("fp32", "cpu").winograd == ()


def test_without_a_compiler_the_plan_says_why_and_stays_exact(monkeypatch):
    if "avx2" not in cpu_flags():
        pytest.skip("the kernel is only built on x86 CPUs with AVX2")
    monkeypatch.setattr(winograd, "_LIB", winograd._Library())
    monkeypatch.setattr(winograd, "_compiler", lambda: "/bin/false")
    kernel, why = winograd_kernel()
    assert kernel is None and why.startswith("the Winograd kernel could not be built: false failed")
    plan = make_plan("fp32", "cpu")
    assert plan.winograd == () and any("direct kernel" in note for note in plan.notes)
    model = random_vgg("D")
    x = torch.randn(2, 3, 224, 224) * 50
    with torch.inference_mode():
        assert rel(model.optimized("fp32")(x), model(x)) <= 1e-5


@needs_kernel
def test_the_built_kernel_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("VERYDEEP_HOME", str(tmp_path))
    monkeypatch.setattr(winograd, "_LIB", winograd._Library())
    assert winograd_kernel()[0] is not None
    (built,) = (tmp_path / "kernels").glob("winograd-*.so")
    assert built.with_suffix(".sha256").is_file()

    def no_compiler(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(winograd, "_LIB", winograd._Library())
    monkeypatch.setattr(winograd, "_build", no_compiler)
    assert winograd_kernel()[0] is not None
    assert list((tmp_path / "kernels").glob("winograd-*.so")) == [built]


@needs_kernel
def test_a_damaged_cached_build_is_rebuilt(monkeypatch, tmp_path):
    """A damaged library in the cache is built again, not loaded (dlopen of a truncated ELF
    file dies of SIGBUS)."""
    monkeypatch.setenv("VERYDEEP_HOME", str(tmp_path / "a"))
    monkeypatch.setattr(winograd, "_LIB", winograd._Library())
    assert winograd_kernel()[0] is not None
    (built,) = (tmp_path / "a" / "kernels").glob("winograd-*.so")
    damaged = tmp_path / "b" / "kernels" / built.name  # the same key in a cache this process has not loaded
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(built.read_bytes()[:1000])
    damaged.with_suffix(".sha256").write_text(built.with_suffix(".sha256").read_text())  # what it should be
    monkeypatch.setenv("VERYDEEP_HOME", str(tmp_path / "b"))
    monkeypatch.setattr(winograd, "_LIB", winograd._Library())
    kernel, why = winograd_kernel()
    assert kernel is not None and why == ""
    assert damaged.read_bytes() == built.read_bytes()


def test_an_unwritable_cache_keeps_the_direct_kernel(monkeypatch, tmp_path):
    if "avx2" not in cpu_flags():
        pytest.skip("the kernel is only built on x86 CPUs with AVX2")
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("VERYDEEP_HOME", str(tmp_path / "afile" / "home"))
    monkeypatch.setattr(winograd, "_LIB", winograd._Library())
    kernel, why = winograd_kernel()
    assert kernel is None and "afile" in why
    assert make_plan("fp32", "cpu").winograd == ()


# -- the whole net -----------------------------------------------------------------------------
@needs_kernel
@pytest.mark.slow
def test_full_vgg16_with_winograd_within_1e5_of_float64():
    """The fp32 budget end to end at full size: every 3x3 layer but conv1_1 runs Winograd (F(4x4)
    up to conv4, F(2x2) for conv5's 14x14 maps; the dense view's larger maps take F(4x4))."""
    model = random_vgg("D", num_classes=1000, width=1.0)
    fast = model.optimized("fp32")
    assert fast.plan.winograd == (4, 2)
    g = torch.Generator().manual_seed(3)
    x = F.interpolate(torch.rand(2, 3, 14, 14, generator=g) * 255 - 120, size=(224, 224), mode="bilinear")
    with torch.inference_mode():
        ref = model.double()(x.double())
        xd = F.interpolate(torch.rand(1, 3, 24, 32, generator=g) * 255 - 120, size=(384, 512), mode="bilinear")
        ref_dense = model.dense()(xd.double())
        model.float()
    assert rel(fast(x), ref) <= 1e-5
    assert rel(fast.dense()(xd), ref_dense) <= 1e-5


@needs_kernel
def test_bench_times_winograd_and_the_direct_kernels_side_by_side():
    from verydeep.bench import run_bench

    report = run_bench(
        arch="A", width=1 / 4, num_classes=10, batches=(2,), precisions=("fp32",), dense=None,
        repeats=1, warmup=0, baselines=("torchvision",), direct=True,
    )  # fmt: skip
    rows = {r["engine"]: r for r in report["results"]}
    assert list(report["plans"]["fp32"]["winograd"]) == [4, 2] and not report["plans"]["fp32+direct"]["winograd"]
    assert "3x3 winograd F(4x4,3x3)/F(2x2,3x3)" in rows["verydeep"]["plan"]
    assert "winograd" not in rows["verydeep+direct"]["plan"]
    for name in ("verydeep", "verydeep+direct"):
        assert rows[name]["rel_error"] <= 1e-5 and rows[name]["images_per_s"] > 0
