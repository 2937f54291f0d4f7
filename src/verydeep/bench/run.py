"""``verydeep bench``: how fast the fast path is, against the baselines, in one process.

Every engine runs the same Caffe-space inputs on the same machine in the same process, and the
measurements are *interleaved* (repeat 1 of every engine, then repeat 2, ...), so a machine
shared with other work slows them all alike and the ratios stay meaningful; the summary is the
median. Engines:

* ``verydeep`` at each requested precision: ``model.optimized(precision)`` (:mod:`verydeep.runtime`);
* ``torchvision``: torchvision's own eager ``VGG`` in fp32 with the same weights (the baseline
  every ratio refers to; configs it lacks, A-LRN and C, use verydeep's exact eager path);
* ``exact``: verydeep's eager fp32 module, the reference for fidelity and for the dense view
  (torchvision has no dense view), timed only where it is the baseline or asked for;
* ``onnxruntime`` and ``opencv`` (CPU only, when installed): the exact net exported to ONNX
  and run by ``onnxruntime.InferenceSession`` / ``cv2.dnn``.

Scenarios: the classic net at 224x224 for each batch size, and the dense (fully convolutional)
net on one image whose shorter side is Q (4:3, e.g. 384x512). Speed does not depend on weight
values, so by default the net has random (He-initialised) weights; ``weights=`` measures a
real model, and then the fidelity numbers are about real logits.

Reported per scenario and engine: images/s and latency (median and best of the repeats), the
achieved GFLOP/s, the ratio to the baseline, peak memory (process RSS on CPU, sampled in an
untimed call, and the growth during that call; ``torch.cuda.max_memory_allocated`` on GPU),
and fidelity against the exact path (in true fp32: TF32 off on GPU): max |a - b| / max |b| of the
outputs and top-1 agreement. The eager baselines run with PyTorch's defaults (on GPU that means
TF32 convolutions, hence their ~1e-3 "error").
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verydeep import configs
from verydeep.errors import VerydeepError
from verydeep.runtime.executor import PRECISIONS, cpu_model, optimize

#: Engines that can serve as extra baselines.
BASELINES = ("torchvision", "exact", "onnxruntime", "opencv")
DEFAULT_BASELINES = ("torchvision", "onnxruntime", "opencv")


# -- the machine ----------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, library versions, load: what a number needs next to it."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    for mod, key in (("onnxruntime", "onnxruntime"), ("cv2", "opencv")):
        try:
            info[key] = __import__(mod).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (others' work, since we are asleep); Linux only."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]

    try:
        a = snap()
        time.sleep(seconds)
        b = snap()
    except OSError:
        return None
    total = b[0] - a[0]
    return round(1.0 - (b[1] - a[1]) / total, 3) if total > 0 else None


class OthersLoad:
    """Share of all CPUs' time used by *other* processes between ``start()`` and ``stop()``:
    busy jiffies in /proc/stat minus this process's own CPU time (all its threads)."""

    def start(self) -> OthersLoad:
        self.a = self._snap()
        return self

    def stop(self) -> float | None:
        b = self._snap()
        if self.a is None or b is None:
            return None
        total, idle, own = (y - x for x, y in zip(self.a, b))
        if total <= 0:
            return None
        return round(max(0.0, (total - idle - own) / total), 3)

    @staticmethod
    def _snap() -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        r = resource.getrusage(resource.RUSAGE_SELF)
        return sum(v[:8]) / tick, (v[3] + v[4]) / tick, r.ru_utime + r.ru_stime


# -- memory ---------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class _RssSampler:
    """Peak resident memory during a block, sampled every millisecond by a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _RssSampler:
        self.before = _rss_bytes() or 0
        self.peak = self.before
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


def emit_report(report: dict[str, Any], out: str | os.PathLike | None = None) -> None:
    """Print a benchmark report as JSON, and also write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


