"""bf16, int8 (and fp32) fast paths against the exact fp32 path on real photos.

    python benchmarks/fidelity.py [--weights vgg16] [--images DIR] [--precision fp32 ...] [--out results/fidelity.json]

Photos: ``--images DIR`` (any folder of JPEG/PNG), else scikit-image's bundled sample images
(``skimage.data``'s folder, if scikit-image is installed; RESULTS.md says how they were obtained
without installing it). Each photo gets ``classify``'s preprocessing (shorter side 256, centre
224) for the classic net, and a rescale to Q=384 for the dense net. Reported per precision:
relative logit error max |a - b| / max |b| (per image: median and worst), top-1 agreement, top-5
set agreement (same five classes) and whether fp32's top-1 is in the fast path's top-5; for the
dense net, the same on the spatially averaged score map. ``--weights`` measures a real model;
without it the net is VGG-16 with random He-initialised weights (state which in the results:
rounding errors are similar, agreement rates on a random net are not those of a trained one).
int8 is calibrated on ``--calibration DIR``, else on the photos themselves (as ``classify`` does
without ``--calibration``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from verydeep.bench import emit_report, random_model
from verydeep.core.numerics import relative_error
from verydeep.runtime.int8 import CALIBRATION_IMAGES


def photo_paths(folder: str | None) -> tuple[list[Path], str]:
    if folder is None:
        try:
            import skimage

            folder = str(Path(skimage.__file__).parent / "data")
        except ImportError:
            raise SystemExit("no --images DIR and scikit-image is not installed") from None
    exts = {".jpg", ".jpeg", ".png"}
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in exts)
    return paths, folder


def stats(found: torch.Tensor, ref: torch.Tensor) -> dict:
    found, ref = found.double(), ref.double()
    errs = [relative_error(a, b) for a, b in zip(found, ref)]
    t1 = (found.argmax(1) == ref.argmax(1)).float().mean().item()
    f5, r5 = found.topk(5, 1).indices, ref.topk(5, 1).indices
    same5 = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(f5, r5)) / len(errs)
    in5 = sum(int(b[0]) in set(a.tolist()) for a, b in zip(f5, r5)) / len(errs)
    return {
        "rel_error_median": statistics.median(errs),
        "rel_error_max": max(errs),
        "top1_agreement": t1,
        "top5_same_set": same5,
        "fp32_top1_in_top5": in5,
        "images": len(errs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights")
    ap.add_argument("--images")
    ap.add_argument("--dense", type=int, default=384)
    ap.add_argument("--calibration", help="int8: calibration images (default: the photos themselves)")
    ap.add_argument("--precision", nargs="+", default=["bf16", "int8", "fp32"], choices=["bf16", "int8", "fp32"])
    ap.add_argument("--out")
    args = ap.parse_args()
    from verydeep.data.preprocess import center_crop_caffe, rescale, to_caffe, to_uint8_chw
    from verydeep.errors import ImageError

    paths, folder = photo_paths(args.images)
    crops, bigs, used = [], [], []
    for p in paths:
        try:
            crops.append(center_crop_caffe(p))
            bigs.append(to_caffe(rescale(to_uint8_chw(p), args.dense)))
            used.append(p.name)
        except ImageError:
            continue
    if args.weights:
        from verydeep.hub.loader import load

        model, weights = load(args.weights), args.weights
    else:
        model, weights = random_model("D"), "random (He init)"
    x = torch.stack(crops)
    with torch.inference_mode():
        ref = torch.cat([model(x[i : i + 8]) for i in range(0, len(x), 8)])
        ref_dense = [model.dense()(b[None]).mean(dim=(2, 3)) for b in bigs]
    report = {"weights": weights, "photos": used, "source": folder, "dense_q": args.dense, "precisions": {}}
    from verydeep.data.calibration import calibration_images

    calibration = calibration_images(args.calibration, CALIBRATION_IMAGES) if args.calibration else x
    report["calibration"] = args.calibration or "the photos themselves"
    for precision in args.precision:
        fast = model.optimized(precision, calibration=calibration if precision == "int8" else None)
        y = torch.cat([fast(x[i : i + 8]) for i in range(0, len(x), 8)])
        yd = torch.cat([fast.dense()(b[None]).mean(dim=(2, 3)) for b in bigs])
        report["precisions"][precision] = {
            "plan_dtype": fast.plan.dtype,
            "winograd": list(fast.plan.winograd),
            "classic": stats(y, ref),
            "dense": stats(yd, torch.cat(ref_dense)),
        }
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
