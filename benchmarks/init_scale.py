"""What each initialisation does to the scale of the signal, and to SGD's steps, through VGG A..E.

Feeds Caffe-space images (BGR 0..255 minus the mean pixel: values of +-130) through freshly
initialised nets and prints, per conv/fc layer, the RMS of its output before the ReLU (eval
mode) and the relative step ||lr x grad|| / ||W|| that one SGD step at lr 1.25e-3 (the default
for batch 32) would take (cross-entropy against fixed random labels, dropout off). Schemes:
balanced (verydeep's default), glorot, normal with std 0.01 (Caffe's VGG fillers) and 0.1 (the
paper's "variance 1e-2"), and "he, conv1_1 / RMS" (He's 2/fan_in with conv1_1 divided by the
input RMS and fc8 10x smaller: unit activations, the alternative the default replaced), at
full width and at width 1/8. The images are real:
the photos in ``--photos`` (default: the shared example photos, if present) and scikit-learn's
handwritten digits upscaled like the training tests do, rescaled to 256 and centre-cropped to 224.

    python benchmarks/init_scale.py                          # a few minutes on 2 CPU cores
    python benchmarks/init_scale.py --json benchmarks/results/init_scale.json

A well-conditioned start has logits (fc8) that are neither huge (the loss explodes) nor tiny
(nothing learns), at every depth and width, and steps of a similar relative size in every layer.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from verydeep.core.tables import format_table
from verydeep.data.preprocess import preprocess
from verydeep.models.vgg import VGG
from verydeep.train.initialization import INPUT_RMS, activation_scales, initialize, param_layers

CONFIGS = ("A", "B", "C", "D", "E")
WIDTHS = (1.0, 0.125)
LR = 0.00125
#: (label, scheme, init_std)
SCHEMES = (("balanced", "balanced", 0.0), ("glorot", "glorot", 0.0), ("normal 0.01", "normal", 0.01),
           ("normal 0.1", "normal", 0.1), ("he, conv1_1 / RMS", "he-first-scaled", 0.0))  # fmt: skip
SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images"


def digits(n: int) -> list[np.ndarray]:
    """``n`` of scikit-learn's digits as 32x32 RGB uint8 arrays (each pixel repeated 4x4)."""
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images[:n] * (255.0 / 16.0)).astype(np.uint8)
    return [np.stack([np.kron(im, np.ones((4, 4), np.uint8))] * 3, axis=-1) for im in images]


def inputs(photos: Path | None, n_digits: int) -> torch.Tensor:
    files = sorted(photos.glob("*.jpg")) if photos is not None and photos.is_dir() else []
    items: list = [str(f) for f in files] + digits(n_digits)
    return preprocess(items, size=256, crop=224)


def he_first_scaled(model: VGG) -> None:
    """N(0, 2/fan_in) for hidden layers, conv1_1 divided by INPUT_RMS (1/fan_in before that), fc8 10x smaller."""
    names = param_layers(model)
    with torch.no_grad():
        for i, name in enumerate(names):
            layer = model.get_submodule(name)
            fan_in = layer.weight[0].numel()
            var = 1 / (fan_in * INPUT_RMS**2) if i == 0 else 2 / fan_in * (0.01 if i == len(names) - 1 else 1.0)
            layer.weight.normal_(0.0, math.sqrt(var))
            layer.bias.zero_()


def relative_steps(model: VGG, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """||LR x grad W|| / ||W|| per layer for the mean cross-entropy over ``x`` (dropout off)."""
    model.zero_grad()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    out = {}
    for name in param_layers(model):
        w = model.get_submodule(name).weight
        out[name] = float(LR * w.grad.double().norm() / w.double().norm())
    return out


def measure(x: torch.Tensor) -> list[dict]:
    rows = []
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 10, len(x)))
    for config in CONFIGS:
        for width in WIDTHS:
            for label, scheme, std in SCHEMES:
                torch.manual_seed(0)
                model = VGG(config, num_classes=10, width=width)
                if scheme == "he-first-scaled":
                    he_first_scaled(model)
                else:
                    initialize(model, scheme, std=std)
                scales = activation_scales(model, x)
                steps = relative_steps(model, x, labels)
                rows.append({"config": config, "width": width, "init": label, "rms": scales, "step": steps})
                print(f"{config} width {width:g} {label}: fc8 RMS {scales['fc8']:.3g}", file=sys.stderr)
    return rows


def tables(rows: list[dict]) -> str:
    out = []
    # 1. Per layer, config E (the deepest: every layer name of A..D's positions), both widths.
    for width in WIDTHS:
        sel = [r for r in rows if r["config"] == "E" and r["width"] == width]
        layers = list(sel[0]["rms"])
        body = [[name] + [f"{r['rms'][name]:.3g}" for r in sel] for name in layers]
        out.append(f"config E, width {width:g}: RMS of each layer's output (before ReLU)")
        out.append(format_table(body, ["layer"] + [r["init"] for r in sel]))
    # 2. The logits (fc8) of every config.
    body = []
    for config in CONFIGS:
        for width in WIDTHS:
            sel = [r for r in rows if r["config"] == config and r["width"] == width]
            body.append([config, f"{width:g}"] + [f"{r['rms']['fc8']:.3g}" for r in sel])
    out.append("fc8 (logits) RMS, every config")
    out.append(format_table(body, ["config", "width"] + [label for label, _, _ in SCHEMES]))
    # 3. SGD's relative step: smallest, median and largest over the layers, and conv1_1's.
    body = []
    for r in rows:
        v = sorted(r["step"].values())
        body.append([r["config"], f"{r['width']:g}", r["init"], f"{v[0]:.2g}", f"{v[len(v) // 2]:.2g}",
                     f"{v[-1]:.2g}", f"{r['step']['conv1_1']:.2g}"])  # fmt: skip
    out.append(f"relative SGD step ||{LR:g} x grad|| / ||W|| over the layers")
    out.append(format_table(body, ["config", "width", "init", "min", "median", "max", "conv1_1"]))
    return "\n\n".join(out)


def _finite(value):
    """NaN and infinities (normal 0.1 overflows at full width) as None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=Path, default=SHARED_PHOTOS, help="folder of .jpg photos (default: shared/)")
    p.add_argument("--digits", type=int, default=5, help="how many digits images to add (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the measurements here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x = inputs(a.photos, a.digits)
    input_rms = float(x.double().pow(2).mean().sqrt())
    print(f"{len(x)} images, input RMS {input_rms:.1f}, max |x| {float(x.abs().max()):.1f}", file=sys.stderr)
    rows = measure(x)
    print(tables(rows))
    if a.json:
        report = {"images": len(x), "input_rms": input_rms, "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "rows": rows}  # fmt: skip
        a.json.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    assert all(math.isfinite(v) for r in rows for v in r["rms"].values()), "an RMS overflowed"
    return 0


if __name__ == "__main__":
    sys.exit(main())
