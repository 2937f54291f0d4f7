"""Helpers shared by the training tests (no tests here): a small generated image task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

#: Four texture classes that differ in orientation, not colour; the colours are random.
CLASSES = ("checker", "diagonal", "horizontal", "vertical")


def texture(kind: str, rng: np.random.Generator, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """One H x W x 3 uint8 image of class ``kind`` with random period, phase, colours and noise."""
    h, w = size
    period = rng.uniform(20, 48)
    phase = rng.uniform(0, period)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    wave = lambda t: np.sin(2 * np.pi * (t + phase) / period)  # noqa: E731
    if kind == "horizontal":
        stripes = wave(y) + 0 * x
    elif kind == "vertical":
        stripes = wave(x) + 0 * y
    elif kind == "diagonal":
        stripes = wave(x + y * rng.choice([-1, 1]))
    else:
        stripes = wave(x) * wave(y)
    mask = (stripes > 0)[..., None]
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(a.astype(int) - b).sum() < 150:  # enough contrast to see the pattern
        b = rng.integers(0, 256, 3)
    image = np.where(mask, a, b).astype(np.float32) + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int, seed: int, classes=CLASSES, size=(256, 256)) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            hw = (size[0] + int(rng.integers(0, 32)), size[1] + int(rng.integers(0, 48)))
            Image.fromarray(texture(c, rng, hw)).save(root / c / f"{c}_{i:03d}.jpg", quality=90)
    return root


def run_cli(args: list[str], env: dict | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """``python -m verydeep ARGS`` in a subprocess with one thread (the machine is shared)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "verydeep", *args], capture_output=True, text=True, env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"verydeep {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
