"""Full-size VGG-16 inference on one CUDA GPU: the fast path against the eager baselines.

    python3 benchmarks/bench_gpu.py [--out results/gpu.json] [--budget 170] [--compile]

Measures, in one process (random He-initialised weights; speed does not depend on them):

* the bf16 matmul ceiling: an 8192^3 bf16 matmul, TFLOP/s -> images/s ceiling at 30.94 GFLOP/image;
* ``model.optimized("bf16")`` (channels-last, cuDNN autotuned, CUDA graph per shape) at batch
  256 and 64, ``"fp16"`` at 256, the same bf16 plan without CUDA graphs, and ``"fp32"`` (TF32 off:
  exact) at 64;
* verydeep's exact eager path and torchvision's eager ``vgg16`` in fp32 at batch 64 (PyTorch's
  defaults, i.e. TF32 convolutions, and with TF32 off);
* the dense net on one 384x512 image (bf16 fast path, exact fp32);
* per-layer times of the bf16 plan at batch 256 (CUDA events), to show where the time goes;
* fidelity: max |a - b| / max |b| of each fast path's logits against the exact fp32 path (TF32
  off), top-1 agreement, CUDA-graph replay equal to the uncaptured path, feature taps.

Every measurement is guarded: a failure is recorded and the rest still runs; partial results are
printed as JSON lines on stderr as they come, the whole report as JSON on stdout at the end.
Optional parts are skipped once ``--budget`` seconds have passed (the whole run targets < 3 min
on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from verydeep.bench import PartialReport, cuda_timed, event_ms, random_model, torchvision_twin
from verydeep.core.numerics import relative_error
from verydeep.formats.export import probe
from verydeep.runtime import FastVGG, optimize, tf32_off

GFLOP_PER_IMAGE = 30.94  # VGG-16 at 224x224: 15.47 G multiply-adds


def matmul_ceiling() -> dict[str, float]:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    iters = 50
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * n**3 / (start.elapsed_time(end) / iters / 1000) / 1e12
    return {
        "bf16_matmul_tflops": round(tflops, 1),
        "ceiling_images_per_s": round(tflops * 1e12 / (GFLOP_PER_IMAGE * 1e9)),
    }


def layer_times(fast: FastVGG, x: torch.Tensor) -> dict[str, float]:
    """Per-step milliseconds of the fast plan (uncaptured), with CUDA events."""
    out: dict[str, float] = {}
    features, classifier = fast.stages()
    with torch.inference_mode():
        for _ in range(2):  # warm (cuDNN autotune)
            fast(x)
        with fast.context():
            h = fast.prepare(x)
            torch.cuda.synchronize()
            for name, fn in features:
                out[name] = round(event_ms(fn, h), 3)
                h = fn(h)
            h = torch.flatten(h.contiguous(), 1)
            for name, fn in classifier:
                out[name] = round(event_ms(fn, h), 3)
                h = fn(h)
    out["sum"] = round(sum(out.values()), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which optional parts are skipped")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    ap.add_argument("--big", type=int, default=256, help="the large batch (default 256)")
    args = ap.parse_args()
    out = args.out or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else None)
    report = PartialReport(out)
    REPORT, guarded, log = report.data, report.guarded, report.log

    REPORT["machine"] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import torchvision

        REPORT["machine"]["torchvision"] = torchvision.__version__
    except ImportError:
        torchvision = None  # type: ignore[assignment]
    if not torch.cuda.is_available():
        REPORT["errors"]["cuda"] = "CUDA is not available: nothing to measure (this script needs a GPU)"
        print(json.dumps(REPORT, indent=2))
        report.save()
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    REPORT["machine"].update(
        {
            "gpu": props.name,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    )
    log(f"{props.name}, torch {torch.__version__}")

    ceiling = guarded("matmul_ceiling", matmul_ceiling)
    ceil_ips = ceiling["ceiling_images_per_s"] if ceiling else None

    model = random_model("D").to(dev)
    log("model ready")
    big, small = args.big, 64
    xs = {n: probe(n, seed=n).to(dev) for n in (big, small)}

    # exact fp32 reference logits (TF32 off)
    with tf32_off(), torch.inference_mode():
        ref = {n: torch.cat([model(xs[n][i : i + 64]) for i in range(0, n, 64)]).float() for n in xs}

    def pct(ips: float) -> float | None:
        return round(100 * ips / ceil_ips, 1) if ceil_ips else None

    def fast_case(name: str, precision: str, n: int, iters: int, **kw: Any) -> dict[str, Any]:
        fast = optimize(model, precision, device=dev, **kw)
        r = cuda_timed(fast, xs[n], iters)
        y = fast(xs[n])
        r.update(
            {
                "plan": fast.plan.to_dict(),
                "percent_of_ceiling": pct(r["images_per_s"]),
                "rel_error_vs_fp32": relative_error(y, ref[n]),
                "top1_agreement": float((y.argmax(1) == ref[n].argmax(1)).float().mean()),
            }
        )
        del fast
        torch.cuda.empty_cache()
        return r

    results: dict[str, Any] = {}
    results["bf16_b256"] = guarded(f"fast_bf16_batch{big}", fast_case, "bf16", "bf16", big, 20)
    results["bf16_b64"] = guarded("fast_bf16_batch64", fast_case, "bf16", "bf16", small, 30)
    if not report.over_budget(args.budget, "fp16"):
        guarded(f"fast_fp16_batch{big}", fast_case, "fp16", "fp16", big, 20)
    if not report.over_budget(args.budget, "bf16 without CUDA graphs"):
        guarded(f"fast_bf16_batch{big}_no_cuda_graphs", fast_case, "bf16", "bf16", big, 10, cuda_graphs=False)
    if not report.over_budget(args.budget, "fp32 fast"):
        guarded("fast_fp32_batch64", fast_case, "fp32", "fp32", small, 10)

    # eager fp32 baselines at batch 64
    def eager_case(module: nn.Module, n: int, tf32: bool) -> dict[str, Any]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        with tf32_off() if not tf32 else nullcontext():
            r = cuda_timed(run, xs[n], 5, warmup=2)
            y = run(xs[n])
        r.update(
            {
                "tf32": tf32,
                "rel_error_vs_fp32": relative_error(y.float(), ref[n]),
                "percent_of_ceiling": pct(r["images_per_s"]),
            }
        )
        return r

    tv = None
    if torchvision is not None:
        try:
            tv = torchvision_twin(model)
        except Exception as e:
            REPORT["errors"]["torchvision_twin"] = f"{type(e).__name__}: {e}"
    base = None
    if tv is not None:
        base = guarded("torchvision_eager_fp32_batch64_default_tf32", eager_case, tv, small, True)
        guarded("torchvision_eager_fp32_batch64_no_tf32", eager_case, tv, small, False)
    guarded("exact_eager_fp32_batch64_no_tf32", eager_case, model, small, False)

    # dense, one 384x512 image
    if not report.over_budget(args.budget, "dense"):

        def dense_case() -> dict[str, Any]:
            xd = probe(1, 384, 512, seed=7).to(dev)
            with tf32_off(), torch.inference_mode():
                refd = model.dense()(xd).float()
            out: dict[str, Any] = {}
            for precision in ("bf16", "fp32"):
                fd = optimize(model, precision, device=dev).dense()
                r = cuda_timed(fd, xd, 20)
                r["rel_error_vs_fp32"] = relative_error(fd(xd), refd)
                out[f"fast_{precision}"] = r

            def exact_dense(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return model.dense()(x)

            with tf32_off():
                out["exact_fp32_no_tf32"] = cuda_timed(exact_dense, xd, 10)
            out["speedup_bf16_vs_exact"] = round(
                out["fast_bf16"]["images_per_s"] / out["exact_fp32_no_tf32"]["images_per_s"], 2
            )
            out["score_map"] = list(refd.shape)
            return out

        guarded("dense_384x512_batch1", dense_case)

    # correctness of the CUDA paths: graph replay, features
    if not report.over_budget(args.budget, "checks"):

        def checks() -> dict[str, Any]:
            fast = optimize(model, "bf16", device=dev)
            plain = optimize(model, "bf16", device=dev, cuda_graphs=False)
            a, b = probe(8, seed=1).to(dev), probe(8, seed=2).to(dev)
            ya = fast(a)
            yb = fast(b)  # replay with new data
            out = {
                "graph_replay_equals_uncaptured": relative_error(yb, plain(b)),
                "first_output_not_overwritten": relative_error(ya, plain(a)),
                "graphs_captured": fast.graphs_captured,
            }
            with torch.inference_mode():
                taps = model.features(a, taps=["relu4_3", "fc7"])
            got = fast.features(a, taps=["relu4_3", "fc7"])
            out["features_rel_error"] = {k: relative_error(got[k], taps[k].float()) for k in taps}
            return out

        guarded("cuda_checks", checks)

    if not report.over_budget(args.budget, "layer times"):
        guarded(
            f"layer_ms_bf16_batch{big}",
            lambda: layer_times(optimize(model, "bf16", device=dev, cuda_graphs=False), xs[big]),
        )

    if args.compile and not report.over_budget(args.budget - 60, "compile"):

        def compiled() -> dict[str, Any]:
            t0 = time.perf_counter()
            fast = optimize(model, "bf16", device=dev, compile=True)
            fast(xs[big])
            first = time.perf_counter() - t0
            r = cuda_timed(fast, xs[big], 20)
            r.update(
                {
                    "first_call_s": round(first, 1),
                    "rel_error_vs_fp32": relative_error(fast(xs[big]), ref[big]),
                    "percent_of_ceiling": pct(r["images_per_s"]),
                }
            )
            return r

        guarded(f"fast_bf16_compile_batch{big}", compiled)

    # summary
    summary: dict[str, Any] = {"ceiling_images_per_s": ceil_ips, "target_images_per_s": 15000}
    if results.get("bf16_b256"):
        summary["bf16_batch256_images_per_s"] = results["bf16_b256"]["images_per_s"]
        summary["bf16_batch256_percent_of_ceiling"] = results["bf16_b256"]["percent_of_ceiling"]
        summary["bf16_max_rel_error_vs_fp32"] = results["bf16_b256"]["rel_error_vs_fp32"]
        if base:
            summary["bf16_batch256_vs_torchvision_eager_fp32_batch64"] = round(
                results["bf16_b256"]["images_per_s"] / base["images_per_s"], 2
            )
    REPORT["summary"] = summary
    REPORT["wall_s"] = round(report.elapsed(), 1)
    print(json.dumps(REPORT, indent=2))
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
