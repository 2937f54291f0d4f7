"""Helpers the tests share (fixtures live in ``conftest.py``).

- Narrow random nets (:func:`random_vgg`) and smooth random photos (:func:`photo`).
- :func:`rel`: the tests' own relative error (max |found - expected| / max |expected|), kept
  apart from the library's so a bug there cannot hide in both.
- :func:`one_line` and :func:`cli_error_line`: a refusal is one line naming what was wrong.
- A local HTTP server with Range support (:class:`Server`), on 127.0.0.1 only.
- The training tests' generated image task (:func:`make_image_folder`, :data:`CLASSES`):
  The task: four classes, each a colour (red, green, blue, grey); an image is a pattern of
  stripes at a random angle and period in its class's colour (jittered) and that colour's
  complement (cyan, magenta, yellow, dark grey), plus pixel noise. The class is in the colour,
  so a narrow VGG-A can learn it in
  seconds on a CPU; orientation, period, brightness and position carry no information.
- :func:`run_cli` runs ``python -m verydeep`` in a subprocess; :func:`read_jsonl` reads a run log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from verydeep import VGG

#: Narrow nets keep the suite fast; a few tests use the full 138M-parameter VGG-16.
NARROW = 1 / 16


def random_vgg(config: str = "D", num_classes: int = 10, width: float = NARROW, seed: int = 0, **kw) -> VGG:
    torch.manual_seed(seed)
    model = VGG(config, num_classes=num_classes, width=width, **kw)
    with torch.no_grad():  # biases non-zero so that a swapped weight/bias is caught
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def photo(height: int = 180, width: int = 240, seed: int = 0) -> Image.Image:
    """A smooth random colour image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 20), max(2, width // 20), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def _float64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def rel(found, expected) -> float:
    """max |found - expected| / max |expected|, in float64, for tensors or arrays of one shape."""
    a, b = _float64(found), _float64(expected)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_line(error: pytest.ExceptionInfo | BaseException | str, *names: object) -> str:
    """The message of ``error`` (an exception, pytest's record of one, or a line already taken
    from stderr), checked to be one non-blank line that names each of ``names``: what the CLI
    prints for a refused input."""
    message = str(error.value if isinstance(error, pytest.ExceptionInfo) else error)
    assert message.strip() and "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def cli_error_line(stderr: str) -> str:
    """The one line a refused command printed: ``stderr`` holds exactly one non-blank line and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


class Server:
    """Serves ``files`` on 127.0.0.1 with Range support. ``cut_after`` bytes ends the next response
    early; while :attr:`gate` is cleared, every response stops after its first :attr:`CHUNK` bytes
    until it is set again (so a second client arrives while the first is mid-download)."""

    CHUNK = 1 << 16
    #: Seconds a held response waits for the gate at most.
    HOLD = 180

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_after: int | None = None
        self.ranges: list[str | None] = []
        self.requests: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = owner.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                owner.requests.append(self.path)
                rng = self.headers.get("Range")
                owner.ranges.append(rng)
                start = int(rng.split("=")[1].rstrip("-")) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if owner.cut_after is not None:
                    payload = payload[: owner.cut_after]
                    owner.cut_after = None
                if not owner.gate.is_set():
                    self.wfile.write(payload[: owner.CHUNK])
                    self.wfile.flush()
                    owner.gate.wait(owner.HOLD)
                    payload = payload[owner.CHUNK :]
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


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


def digits_image_folder(root: Path, *, seed: int = 0, n_val: int = 360) -> tuple[Path, Path]:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as two ImageFolders of
    32x32 RGB PNGs (each pixel repeated 4x4, 0..16 mapped to 0..255): ``root/train`` (1,437)
    and ``root/val`` (360), split by a permutation drawn from ``seed``. Real images with a
    known answer: training tests use them to show a net learns, not only that it runs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # N x 8 x 8
    order = np.random.default_rng(seed).permutation(len(pixels))
    folders = {"val": order[:n_val], "train": order[n_val:]}
    for split, indices in folders.items():
        for i in indices:
            label = int(digits.target[i])
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            big = np.repeat(np.repeat(pixels[i], 4, axis=0), 4, axis=1)  # 32 x 32
            Image.fromarray(np.stack([big] * 3, axis=-1)).save(folder / f"{i:04d}.png")
    return root / "train", root / "val"
