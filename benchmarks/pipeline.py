"""Input pipeline throughput: can decoding and resizing keep the net fed?

    python benchmarks/pipeline.py [--images 96] [--workers 1 2] [--out results/pipeline.json]

Writes ``--images`` JPEGs of ImageNet's typical size (500x375, quality 90, Pillow-made smooth
photos with edges and texture, ~100 KB each) and measures, in images/s:

* per core, in the main process: Pillow decode alone; decode + the single-crop preprocessing of
  ``classify``/``extract`` (``center_crop_caffe``: shorter side 256, centre 224, Caffe space);
  decode + ``evaluate``'s rescale to Q=384 (uint8, antialiased);
* the actual loaders: ``DataLoader(ImageDataset(...), num_workers=W, collate_fn=collate_skipping)``
  as ``extract`` and ``evaluate`` build them, batch 32, for each ``--workers``, with the batches
  consumed by a no-op (so this is the pipeline's own ceiling).

Compare with what the net consumes (RESULTS.md): on a 2-core machine every worker core is a core
the net does not get, so the number that matters is images/s per core against the net's
images/s per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from verydeep.bench import emit_report


def make_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        p = folder / f"img{i:04d}.jpg"
        if not p.exists():
            w, h = (500, 375) if i % 4 else (375, 500)
            coarse = rng.integers(0, 256, size=(h // 25, w // 25, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            noise = rng.normal(0, 12, size=(h, w, 3))
            arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).filter(ImageFilter.DETAIL).save(p, quality=90)
        paths.append(str(p))
    return paths


def rate(fn, items, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", default="/tmp/verydeep-pipeline")
    ap.add_argument("--out")
    args = ap.parse_args()
    from torch.utils.data import DataLoader

    from verydeep.data.images import ImageDataset, collate_skipping
    from verydeep.data.preprocess import center_crop_caffe, open_image, to_uint8_chw
    from verydeep.evaluate import RescaleToScales

    torch.set_num_threads(1)  # one core: per-core rates
    paths = make_images(Path(args.dir), args.images)
    sizes = [os.path.getsize(p) for p in paths]
    report: dict = {
        "images": len(paths),
        "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
        "size": "500x375",
        "cpu_count": os.cpu_count(),
    }
    per_core = {
        "decode_only": rate(lambda p: open_image(p), paths),
        "decode_to_tensor": rate(lambda p: to_uint8_chw(p), paths),
        "decode_center_crop_caffe_224": rate(lambda p: center_crop_caffe(p), paths),
        "decode_rescale_q384_uint8": rate(lambda p: RescaleToScales((384,))(to_uint8_chw(p)), paths),
        "decode_rescale_q256_384_512_uint8": rate(lambda p: RescaleToScales((256, 384, 512))(to_uint8_chw(p)), paths),
    }
    report["per_core_images_per_s"] = {k: round(v, 1) for k, v in per_core.items()}
    loaders = {}
    for w in args.workers:
        for name, transform in (
            ("extract_center_crop_224", partial(center_crop_caffe, size=256, crop=224)),
            ("evaluate_rescale_q384", RescaleToScales((384,))),
        ):
            ds = ImageDataset(paths, transform)
            dl = DataLoader(
                ds, batch_size=32, num_workers=w, collate_fn=collate_skipping, prefetch_factor=4 if w else None
            )
            it = iter(dl)
            next(it)  # workers started and warm
            t0 = time.perf_counter()
            count = 32
            for idx, _batch, _failed in it:
                count += len(idx)
            dt = time.perf_counter() - t0
            n = count - 32
            loaders[f"{name}_workers{w}"] = {
                "images_per_s": round(n / dt, 1),
                "per_worker": round(n / dt / max(w, 1), 1),
            }
    report["dataloader"] = loaders
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
