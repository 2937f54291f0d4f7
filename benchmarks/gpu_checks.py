"""Correctness of the CUDA code paths, against a float64 CPU reference (run on a GPU machine).

    python3 benchmarks/gpu_checks.py [--out checks.json]

Checks, each printed as it finishes and collected into one JSON object:
  * full-size VGG-16 (random weights), classic 224 at batch 2 and dense 300x419: the exact path on
    CUDA (TF32 off) and ``model.optimized`` fp32 / bf16 / fp16 (CUDA graphs) against float64 on CPU,
    max relative error (max|a-b| / max|b|) with the project's tolerances (1e-5, 2e-2, 1e-2);
  * ``verydeep.evaluate`` (dense, multicrop; Q = 256, 320) on CUDA vs CPU for a handful of generated
    JPEGs: soft-max within 1e-4 absolute, same top-1;
  * ``verydeep.extract`` fc7 on CUDA vs CPU.
Exits 1 if any check fails. Needs only torch/torchvision/numpy/Pillow/safetensors/protobuf/tqdm.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import verydeep
from verydeep.core.atomic import write_text
from verydeep.core.numerics import relative_error
from verydeep.runtime import TOLERANCE

#: The device under test; GPU_CHECKS_DEVICE=cpu dry-runs the script on a machine without one.
GPU = os.environ.get("GPU_CHECKS_DEVICE", "cuda")
RESULTS: dict[str, object] = {}
FAILED: list[str] = []


def check(name: str, value: float, limit: float) -> None:
    ok = value <= limit
    RESULTS[name] = {"value": value, "limit": limit, "ok": ok}
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3e} (limit {limit:g})", flush=True)
    if not ok:
        FAILED.append(name)


def he_vgg(config: str = "D", width: float = 1.0, num_classes: int = 1000, seed: int = 0) -> verydeep.VGG:
    torch.manual_seed(seed)
    model = verydeep.VGG(config, num_classes=num_classes, width=width).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight"):
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
            else:
                p.normal_(0, 0.1)
    return model


def model_paths() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = he_vgg()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224, generator=g) * 50
    xd = torch.randn(1, 3, 300, 419, generator=g) * 50
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = m64(x.double())
        ref_dense = m64.dense()(xd.double())
    del m64
    gpu = model.to(GPU)
    with torch.no_grad():
        check("exact fp32 classic (cuda)", relative_error(gpu(x.to(GPU)), ref), 1e-5)
        check("exact fp32 dense 300x419 (cuda)", relative_error(gpu.dense()(xd.to(GPU)), ref_dense), 1e-5)
    for precision in ("fp32", "bf16", "fp16"):
        fast = gpu.optimized(precision=precision)
        RESULTS[f"plan {precision}"] = fast.plan.to_dict() if hasattr(fast, "plan") else None
        for _ in range(2):  # the second call replays the captured CUDA graph
            out = fast(x.to(GPU))
        check(f"optimized {precision} classic (cuda)", relative_error(out, ref), TOLERANCE[precision])
        out = fast.dense()(xd.to(GPU))
        out = fast.dense()(xd.to(GPU))
        check(f"optimized {precision} dense 300x419 (cuda)", relative_error(out, ref_dense), TOLERANCE[precision])
    if GPU == "cuda":
        torch.cuda.synchronize()


def make_images(folder: Path, n: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = [(240, 320), (400, 300), (256, 256), (333, 500), (300, 300), (220, 410)][i % 6]
        small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
        cls = folder / f"n0000000{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(cls / f"img{i}.jpg", quality=95)


def jobs_on_cuda() -> None:
    from verydeep.data.eval_set import open_eval_set
    from verydeep.evaluate import evaluate

    model = he_vgg(width=1 / 8, num_classes=3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "val"
        make_images(root)
        ds = open_eval_set(str(root))
        for protocol in ("dense", "multicrop"):
            res = {}
            for side, device in (("ref", "cpu"), ("dut", GPU)):
                res[side] = evaluate(
                    copy.deepcopy(model),
                    ds,
                    protocol,
                    device=device,
                    workers=0,
                    progress=False,
                    batch_size=4,
                    scores=Path(tmp) / f"{protocol}-{side}.npz",
                )
            a, b = res["ref"].probs, res["dut"].probs
            check(f"evaluate {protocol} Q=256,384,512 cuda vs cpu (abs)", float(np.abs(a - b).max()), 1e-4)
            same = bool((a.argmax(1) == b.argmax(1)).all())
            RESULTS[f"evaluate {protocol} same top-1"] = same
            if not same:
                FAILED.append(f"evaluate {protocol} top-1")
        try:
            from verydeep.extract.job import extract, read_features

            feats = {}
            for side, device in (("ref", "cpu"), ("dut", GPU)):
                out = Path(tmp) / f"fc7-{side}.npz"
                extract(
                    copy.deepcopy(model),
                    sorted(map(str, root.rglob("*.jpg"))),
                    ["fc7"],
                    out,
                    device=device,
                    workers=0,
                    progress=False,
                )
                feats[side] = read_features(out)[1]["fc7"]  # rows in input order
            d = relative_error(feats["dut"], feats["ref"])
            check("extract fc7 cuda vs cpu (rel)", d, 1e-5)
        except TypeError as e:  # signature drift: report, do not hide
            RESULTS["extract"] = f"not run: {e}"
            FAILED.append("extract (call failed)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if GPU == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (GPU_CHECKS_DEVICE=cpu dry-runs the script)")
        return 0
    RESULTS["device"] = torch.cuda.get_device_name() if GPU == "cuda" else GPU
    RESULTS["torch"] = torch.__version__
    start = time.perf_counter()
    for step in (model_paths, jobs_on_cuda):
        try:
            step()
        except Exception:  # report and go on with the next check
            traceback.print_exc()
            FAILED.append(f"{step.__name__} crashed")
    RESULTS["failed"] = FAILED
    RESULTS["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(RESULTS, indent=1, default=str)
    print(text)
    if args.out:
        write_text(args.out, text)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
