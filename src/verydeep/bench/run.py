"""``verydeep bench``'s measurement: the options, the scenarios, and the stages of one run.

:func:`run_bench` goes through its stages in order, each a function here: check the options
(:class:`BenchOptions`), load or build the net, line up the engines (:class:`Lineup`), compute
the reference outputs on the exact path, warm every engine up, time them interleaved, then
measure memory and fidelity in untimed calls and assemble the report.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from verydeep import configs
from verydeep.bench.engines import FOREIGN_ENGINES, Call, Engine, torch_call
from verydeep.bench.machine import OthersLoad, RssSampler, cpu_busy, machine_info
from verydeep.bench.nets import dense_flops, random_model, torchvision_twin
from verydeep.bench.report import conv_kernels
from verydeep.core.defaults import check_inference_precision, default_device
from verydeep.core.numerics import relative_error
from verydeep.errors import VerydeepError
from verydeep.formats.export import probe
from verydeep.hub.loader import load
from verydeep.models.vgg import VGG
from verydeep.runtime import optimize, tf32_off
from verydeep.runtime.int8 import CALIBRATION_IMAGES

#: Engines that can serve as extra baselines.
BASELINES = ("torchvision", "exact", "onnxruntime", "opencv")
DEFAULT_BASELINES = ("torchvision", "onnxruntime", "opencv")


# -- the options -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    """What to measure. ``dense=None`` or 0 skips the dense scenario; ``baselines`` beyond
    torchvision are skipped (with the reason) when their package is missing or the device is not
    a CPU; ``weights`` measures a real model instead of a random ``arch``/``width`` one."""

    weights: str | None = None
    prototxt: str | None = None
    arch: str = "D"
    width: float = 1.0
    num_classes: int = 1000
    batches: Sequence[int] = (1, 16)
    precisions: Sequence[str] = ("fp32", "bf16")
    dense: int | None = 384
    repeats: int = 5
    warmup: int = 1
    baselines: Sequence[str] = DEFAULT_BASELINES
    device: str | None = None
    threads: int | None = None
    compile: bool = False
    direct: bool = False  # also fp32 with oneDNN's direct 3x3 kernels (no Winograd)
    seed: int = 0
    calibration: str | None = None  # int8: a folder of images; None: generated images
    calibration_images: int = CALIBRATION_IMAGES

    def __post_init__(self) -> None:
        for name in ("batches", "precisions", "baselines"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for p in self.precisions:
            check_inference_precision(p)
        if self.calibration_images < 1:
            raise VerydeepError(f"--calibration-images {self.calibration_images}: must be at least 1")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise VerydeepError(f"unknown baseline {unknown[0]!r}; expected some of {', '.join(BASELINES)}")
        if self.repeats < 1 or self.warmup < 0 or any(b < 1 for b in self.batches):
            raise VerydeepError("--repeats and --batch must be at least 1, --warmup at least 0")
        if self.dense and self.dense < configs.CROP:
            raise VerydeepError(f"--dense {self.dense}: the dense net needs Q >= {configs.CROP}")


@dataclass(frozen=True)
class Scenario:
    """One input: the classic net on a batch at 224x224, or the dense net on one image."""

    view: str  # "classic" | "dense"
    batch: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.view} {self.batch}x{self.height}x{self.width}"


def scenarios_for(options: BenchOptions) -> list[Scenario]:
    """The classic net for each batch size, then the dense net on one Q x 4Q/3 image."""
    out = [Scenario("classic", b, configs.CROP, configs.CROP) for b in options.batches]
    if options.dense:
        out.append(Scenario("dense", 1, int(options.dense), int(round(options.dense * 4 / 3))))
    return out


# -- the net and the engines -----------------------------------------------------------------------
def bench_device(options: BenchOptions) -> torch.device:
    """The device to measure on (CUDA where there is one); sets torch's threads if asked."""
    if options.threads:
        torch.set_num_threads(int(options.threads))
    dev = torch.device(default_device(options.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VerydeepError(f"--device {dev}: CUDA is not available here")
    return dev


def bench_model(options: BenchOptions, device: torch.device) -> VGG:
    """The net to measure, in eval mode on ``device``: ``weights`` loaded, else a random one."""
    if options.weights:
        model = load(options.weights, options.prototxt)
        if not isinstance(model, VGG):
            raise VerydeepError(f"{options.weights}: bench needs a Table 1 VGG, found a {type(model).__name__}")
    else:
        model = random_model(options.arch, options.width, options.num_classes, options.seed)
    return model.to(device).eval()


@dataclass
class Lineup:
    """The engines of one run, what was skipped and why, and which engine each view is
    compared with: torchvision (else the exact path) for the classic view, the exact path for
    the dense one."""

    engines: list[Engine]
    exact: dict[str, Call]  # view -> the exact path's call, the reference
    baseline_classic: str  # "torchvision" | "exact"
    exact_classic: bool  # whether the exact path is timed in the classic scenarios
    plans: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def call(self, engine: Engine, s: Scenario) -> Call | None:
        """What ``engine`` runs for ``s``; None where it is not timed there."""
        if s.view == "classic":
            return engine.classic if (engine.name != "exact" or self.exact_classic) else None
        return engine.dense

    def pairs(self, scenarios: Sequence[Scenario]) -> Iterator[tuple[Scenario, Engine, Call]]:
        """Every timed (scenario, engine, call), scenario by scenario, in engine order."""
        for s in scenarios:
            for e in self.engines:
                fn = self.call(e, s)
                if fn is not None:
                    yield s, e, fn


def calibration_batch(options: BenchOptions, device: torch.device) -> torch.Tensor | None:
    """The int8 calibration images (Caffe space, 224 center crops), None without int8: those in
    ``options.calibration``, else generated ones (seeds apart from the timed inputs')."""
    if "int8" not in options.precisions:
        return None
    n = min(
        options.calibration_images, CALIBRATION_IMAGES
    )  # int8 uses at most these; its onnxruntime peer gets the same
    if options.calibration:
        from verydeep.data.calibration import calibration_images

        return calibration_images(options.calibration, n).to(device)
    return probe(n, seed=1000).to(device)


def plan_summary(plan: dict[str, Any]) -> str:
    """A plan in a few words: instruction set, dtype, and the kernel of each layer class."""
    isa = f"{plan['isa']} " if plan.get("isa") else ""
    return f"{isa}{plan['dtype']}: conv {conv_kernels(plan)}, fc {plan['linear']}"


def fast_engines(
    model: VGG,
    options: BenchOptions,
    device: torch.device,
    calibration: torch.Tensor | None,
    say: Callable[[str], None],
) -> tuple[list[Engine], dict[str, Any]]:
    """``model.optimized(precision)`` for each precision (and its compiled variant, and fp32's
    direct-kernel variant, if asked), and their plans by precision (``bf16+compile``, ``fp32+direct``)."""
    engines, plans = [], {}
    variants: list[tuple[str, str, dict[str, Any]]] = [("verydeep", "", {})]
    if options.compile:
        variants.append(("verydeep+compile", "+compile", {"compile": True}))
    if options.direct:
        variants.append(("verydeep+direct", "+direct", {"winograd": False}))
    for p in options.precisions:
        calibrating = ""
        if p == "int8" and calibration is not None:
            calibrating = f" (calibrating on {calibration.shape[0]} images)"
        say(f"building verydeep {p}{calibrating}")
        for name, suffix, kwargs in variants:
            if ("compile" in kwargs and p == "int8") or ("winograd" in kwargs and p != "fp32"):
                continue  # int8 runs oneDNN's kernels directly; Winograd is fp32's only
            t0 = time.perf_counter()
            fast = optimize(model, p, device=device, calibration=calibration, **kwargs)
            plan = fast.plan.to_dict()
            engines.append(Engine(name, p, fast, fast.dense(), time.perf_counter() - t0, {"dtype": fast.plan.dtype},
                                  plan_summary(plan)))  # fmt: skip
            plans[p + suffix] = plan
    return engines, plans


def line_up(
    model: VGG, options: BenchOptions, device: torch.device, folder: Path, say: Callable[[str], None]
) -> Lineup:
    """Build every engine: the fast path per precision, the baselines, the exact path."""
    calibration = calibration_batch(options, device)
    engines, plans = fast_engines(model, options, device, calibration, say)
    skipped: dict[str, str] = {}
    exact_views = {"classic": torch_call(model), "dense": torch_call(model.dense())}
    exact = Engine("exact", "fp32", exact_views["classic"], exact_views["dense"], plan="ATen eager NCHW")
    twin = torchvision_twin(model) if "torchvision" in options.baselines else None
    if "torchvision" in options.baselines and twin is None:
        skipped["torchvision"] = (
            f"torchvision has no config {model.config} (or is not installed): "
            "the baseline is verydeep's exact eager path"
        )
    if twin is not None:
        engines.append(Engine("torchvision", "fp32", torch_call(twin.to(device)), plan="ATen eager"))
    baseline_classic = "torchvision" if twin is not None else "exact"
    threads = torch.get_num_threads()
    for name, build in FOREIGN_ENGINES.items():
        if name not in options.baselines:
            continue
        if device.type != "cpu":
            skipped[name] = f"CPU engine; the bench runs on {device}"
            continue
        say(f"exporting for {name}")
        try:
            engines += build(model, folder, threads, bool(options.dense), calibration)
        except ImportError:
            skipped[name] = "not installed"
        except Exception as exc:  # an export or runtime failure must not lose the other numbers
            message = str(exc).splitlines()[0] if str(exc) else ""
            skipped[name] = f"failed: {type(exc).__name__}: {message}"
    exact_classic = "exact" in options.baselines or baseline_classic == "exact"
    if exact_classic or options.dense:
        engines.append(exact)
    return Lineup(engines, exact_views, baseline_classic, exact_classic, plans, skipped)


# -- the measurements ------------------------------------------------------------------------------
def _as_tensor(y: Any) -> torch.Tensor:
    return y if isinstance(y, torch.Tensor) else torch.as_tensor(y)


def _scores(y: torch.Tensor) -> torch.Tensor:
    """Per-image class scores (a dense map averaged, as the dense protocol does)."""
    y = y.detach().float().cpu()
    return y.mean(dim=(2, 3)) if y.dim() == 4 else y


def _top1(y: torch.Tensor) -> torch.Tensor:
    return _scores(y).argmax(dim=1)


def top5_overlap(found: torch.Tensor, expected: torch.Tensor) -> float:
    """The mean share of the exact top-5 classes that are also in ``found``'s top 5."""
    k = min(5, _scores(expected).shape[1])
    a, b = _scores(found).topk(k, dim=1).indices, _scores(expected).topk(k, dim=1).indices
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).float().mean())


