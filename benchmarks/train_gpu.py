"""GPU smoke benchmark of `verydeep train`: full-size VGG-16 (config D, width 1), bf16 autocast,
channels_last, batch 64, trained through the library's own ``Trainer`` (the code path
``verydeep train`` runs: JPEG decoding in loader workers, the paper's augmentation, the
optimiser step, metrics), on a synthetic ImageFolder generated in /tmp.

Prints one JSON object: training images/s over the timed steps (after warm-up), peak GPU
memory (torch.cuda.max_memory_allocated), the loss of the first and last logged windows, the
device name, the torch version; plus, for comparison, images/s of the same net and step on a
batch already on the GPU (no data loading), which shows whether the loader keeps up.

    python3 benchmarks/train_gpu.py              # on a CUDA machine (< 3 min on an H100)
    python3 benchmarks/train_gpu.py --smoke      # anywhere: tiny net, 2 steps, CPU ok

The images are random smooth colour fields in 10 class folders (labels carry no signal), so
the loss only shows that training runs and stays finite, not that it learns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from verydeep.core.defaults import default_device


def _write_images(job: tuple[str, int, int, int, int]) -> None:
    folder, start, count, height, seed = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        width = height + int(rng.integers(0, height // 2))
        small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        image.save(Path(folder) / f"{i:06d}.jpg", quality=90)


def make_image_folder(root: Path, n_images: int, classes: int, height: int) -> Path:
    """``root/class_k/NNNNNN.jpg``: ``n_images`` JPEGs, ``height`` px high, 1..1.5x as wide."""
    jobs = []
    per_class = -(-n_images // classes)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, per_class, 32):
            jobs.append((str(folder), start, min(32, per_class - start), height, c * 100_000 + start))
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_images, jobs))
    return root


def compute_only(model: torch.nn.Module, optimizer, batch: int, crop: int, classes: int, device: torch.device,
                 dtype, channels_last: bool, warmup: int, steps: int) -> float:  # fmt: skip
    """Images/s of the same forward/backward/step on a batch already on the device."""
    from verydeep.data.augment import to_input

    crops = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)
    shifts = torch.zeros(batch, 3, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(to_input(crops, shifts, channels_last))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=30, help="timed optimiser steps (default 30)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10; also the log window)")
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="forward batch (default: the batch)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--workers", type=int, default=None, help="loader processes (default min(12, cpus))")
    p.add_argument("--arch", default="D")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-height", type=int, default=320, help="generated JPEGs' height (rescaled to S=256)")
    p.add_argument("--root", default=None, help="work folder (default: a new one in /tmp, removed afterwards)")
    p.add_argument("--device", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny net (width 1/32), batch 4, 1+2 steps; runs on a CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.width, a.batch, a.warmup, a.steps, a.image_height = 1 / 32, 4, 1, 2, 256
        a.workers = 2 if a.workers is None else a.workers
    device = torch.device(default_device(a.device))
    if device.type != "cuda" and not a.smoke:
        print("train_gpu.py: no CUDA device; run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    workers = a.workers if a.workers is not None else min(12, os.cpu_count() or 1)

    from verydeep.train.trainer import PRECISION, Trainer, prepare_config

    root = (
        Path(a.root)
        if a.root
        else Path(tempfile.mkdtemp(prefix="verydeep-train-gpu-", dir="/tmp" if os.path.isdir("/tmp") else None))
    )
    total_steps = a.warmup + a.steps
    t0 = time.perf_counter()
    data = make_image_folder(root / "data", total_steps * a.batch, 10, a.image_height)
    generated_s = time.perf_counter() - t0
    out = root / "run"
    if out.exists():
        shutil.rmtree(out)
    config = prepare_config(None, {
        "data": str(data), "out": str(out), "arch": a.arch, "width": a.width, "scale": [256], "crop": 224,
        "batch_size": a.batch, "micro_batch": a.micro_batch, "max_steps": total_steps, "epochs": 1,
        "precision": a.precision, "channels_last": "on", "workers": workers, "device": str(device),
        "log_every": a.warmup, "checkpoint_every": 0, "tensorboard": False, "progress": False,
    })  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    job = Trainer(config, log=lambda msg: print(msg, file=sys.stderr))
    try:
        result = job.run()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        # The same net, optimiser and step, without the data pipeline.
        model_only = compute_only(job.model, job.optimizer, a.micro_batch or a.batch, 224, job.model.num_classes,
                                  device, PRECISION[a.precision], True, 3 if not a.smoke else 1, a.steps)  # fmt: skip
    finally:
        job.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if r["kind"] == "train"]
    timed = windows[1:]  # the first window holds the warm-up steps (cuDNN autotuning, allocations)
    sizes = [r["step"] - prev["step"] for prev, r in zip(windows, timed)]  # steps per window
    seconds = sum(n * a.batch / r["images_per_s"] for n, r in zip(sizes, timed))
    report = {
        "code_path": "verydeep.train.trainer.Trainer (loader workers, augmentation, SGD step, metrics)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": a.arch, "width": a.width, "batch": a.batch, "micro_batch": a.micro_batch or a.batch,
        "precision": a.precision, "channels_last": True, "loader_workers": workers,
        "warmup_steps": windows[0]["step"], "timed_steps": sum(sizes),
        "images_per_s": round(sum(sizes) * a.batch / seconds, 1) if timed else None,
        "images_per_s_without_loader": round(model_only, 1),
        "peak_gpu_memory_bytes": peak,
        "peak_gpu_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
        "loss_first": windows[0]["loss"], "loss_first_steps": f"1-{windows[0]['step']}",
        "loss_last": windows[-1]["loss"],
        "loss_last_steps": f"{windows[-2]['step'] + 1 if len(windows) > 1 else 1}-{windows[-1]['step']}",
        "run_elapsed_s": round(result.elapsed_s, 1), "images_generated_s": round(generated_s, 1),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if not a.root:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
