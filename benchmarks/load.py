"""Loading speed and memory: caffemodel -> model, cached safetensors -> model, each in a fresh process.

    python benchmarks/load.py [--dir /tmp/verydeep-load] [--repeats 3] [--out results/load.json]

Writes a full-size VGG-16 caffemodel (V1 format like the published file, random weights, the
same 553 MB layout) with the bundled deploy prototxt, and its safetensors conversion. Then, each
in a new Python process (so nothing is shared or cached in memory; the files are in the OS page
cache, i.e. a warm disk), measures:

* ``import torch`` time (reported, not counted), then ``import verydeep`` (which does not
  import torchvision: that import costs ~0.95 s and would dominate "after import torch");
* ``verydeep.formats.caffe.load.load_caffemodel(path)``: seconds, and peak RSS (VmHWM) beyond the process's
  RSS after ``import torch`` minus the weights' own 528 MiB ("beyond the weights");
* OpenCV's ``cv2.dnn.readNetFromCaffe(prototxt, caffemodel)`` the same way (the reference figure);
* ``verydeep.load(path.safetensors)``: seconds after ``import torch`` until a ready VGG, and its RSS;
* ``model.optimized("bf16")`` build time on top (weight packing), for completeness.

Medians of ``--repeats`` processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from verydeep.bench import emit_report, random_model
from verydeep.formats.caffe import VGG16_DEPLOY, read_prototxt, write_caffemodel
from verydeep.formats.safetensors import save_safetensors

#: What every child process measures with: its resident memory now, and its peak.
MEMORY = r"""
import json, os, resource, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def peak():  # VmHWM: this process image's peak (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
"""

PROLOGUE = (
    MEMORY
    + r"""
t0 = time.perf_counter()
import torch
t_import = time.perf_counter() - t0
base = rss()
"""
)

#: A child that imports verydeep (``imports``), loads ``model`` with ``load``, runs ``after``, and
#: prints its times and memory as JSON.
LOADER = (
    PROLOGUE
    + r"""
t0 = time.perf_counter()
{imports}
t_vd = time.perf_counter() - t0
t0 = time.perf_counter()
model = {load}({model!r})
dt = time.perf_counter() - t0
out = {{"import_torch_s": t_import, "import_verydeep_s": t_vd, "load_s": dt,
       "ready_after_import_torch_s": t_vd + dt, "rss_after_import_mb": base / 2**20}}
{after}
out.update({{"peak_rss_mb": peak() / 2**20, "rss_after_mb": rss() / 2**20}})
print(json.dumps(out))
"""
)
#: The caffemodel loader (imports verydeep; torchvision only on the first image transform).
CAFFE = {
    "imports": "from verydeep.formats.caffe.load import load_caffemodel",
    "load": "load_caffemodel",
    "after": 'out["params"] = sum(p.numel() for p in model.parameters())',
}
#: ``verydeep.load`` of safetensors (``import verydeep`` does not import torchvision), then the
#: bf16 fast path's build time on top.
SAFETENSORS = {
    "imports": "import verydeep",
    "load": "verydeep.load",
    "after": "\n".join(
        [
            "t1 = time.perf_counter()",
            'fast = model.optimized("bf16")',
            'out["optimized_bf16_s"] = time.perf_counter() - t1',
        ]
    ),
}

OPENCV = (
    MEMORY
    + r"""
import cv2
base = rss()
t0 = time.perf_counter()
net = cv2.dnn.readNetFromCaffe({prototxt!r}, {model!r})
dt = time.perf_counter() - t0
print(json.dumps({{"load_s": dt, "rss_after_import_mb": base / 2**20, "peak_rss_mb": peak() / 2**20,
                  "rss_after_mb": rss() / 2**20, "version": cv2.__version__}}))
"""
)


def child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], weights_mb: float) -> dict:
    keys = runs[0].keys()
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys if isinstance(runs[0][k], (int, float))}
    med.update({k: runs[0][k] for k in keys if not isinstance(runs[0][k], (int, float))})
    med["peak_beyond_weights_mb"] = round(med["peak_rss_mb"] - med["rss_after_import_mb"] - weights_mb, 1)
    med["runs"] = len(runs)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/verydeep-load")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    prototxt = Path(str(VGG16_DEPLOY))
    caffemodel = folder / "VGG_ILSVRC_16_layers.caffemodel"
    st = folder / "vgg16.safetensors"
    if not caffemodel.exists() or not st.exists():
        model = random_model("D")
        blobs = {}
        for s in model.specs:
            if s.kind in ("conv", "fc"):
                layer = getattr(model, s.name)
                blobs[s.name] = [layer.weight.detach().numpy(), layer.bias.detach().numpy()]
        write_caffemodel(caffemodel, blobs, read_prototxt(prototxt), version="V1")
        save_safetensors(model, st)
        del model, blobs
    weights_mb = 138_357_544 * 4 / 2**20
    report = {
        "files": {
            "caffemodel_bytes": caffemodel.stat().st_size,
            "safetensors_bytes": st.stat().st_size,
            "weights_mb": round(weights_mb, 1),
            "page_cache": "warm (files just written or read)",
        },
    }
    report["caffemodel_verydeep"] = summarize(
        [child(LOADER.format(model=str(caffemodel), **CAFFE)) for _ in range(args.repeats)], weights_mb
    )
    try:
        report["caffemodel_opencv"] = summarize(
            [child(OPENCV.format(prototxt=str(prototxt), model=str(caffemodel))) for _ in range(args.repeats)],
            weights_mb,
        )
    except Exception as e:  # OpenCV missing or failing: the verydeep numbers still stand
        report["caffemodel_opencv"] = {"error": str(e)[-300:]}
    report["safetensors_verydeep"] = summarize(
        [child(LOADER.format(model=str(st), **SAFETENSORS)) for _ in range(args.repeats)], weights_mb
    )
    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
