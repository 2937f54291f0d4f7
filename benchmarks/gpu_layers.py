"""How the GPU plan was chosen: kernel alternatives for VGG-16's layers at batch 256 in bf16.

    python3 benchmarks/gpu_layers.py [--out results/gpu_layers.json] [--compile]

Per layer (CUDA events, channels-last bf16): conv1_1 with 3 input channels vs zero-padded to
8/16 (exact: zero channels meet zero weights); conv + ReLU as two kernels vs cuDNN's fused
``cudnn_convolution_relu``; ReLU before vs after the 2x2 max pool (exact: max and ReLU
commute), ATen's pool (which also writes int64 indices) vs two ``maximum`` passes over the NHWC view, a
``torch.compile``'d pool and a Triton kernel. Then the whole net under
each combination (``FastVGG`` with a modified plan, CUDA graphs on), and optionally
``torch.compile`` of the whole net. Every variant's logits are checked against the exact fp32
path. (Also tried once: ``torch.backends.cudnn.benchmark_limit = 0``, every algorithm: no gain.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from verydeep.bench import PartialReport, cuda_timed, event_ms, random_model
from verydeep.core.numerics import relative_error
from verydeep.formats.export import probe
from verydeep.runtime import FastVGG, make_plan, max_pool_nhwc, optimize, tf32_off, triton_max_pool
from verydeep.runtime.compiled import compiled_max_pool


def ms(fn: Callable[[], Any], iters: int = 10) -> float:
    """Milliseconds per ``fn()`` (CUDA events), after a synchronised first call."""
    fn()
    torch.cuda.synchronize()
    return event_ms(lambda _: fn(), None, iters)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--budget", type=float, default=150)
    args = ap.parse_args()
    report = PartialReport(args.out)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs CUDA"}))
        return 2

    dev = torch.device("cuda")
    report.data["machine"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    n = args.batch
    torch.backends.cudnn.benchmark = True
    bf = torch.bfloat16
    cl = torch.channels_last
    relu_fused = getattr(torch, "cudnn_convolution_relu", None)

    def conv_w(cin: int, cout: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (torch.randn(cout, cin, 3, 3, device=dev) * (2 / (9 * cin)) ** 0.5).to(bf).contiguous(memory_format=cl)
        return w, torch.randn(cout, device=dev).to(bf) * 0.01

    def act(c: int, hw: int) -> torch.Tensor:
        return torch.randn(n, c, hw, hw, device=dev).to(bf).contiguous(memory_format=cl)

    layer: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        # conv1_1: 3 input channels
        x3 = act(3, 224) * 50
        w3, b = conv_w(3, 64)
        v: dict[str, float] = {}
        v["3ch_conv_relu"] = ms(lambda: F.relu_(F.conv2d(x3, w3, b, padding=1)))
        for c in (4, 8, 16):
            wc = F.pad(w3, (0, 0, 0, 0, 0, c - 3)).contiguous(memory_format=cl)

            def padded(c: int = c, wc: torch.Tensor = wc) -> torch.Tensor:
                z = torch.empty((n, c, 224, 224), dtype=bf, device=dev, memory_format=cl)
                z[:, 3:].zero_()
                z[:, :3].copy_(x3)
                return F.relu_(F.conv2d(z, wc, b, padding=1))

            v[f"pad{c}_conv_relu_incl_pad"] = ms(padded)
            if relu_fused is not None:
                z = torch.empty((n, c, 224, 224), dtype=bf, device=dev, memory_format=cl).zero_()
                z[:, :3].copy_(x3)
                v[f"pad{c}_cudnn_relu_excl_pad"] = report.guarded(
                    f"c11_{c}", lambda z=z, wc=wc: ms(lambda: relu_fused(z, wc, b, [1, 1], [1, 1], [1, 1], 1))
                )
        x3n, w3n = x3.contiguous(), w3.contiguous()
        v["3ch_nchw_conv_relu"] = ms(lambda: F.relu_(F.conv2d(x3n, w3n, b, padding=1)))
        layer["conv1_1"] = v

        # conv1_2 + pool1
        x = act(64, 224)
        w, b = conv_w(64, 64)
        v = {
            "conv_relu_pool": ms(lambda: F.max_pool2d(F.relu_(F.conv2d(x, w, b, padding=1)), 2, 2, ceil_mode=True)),
            "conv_pool_relu": ms(lambda: F.relu_(F.max_pool2d(F.conv2d(x, w, b, padding=1), 2, 2, ceil_mode=True))),
            "conv_nhwcpool_relu": ms(lambda: F.relu_(max_pool_nhwc(F.conv2d(x, w, b, padding=1)))),
            "conv_only": ms(lambda: F.conv2d(x, w, b, padding=1)),
            "pool_only": ms(lambda: F.max_pool2d(x, 2, 2, ceil_mode=True)),
            "nhwcpool_only": ms(lambda: max_pool_nhwc(x)),
        }
        if relu_fused is not None:
            v["cudnn_relu_pool"] = report.guarded(
                "c12f",
                lambda: ms(lambda: F.max_pool2d(relu_fused(x, w, b, [1, 1], [1, 1], [1, 1], 1), 2, 2, ceil_mode=True)),
            )
        layer["conv1_2+pool1"] = v

        # pool1 alone: ATen (writes int64 indices on CUDA), NHWC maximum passes, amax over a view,
        # and torch.compile'd (a Triton kernel)
        y = act(64, 224)
        t0 = time.perf_counter()
        compiled_max_pool(y)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        v = {
            "aten": ms(lambda: F.max_pool2d(y, 2, 2, ceil_mode=True)),
            "nhwc_maximum": ms(lambda: max_pool_nhwc(y)),
            "amax_view": ms(lambda: y.permute(0, 2, 3, 1).reshape(n, 112, 2, 112, 2, 64).amax(dim=(2, 4))),
            "compiled": ms(lambda: compiled_max_pool(y)),
            "triton": ms(lambda: triton_max_pool(y)),
            "compiled_first_call_s": round(first, 2),
            "relu_only": ms(lambda: F.relu(y)),
        }
        layer["pool1"] = v
        for name, cin, cout, hw in (("conv2_1", 64, 128, 112), ("conv3_2", 256, 256, 56), ("conv4_2", 512, 512, 28)):
            x = act(cin, hw)
            w, b = conv_w(cin, cout)
            v = {
                "conv_relu": ms(lambda x=x, w=w, b=b: F.relu_(F.conv2d(x, w, b, padding=1))),
                "conv_only": ms(lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1)),
            }
            if relu_fused is not None:
                v["cudnn_relu"] = report.guarded(
                    name, lambda x=x, w=w, b=b: ms(lambda: relu_fused(x, w, b, [1, 1], [1, 1], [1, 1], 1))
                )
            layer[name] = v
    report.record("layers_ms", layer)

    # whole net under plan variants
    model = random_model("D").to(dev)
    xs = probe(n, seed=3).to(dev)
    with tf32_off(), torch.inference_mode():
        ref = torch.cat([model(xs[i : i + 64]) for i in range(0, n, 64)]).float()
    base = make_plan("bf16", dev)
    variants = {
        "default": {},
        "pad16+cudnn_relu+aten_pool": dict(conv="cudnn-relu", pool="aten", pad_channels=16, relu_after_pool=False),
        "pad16+cudnn_relu+compiled_pool": dict(
            conv="cudnn-relu", pool="compiled", pad_channels=16, relu_after_pool=False
        ),
        "pad8+cudnn_relu+triton_pool": dict(conv="cudnn-relu", pool="triton", pad_channels=8, relu_after_pool=False),
        "pad16+cudnn_relu+nhwc_pool": dict(
            conv="cudnn-relu", pool="nhwc-maximum", pad_channels=16, relu_after_pool=False
        ),
        "plain": dict(conv="aten", pool="aten", pad_channels=0, relu_after_pool=False),
        "pad8": dict(conv="aten", pool="aten", pad_channels=8, relu_after_pool=False),
        "pad8+relu_after_pool": dict(conv="aten", pool="aten", pad_channels=8, relu_after_pool=True),
        "pad8+cudnn_relu+relu_after_pool": dict(conv="cudnn-relu", pool="aten", pad_channels=8, relu_after_pool=True),
        "pad8+cudnn_relu": dict(conv="cudnn-relu", pool="aten", pad_channels=8, relu_after_pool=False),
    }
    whole: dict[str, dict] = {}
    for name, change in variants.items():
        if report.over_budget(args.budget, name):
            break

        def one(change: dict = change) -> dict:
            fast = FastVGG(model, replace(base, **change))
            r = cuda_timed(fast, xs, 20)
            r["rel_error_vs_fp32"] = relative_error(fast(xs), ref)
            del fast
            torch.cuda.empty_cache()
            return r

        whole[name] = report.guarded(f"whole_{name}", one)
    if args.compile and not report.over_budget(args.budget - 40, "compile"):

        def compiled() -> dict:
            t0 = time.perf_counter()
            fast = optimize(model, "bf16", device=dev, compile=True)
            fast(xs)
            first = time.perf_counter() - t0
            r = cuda_timed(fast, xs, 20)
            r.update({"first_call_s": round(first, 1), "rel_error_vs_fp32": relative_error(fast(xs), ref)})
            return r

        report.guarded("whole_compile", compiled)
    report.data["wall_s"] = round(report.elapsed(), 1)
    print(json.dumps(report.data, indent=2))
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
