"""Helpers shared by the training tests (no tests here): a small generated image task.

The task: four classes, each a colour (red, green, blue, grey); an image is a pattern of
stripes at a random angle and period in its class's colour (jittered) and that colour's
complement (cyan, magenta, yellow, dark grey), plus pixel noise. The class is in the colour, so a narrow VGG-A can learn it in
seconds on a CPU; orientation, period, brightness and position carry no information.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("blue", "green", "grey", "red")  # sorted: ImageFolder order
HUES = {"red": (220, 40, 40), "green": (40, 210, 50), "blue": (40, 60, 220), "grey": (200, 200, 200)}


def stripes(kind: str, rng: np.random.Generator, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """One H x W x 3 uint8 image of class ``kind``."""
    h, w = size
    period, angle = rng.uniform(16, 48), rng.uniform(0, np.pi)
    phase = rng.uniform(0, period)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    mask = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle) + phase) / period) > 0
    light = np.array(HUES[kind], dtype=np.float32) + rng.normal(0, 15, 3).astype(np.float32)
    dark = 255.0 - light  # the complement: edges in every channel, whatever the class
    image = np.where(mask[..., None], light, dark) + rng.normal(0, 10, (h, w, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int, seed: int, classes=CLASSES, size=(224, 224)) -> Path:
    """``root/<class>/<class>_NNN.jpg``, ``per_class`` images each; sizes vary by up to 16 px."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            hw = (size[0] + int(rng.integers(0, 16)), size[1] + int(rng.integers(0, 16)))
            Image.fromarray(stripes(c, rng, hw)).save(root / c / f"{c}_{i:03d}.jpg", quality=90)
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