@dataclass(frozen=True)
class Trial:
    """What the measuring stages share: the net, its engines, the scenarios and their inputs."""

    model: VGG
    lineup: Lineup
    scenarios: Sequence[Scenario]
    inputs: dict[str, torch.Tensor]  # scenario key -> the input batch on the device
    device: torch.device
    say: Callable[[str], None]

    def pairs(self) -> Iterator[tuple[Scenario, Engine, Call]]:
        return self.lineup.pairs(self.scenarios)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def scenario_inputs(scenarios: Sequence[Scenario], device: torch.device) -> dict[str, torch.Tensor]:
    """A deterministic batch of smooth random Caffe-space images per scenario, on ``device``."""
    return {s.key: probe(s.batch, s.height, s.width, seed=i).to(device) for i, s in enumerate(scenarios)}


def references(trial: Trial) -> dict[str, torch.Tensor]:
    """The exact path's outputs on each scenario's input in true fp32 (on GPU, PyTorch convolves
    fp32 in TF32 by default; the reference must not)."""
    with tf32_off(trial.device.type == "cuda"):
        return {
            s.key: _as_tensor(trial.lineup.exact[s.view](trial.inputs[s.key])).float().cpu() for s in trial.scenarios
        }


def warm_up(trial: Trial, warmup: int) -> dict[tuple[str, str], float]:
    """Untimed first calls (CUDA graph capture, cuDNN autotune, compilation, lazy init); the
    seconds of each engine's first call per scenario."""
    first_call: dict[tuple[str, str], float] = {}
    for s, e, fn in trial.pairs():
        trial.say(f"warm-up {e.label} {s.key}")
        for i in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn(trial.inputs[s.key])
            trial.sync()
            if i == 0:
                first_call[(e.label, s.key)] = time.perf_counter() - t0
    return first_call