# -- the nets -------------------------------------------------------------------------------
def random_model(arch: str = "D", width: float = 1.0, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A VGG with He-initialised weights (activations keep their scale through the depth, as in
    a trained net) and small random biases."""
    from verydeep.models.vgg import VGG

    torch.manual_seed(seed)
    model = VGG(arch, num_classes=num_classes, width=width)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight"):
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            else:
                p.normal_(0.0, 0.01)
    return model.eval()


_TORCHVISION_CFG = {"A": "A", "B": "B", "D": "D", "E": "E"}


def torchvision_twin(model: nn.Module) -> nn.Module | None:
    """torchvision's ``VGG`` class for the same config and width, holding ``model``'s weights
    (None for configs torchvision lacks: A-LRN, C). At 224x224 it computes the same function."""
    try:
        from torchvision.models.vgg import VGG as TVGG
        from torchvision.models.vgg import cfgs, make_layers
    except ImportError:
        return None
    letter = _TORCHVISION_CFG.get(model.config)
    if letter is None:
        return None
    cfg = [c if c == "M" else configs.scaled(c, model.width) for c in cfgs[letter]]
    with torch.device("meta"):
        net = TVGG(make_layers(cfg), num_classes=model.num_classes, init_weights=False)
        c5 = cfg[-2]
        fc = configs.scaled(configs.FC_WIDTH, model.width)
        net.classifier = nn.Sequential(
            nn.Linear(c5 * 49, fc),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(fc, fc),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(fc, model.num_classes),
        )
    ours = [getattr(model, s.name) for s in model.specs if s.kind in ("conv", "fc")]
    theirs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    state = {}
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, a, b in zip(names, ours, theirs):
        state[f"{name}.weight"] = a.weight.detach()
        state[f"{name}.bias"] = a.bias.detach()
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def dense_flops(config: str, height: int, width_px: int, width: float = 1.0, num_classes: int = 1000) -> int:
    """FLOPs (2 x multiply-adds) of the dense net on one height x width image: the convolutions
    at that size, then fc6 as a 7x7 and fc7/fc8 as 1x1 convolutions at every window position."""
    total, h, w = 0, height, width_px
    for spec in configs.layer_specs(config, width, num_classes):
        if spec.kind == "conv":
            total += h * w * spec.out_channels * spec.in_channels * spec.kernel * spec.kernel
        elif spec.kind == "pool":
            h, w = -(-(h - 2) // 2) + 1, -(-(w - 2) // 2) + 1
    positions = max(0, h - configs.POOL5_SIZE + 1) * max(0, w - configs.POOL5_SIZE + 1)
    for spec in configs.layer_specs(config, width, num_classes):
        if spec.kind == "fc":
            total += positions * spec.in_channels * spec.out_channels
    return 2 * total


# -- engines --------------------------------------------------------------------------------
@dataclass
class Engine:
    name: str  # "verydeep" | "verydeep+compile" | "torchvision" | "exact" | "onnxruntime" | "opencv"
    precision: str
    classic: Callable[[torch.Tensor], Any] | None
    dense: Callable[[torch.Tensor], Any] | None = None
    build_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"


def _torch_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return run


def _onnx_file(model: nn.Module, folder: Path, dense: bool) -> Path:
    from verydeep.models.vgg import DenseVGG

    path = folder / ("dense.onnx" if dense else "classic.onnx")
    net = DenseVGG(model) if dense else model
    x = torch.zeros(1, 3, configs.CROP, configs.CROP)
    axes = {0: "batch", 2: "height", 3: "width"} if dense else {0: "batch"}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.cpu().eval(),
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["data"],
            output_names=["out"],
            dynamic_axes={"data": axes, "out": axes},
        )
    return path


def onnxruntime_engine(model: nn.Module, folder: Path, threads: int, dense: bool) -> Engine:
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session(path: Path) -> Callable[[torch.Tensor], Any]:
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(np.asarray(s.run(None, {"data": x.numpy()})[0]))

    classic = session(_onnx_file(model, folder, False))
    dense_fn = session(_onnx_file(model, folder, True)) if dense else None
    return Engine("onnxruntime", "fp32", classic, dense_fn, time.perf_counter() - t0, {"version": ort.__version__})


def opencv_engine(model: nn.Module, folder: Path, threads: int, dense: bool) -> Engine:
    import cv2

    t0 = time.perf_counter()
    cv2.setNumThreads(threads)

    def net_for(path: Path) -> Callable[[torch.Tensor], Any]:
        net = cv2.dnn.readNetFromONNX(str(path))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def run(x: torch.Tensor) -> torch.Tensor:
            net.setInput(x.numpy())
            return torch.from_numpy(net.forward().copy())

        return run

    classic = net_for(
        folder / "classic.onnx" if (folder / "classic.onnx").exists() else _onnx_file(model, folder, False)
    )
    dense_fn = None
    if dense:
        dense_fn = net_for(
            folder / "dense.onnx" if (folder / "dense.onnx").exists() else _onnx_file(model, folder, True)
        )
    return Engine("opencv", "fp32", classic, dense_fn, time.perf_counter() - t0, {"version": cv2.__version__})


# -- measuring ------------------------------------------------------------------------------
@dataclass
class Scenario:
    view: str  # "classic" | "dense"
    batch: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.view} {self.batch}x{self.height}x{self.width}"


class _ExactFp32:
    """TF32 off on CUDA (PyTorch's default lets cuDNN convolve fp32 inputs in TF32)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_tensor(y: Any) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else torch.as_tensor(y)


def _rel_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    found, expected = found.detach().double().cpu(), expected.detach().double().cpu()
    scale = float(expected.abs().max())
    return float((found - expected).abs().max()) / (scale if scale > 0 else 1.0)


def _top1(y: torch.Tensor) -> torch.Tensor:
    y = y.detach().float().cpu()
    return (y.mean(dim=(2, 3)) if y.dim() == 4 else y).argmax(dim=1)


def _probe(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    from verydeep.formats.export import probe

    return probe(batch, height, width, seed=seed)


def run_bench(
    *,
    weights: str | None = None,
    prototxt: str | None = None,
    arch: str = "D",
    width: float = 1.0,
    num_classes: int = 1000,
    batches: Sequence[int] = (1, 16),
    precisions: Sequence[str] = ("fp32", "bf16"),
    dense: int | None = 384,
    repeats: int = 5,
    warmup: int = 1,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    device: str | None = None,
    threads: int | None = None,
    compile: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure; return the report (see the module docstring). ``dense=None`` or 0 skips the
    dense scenario; ``baselines`` beyond torchvision are skipped (with the reason) when their
    package is missing or the device is not a CPU."""
    say = progress or (lambda msg: None)
    for p in precisions:
        if p not in PRECISIONS:
            raise VerydeepError(f"unknown precision {p!r}; expected one of {', '.join(PRECISIONS)}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise VerydeepError(f"unknown baseline {unknown[0]!r}; expected some of {', '.join(BASELINES)}")
    if repeats < 1 or warmup < 0 or any(b < 1 for b in batches):
        raise VerydeepError("--repeats and --batch must be at least 1, --warmup at least 0")
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VerydeepError(f"--device {dev}: CUDA is not available here")
    busy_before = cpu_busy() if dev.type == "cpu" else None

    # the model
    if weights:
        from verydeep.hub.weights import load

        model = load(weights, prototxt)
        if not hasattr(model, "specs"):
            raise VerydeepError(f"{weights}: bench needs a Table 1 VGG, found a {type(model).__name__}")
    else:
        model = random_model(arch, width, num_classes, seed)
    model = model.to(dev).eval()
    config, w, nc = model.config, model.width, model.num_classes

    scenarios = [Scenario("classic", b, configs.CROP, configs.CROP) for b in batches]
    if dense:
        if dense < configs.CROP:
            raise VerydeepError(f"--dense {dense}: the dense net needs Q >= {configs.CROP}")
        scenarios.append(Scenario("dense", 1, int(dense), int(round(dense * 4 / 3))))

    # the engines
    engines: list[Engine] = []
    skipped: dict[str, str] = {}
    plans: dict[str, Any] = {}
    for p in precisions:
        say(f"building verydeep {p}")
        t0 = time.perf_counter()
        fast = optimize(model, p, device=dev)
        engines.append(Engine("verydeep", p, fast, fast.dense(), time.perf_counter() - t0))
        plans[p] = fast.plan.to_dict()
        engines[-1].info["dtype"] = fast.plan.dtype
        if compile:
            t0 = time.perf_counter()
            comp = optimize(model, p, device=dev, compile=True)
            engines.append(Engine("verydeep+compile", p, comp, comp.dense(), time.perf_counter() - t0))
            plans[f"{p}+compile"] = comp.plan.to_dict()
            engines[-1].info["dtype"] = comp.plan.dtype
    exact = Engine("exact", "fp32", _torch_call(model), _torch_call(model.dense()))
    twin = torchvision_twin(model) if "torchvision" in baselines else None
    if "torchvision" in baselines and twin is None:
        skipped["torchvision"] = (
            f"torchvision has no config {config} (or is not installed): the baseline is verydeep's exact eager path"
        )
    if twin is not None:
        engines.append(Engine("torchvision", "fp32", _torch_call(twin.to(dev))))
        baseline_classic = "torchvision"
    else:
        baseline_classic = "exact"
    exact_classic = "exact" in baselines or baseline_classic == "exact"  # timed in the classic scenarios
    nthreads = torch.get_num_threads()
    tmp = tempfile.TemporaryDirectory(prefix="verydeep-bench-")
    for name in ("onnxruntime", "opencv"):
        if name not in baselines:
            continue
        if dev.type != "cpu":
            skipped[name] = f"CPU engine; the bench runs on {dev}"
            continue
        try:
            say(f"exporting for {name}")
            make = onnxruntime_engine if name == "onnxruntime" else opencv_engine
            engines.append(make(model, Path(tmp.name), nthreads, bool(dense)))
        except ImportError:
            skipped[name] = "not installed"
        except Exception as e:  # an export or runtime failure must not lose the other numbers
            skipped[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if exact_classic or dense:
        engines.append(exact)

    # the inputs and the reference outputs
    inputs = {s.key: _probe(s.batch, s.height, s.width, seed=i).to(dev) for i, s in enumerate(scenarios)}
    say("reference outputs (exact path)")
    with _ExactFp32(dev):  # on GPU PyTorch convolves fp32 in TF32 by default; the reference must not
        refs = {
            s.key: _as_tensor((exact.classic if s.view == "classic" else exact.dense)(inputs[s.key])).float().cpu()  # type: ignore[misc]
            for s in scenarios
        }

    def fn_of(e: Engine, s: Scenario) -> Callable[[torch.Tensor], Any] | None:
        if s.view == "classic":
            return e.classic if (e.name != "exact" or exact_classic) else None
        return e.dense

    # warm-up (first calls: CUDA graph capture, cuDNN autotune, compilation, lazy init)
    first_call: dict[tuple[str, str], float] = {}
    for s in scenarios:
        for e in engines:
            fn = fn_of(e, s)
            if fn is None:
                continue
            say(f"warm-up {e.label} {s.key}")
            for i in range(max(1, warmup)):
                t0 = time.perf_counter()
                fn(inputs[s.key])
                _sync(dev)
                if i == 0:
                    first_call[(e.label, s.key)] = time.perf_counter() - t0

    # interleaved timing
    others = OthersLoad().start()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(repeats):
        say(f"repeat {r + 1}/{repeats}")
        for s in scenarios:
            for e in engines:
                fn = fn_of(e, s)
                if fn is None:
                    continue
                x = inputs[s.key]
                _sync(dev)
                t0 = time.perf_counter()
                fn(x)
                _sync(dev)
                times.setdefault((e.label, s.key), []).append(time.perf_counter() - t0)

    others_during = others.stop()

    # memory and fidelity (untimed calls)
    results: list[dict[str, Any]] = []
    for s in scenarios:
        flops = (
            2 * configs.multiply_adds(config, configs.CROP, w, nc)
            if s.view == "classic"
            else dense_flops(config, s.height, s.width, w, nc)
        )
        base = baseline_classic if s.view == "classic" else "exact"
        base_label = f"{base} fp32"
        base_ips = None
        if (base_label, s.key) in times:
            base_ips = s.batch / statistics.median(times[(base_label, s.key)])
        for e in engines:
            key = (e.label, s.key)
            if key not in times:
                continue
            fn = fn_of(e, s)
            x = inputs[s.key]
            mem: dict[str, Any] = {}
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
                y = fn(x)  # type: ignore[misc]
                _sync(dev)
                peak = torch.cuda.max_memory_allocated(dev)
                mem = {"peak_gpu_mb": round(peak / 2**20, 1), "call_mb": round((peak - before) / 2**20, 1)}
            else:
                with _RssSampler() as m:
                    y = fn(x)  # type: ignore[misc]
                mem = {"peak_rss_mb": round(m.peak / 2**20, 1), "call_mb": round((m.peak - m.before) / 2**20, 1)}
            y = _as_tensor(y).float().cpu()
            ts = times[key]
            med = statistics.median(ts)
            ips = s.batch / med
            ref = refs[s.key]
            row: dict[str, Any] = {
                "view": s.view,
                "batch": s.batch,
                "height": s.height,
                "width": s.width,
                "engine": e.name,
                "precision": e.precision,
                "compute_dtype": e.info.get("dtype", "fp32"),
                "images_per_s": round(ips, 3),
                "latency_ms": round(med * 1000, 3),
                "latency_ms_min": round(min(ts) * 1000, 3),
                "gflops": round(flops * ips / 1e9, 1),
                "baseline": base_label,
                "speedup": round(ips / base_ips, 3) if base_ips else None,
                "rel_error": _rel_error(y, ref) if y.shape == ref.shape else None,
                "top1_agreement": float((_top1(y) == _top1(ref)).float().mean()) if y.shape == ref.shape else None,
                "first_call_s": round(first_call.get(key, 0.0), 3),
                "build_s": round(e.build_s, 3),
                "repeats": len(ts),
                **mem,
            }
            results.append(row)
    tmp.cleanup()
    report = {
        "machine": machine_info(dev),
        "model": {
            "config": config,
            "width": w,
            "num_classes": nc,
            "weights": weights or "random (He init)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_image_224": round(2 * configs.multiply_adds(config, configs.CROP, w, nc) / 1e9, 4),
        },
        "settings": {
            "batches": list(batches),
            "precisions": list(precisions),
            "dense": [s.height, s.width] if (s := next((s for s in scenarios if s.view == "dense"), None)) else None,
            "repeats": repeats,
            "warmup": warmup,
            "threads": nthreads,
            "baselines": list(baselines),
            "statistic": "median of interleaved repeats",
        },
        "plans": plans,
        "results": results,
        "skipped": skipped,
        "load": {
            "cpu_busy_before": busy_before,
            "cpu_busy_after": cpu_busy() if dev.type == "cpu" else None,
            "others_during_timing": others_during,
        },
    }
    return report


# -- the table ------------------------------------------------------------------------------
def format_report(report: dict[str, Any]) -> str:
    """The readable summary ``verydeep bench`` prints."""
    m, mod = report["machine"], report["model"]
    lines = [
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads)"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}"
        + "".join(f", {k} {m[k]}" for k in ("torchvision", "onnxruntime", "opencv") if k in m),
        f"VGG config {mod['config']} (width {mod['width']:g}, {mod['parameters']:,} parameters, "
        f"{mod['gflop_per_image_224']:g} GFLOP at 224), weights: {mod['weights']}",
    ]
    load = report.get("load", {})
    if load.get("cpu_busy_before") is not None:
        during = load.get("others_during_timing")
        lines.append(
            f"other processes: {100 * load['cpu_busy_before']:.0f}% of the CPUs busy before, "
            + (f"{100 * during:.0f}% during the timed calls, " if during is not None else "")
            + f"{100 * (load.get('cpu_busy_after') or 0):.0f}% after; loadavg {m.get('loadavg')}"
        )
    for p, plan in report["plans"].items():
        lines.append(
            f"plan {p}: {plan['dtype']} on {plan['device']}, conv {plan['conv']}, fc {plan['linear']}, "
            f"pool {plan['pool']}, cache blocking {plan['cache_bytes'] >> 20} MiB"
            + (", CUDA graphs" if plan["cuda_graphs"] else "")
            + (", torch.compile" if plan["compile"] else "")
        )
        for note in plan["notes"]:
            lines.append(f"  note: {note}")
    rows = []
    mem_key = "peak_gpu_mb" if any("peak_gpu_mb" in r for r in report["results"]) else "peak_rss_mb"
    for r in report["results"]:
        rows.append(
            [
                f"{r['view']} {r['batch']}x{r['height']}x{r['width']}",
                f"{r['engine']} {r['precision']}"
                + (f" ({r['compute_dtype']})" if r["compute_dtype"] != r["precision"] else ""),
                f"{r['images_per_s']:.2f}",
                f"{r['latency_ms']:.1f}",
                f"{r['gflops']:.0f}",
                f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                f"{r.get(mem_key, 0):.0f} (+{r.get('call_mb', 0):.0f})",
                f"{r['rel_error']:.1e}" if r["rel_error"] is not None else "-",
                f"{100 * r['top1_agreement']:.0f}%" if r["top1_agreement"] is not None else "-",
            ]
        )
    header = [
        "input",
        "engine",
        "img/s",
        "latency ms",
        "GFLOP/s",
        "vs baseline",
        "peak MiB (+call)",
        "rel err",
        "top-1 agree",
    ]
    lines.append("")
    lines.append(_table(rows, header))
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    lines.append(
        f"baseline: torchvision's eager fp32 VGG for the classic net (else verydeep's exact eager path), "
        f"verydeep's exact eager dense view for dense; {report['settings']['statistic']} "
        f"({report['settings']['repeats']} each)"
    )
    return "\n".join(lines)


def _table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
