"""CPU training speed of `verydeep train` on real images: the issue's digits command.

Writes scikit-learn's handwritten digits as 32x32 PNGs (each pixel repeated 4x4; 1,437
training images), then runs, as a subprocess,

    verydeep train --arch A --width 0.125 --data train --batch-size 32 --lr 0.00125 --scale 256 \\
        --max-steps N --workers 0 --device cpu --no-progress --no-tensorboard

and reports the training images/s that the run's own metrics log: the mean over the log windows
after the first (the first holds the one-off start-up: allocations, oneDNN's kernel choices).
``--other SRC`` times a second source tree the same way, interleaved with this one (run A, run
B, run A, ...), so that a before/after comparison sees the same machine load; the report also
records the load average around each run, since the machine may be shared.

    python benchmarks/train_cpu.py                                  # this tree, 2 runs
    python benchmarks/train_cpu.py --other /tmp/before/src --json benchmarks/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from verydeep.runtime import cpu_model

HERE = Path(__file__).resolve().parents[1] / "src"


def digits_folder(root: Path) -> Path:
    """The 1,437 training digits of the tests' split (seed 0), as class folders of PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pixels))
    for i in order[360:]:
        folder = root / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        big = np.repeat(np.repeat(pixels[i], 4, axis=0), 4, axis=1)
        Image.fromarray(np.stack([big] * 3, axis=-1)).save(folder / f"{i:04d}.png")
    return root


def one_run(src: Path, data: Path, out: Path, a: argparse.Namespace) -> dict:
    """Train ``a.steps`` steps with the package in ``src``; images/s from its metrics file."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    cmd = [sys.executable, "-m", "verydeep", "train", "--arch", "A", "--width", "0.125", "--data", str(data),
           "--batch-size", "32", "--lr", "0.00125", "--scale", "256", "--max-steps", str(a.steps),
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard",
           "--checkpoint-every", "0", "--out", str(out)]  # fmt: skip
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{src}: verydeep train exited {proc.returncode}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if r["kind"] == "train"][1:]
    rate = float(np.mean([r["images_per_s"] for r in windows]))
    return {
        "src": str(src),
        "images_per_s": round(rate, 1),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", type=Path, help="a second source tree (its src/ folder) to time the same way")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per run (default 30: 3 log windows)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="verydeep-train-cpu-"))
    try:
        data = digits_folder(root / "train")
        trees = [HERE] + ([a.other.resolve()] if a.other else [])
        runs = []
        for _ in range(a.repeats):
            for i, src in enumerate(trees):
                result = one_run(src, data, root / f"run{i}", a)
                print(json.dumps(result), file=sys.stderr)
                runs.append(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {
        str(src): round(float(np.median([r["images_per_s"] for r in runs if r["src"] == str(src)])), 1) for src in trees
    }
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": a.threads, "steps": a.steps,
              "command": "verydeep train --arch A --width 0.125 --batch-size 32 --scale 256 (digits, 32x32 PNGs)",
              "median_images_per_s": summary, "runs": runs}  # fmt: skip
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