def time_interleaved(trial: Trial, repeats: int) -> tuple[dict[tuple[str, str], list[float]], float | None]:
    """Repeat 1 of every engine and scenario, then repeat 2, ...: seconds per call, and the CPU
    share other processes used meanwhile."""
    others = OthersLoad().start()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(repeats):
        trial.say(f"repeat {r + 1}/{repeats}")
        for s, e, fn in trial.pairs():
            x = trial.inputs[s.key]
            trial.sync()
            t0 = time.perf_counter()
            fn(x)
            trial.sync()
            times.setdefault((e.label, s.key), []).append(time.perf_counter() - t0)
    return times, others.stop()


def memory_call(fn: Call, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """One untimed call's output and memory: peak GPU memory on CUDA, else peak process RSS
    (sampled); both with the growth during the call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        y = fn(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return _as_tensor(y), {"peak_gpu_mb": round(peak / 2**20, 1), "call_mb": round((peak - before) / 2**20, 1)}
    with RssSampler() as m:
        y = fn(x)
    return _as_tensor(y), {"peak_rss_mb": round(m.peak / 2**20, 1), "call_mb": round((m.peak - m.before) / 2**20, 1)}


def classic_flops(model: VGG) -> int:
    """FLOPs (2 x multiply-adds) of the classic net on one 224x224 image."""
    return 2 * configs.multiply_adds(model.config, configs.CROP, model.width, model.num_classes)


def scenario_flops(model: VGG, s: Scenario) -> int:
    """FLOPs of one image of ``s``."""
    if s.view == "classic":
        return classic_flops(model)
    return dense_flops(model.config, s.height, s.width, model.width, model.num_classes)


def result_rows(
    trial: Trial,
    refs: dict[str, torch.Tensor],
    times: dict[tuple[str, str], list[float]],
    first_call: dict[tuple[str, str], float],
) -> list[dict[str, Any]]:
    """One row per timed (scenario, engine): speed, the ratio to the baseline, memory, fidelity."""
    rows: list[dict[str, Any]] = []
    for s, e, fn in trial.pairs():
        key = (e.label, s.key)
        base_label = f"{trial.lineup.baseline_classic if s.view == 'classic' else 'exact'} fp32"
        base_times = times.get((base_label, s.key))
        base_ips = s.batch / statistics.median(base_times) if base_times else None
        y, mem = memory_call(fn, trial.inputs[s.key], trial.device)
        y = y.float().cpu()
        ts = times[key]
        med = statistics.median(ts)
        ips = s.batch / med
        ref = refs[s.key]
        same_shape = y.shape == ref.shape
        rows.append(
            {
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
                "gflops": round(scenario_flops(trial.model, s) * ips / 1e9, 1),
                "baseline": base_label,
                "speedup": round(ips / base_ips, 3) if base_ips else None,
                "rel_error": relative_error(y, ref) if same_shape else None,
                "top1_agreement": float((_top1(y) == _top1(ref)).float().mean()) if same_shape else None,
                "top5_overlap": top5_overlap(y, ref) if same_shape else None,
                "fidelity": e.fidelity,
                "plan": e.plan,
                "first_call_s": round(first_call.get(key, 0.0), 3),
                "build_s": round(e.build_s, 3),
                "repeats": len(ts),
                **mem,
            }
        )
    return rows


def rank_against_peers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each verydeep row's speed over the fastest other runtime (:data:`FOREIGN_ENGINES`: onnxruntime,
    OpenCV) of the same fidelity class in the same scenario: ``vs_best_peer`` and which peer that was."""
    for r in rows:
        r["vs_best_peer"], r["best_peer"] = None, None
        if not r["engine"].startswith("verydeep"):
            continue
        same = [
            p for p in rows
            if p["engine"] in FOREIGN_ENGINES and p["fidelity"] == r["fidelity"]
            and (p["view"], p["batch"], p["height"], p["width"]) == (r["view"], r["batch"], r["height"], r["width"])
        ]  # fmt: skip
        if same:
            best = max(same, key=lambda p: p["images_per_s"])
            r["vs_best_peer"] = round(r["images_per_s"] / best["images_per_s"], 3)
            r["best_peer"] = f"{best['engine']} {best['precision']}"
    return rows


# -- the run ---------------------------------------------------------------------------------------
def run_bench(
    options: BenchOptions | None = None,
    /,
    *,
    progress: Callable[[str], None] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Measure; return the report (see :mod:`verydeep.bench`). ``fields`` are
    :class:`BenchOptions` fields, overriding ``options`` (or the defaults)."""
    opts = replace(options, **fields) if options is not None else BenchOptions(**fields)
    say = progress or (lambda msg: None)
    dev = bench_device(opts)
    busy_before = cpu_busy() if dev.type == "cpu" else None
    model = bench_model(opts, dev)
    scenarios = scenarios_for(opts)
    with tempfile.TemporaryDirectory(prefix="verydeep-bench-") as tmp:
        lineup = line_up(model, opts, dev, Path(tmp), say)
        trial = Trial(model, lineup, scenarios, scenario_inputs(scenarios, dev), dev, say)
        say("reference outputs (exact path)")
        refs = references(trial)
        first_call = warm_up(trial, opts.warmup)
        times, others_during = time_interleaved(trial, opts.repeats)
        results = rank_against_peers(result_rows(trial, refs, times, first_call))
    dense = next((s for s in scenarios if s.view == "dense"), None)
    return {
        "machine": machine_info(dev),
        "model": {
            "config": model.config,
            "width": model.width,
            "num_classes": model.num_classes,
            "weights": opts.weights or "random (He init)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_image_224": round(classic_flops(model) / 1e9, 4),
        },
        "settings": {
            "batches": list(opts.batches),
            "precisions": list(opts.precisions),
            "dense": [dense.height, dense.width] if dense else None,
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "threads": torch.get_num_threads(),
            "baselines": list(opts.baselines),
            "calibration": (opts.calibration or "generated images") if "int8" in opts.precisions else None,
            "calibration_images": min(opts.calibration_images, CALIBRATION_IMAGES)
            if "int8" in opts.precisions
            else None,
            "statistic": "median of interleaved repeats",
        },
        "plans": lineup.plans,
        "results": results,
        "skipped": lineup.skipped,
        "load": {
            "cpu_busy_before": busy_before,
            "cpu_busy_after": cpu_busy() if dev.type == "cpu" else None,
            "others_during_timing": others_during,
        },
    }
