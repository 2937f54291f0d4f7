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

The modules, one per part of a measurement:

- :mod:`.machine`: what the report says about the machine (:func:`machine_info`), the load other
  processes put on it (:func:`cpu_busy`, :class:`OthersLoad`) and peak memory (:class:`RssSampler`).
- :mod:`.nets`: the measured net (:func:`random_model`), torchvision's twin of it
  (:func:`torchvision_twin`, built by :mod:`verydeep.formats.torchvision`), :func:`dense_flops`.
- :mod:`.engines`: :class:`Engine` and the onnxruntime / OpenCV engines.
- :mod:`.run`: :class:`BenchOptions`, the scenarios and :func:`run_bench`, one function per stage of a run.
- :mod:`.report`: :func:`format_report` (the printed table) and :func:`emit_report` (JSON).
- :mod:`.harness`: CUDA-event timing and :class:`PartialReport`, for the GPU scripts in
  ``benchmarks/``.

The engines, the machine and the report change for different reasons (another runtime, another
OS, another column), so each has its own module and ``run`` only orders the stages.
"""

from verydeep.bench.engines import Engine
from verydeep.bench.harness import PartialReport, cuda_timed, event_ms
from verydeep.bench.machine import OthersLoad, RssSampler, cpu_busy, machine_info
from verydeep.bench.nets import dense_flops, random_model, torchvision_twin
from verydeep.bench.report import emit_report, format_report
from verydeep.bench.run import BASELINES, DEFAULT_BASELINES, BenchOptions, Scenario, run_bench

__all__ = [
    "BASELINES",
    "DEFAULT_BASELINES",
    "BenchOptions",
    "Engine",
    "OthersLoad",
    "PartialReport",
    "RssSampler",
    "Scenario",
    "cpu_busy",
    "cuda_timed",
    "dense_flops",
    "emit_report",
    "event_ms",
    "format_report",
    "machine_info",
    "random_model",
    "run_bench",
    "torchvision_twin",
]
