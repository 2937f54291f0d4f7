"""The executor: :class:`FastVGG` runs a model's steps (:mod:`.steps`) the way its :class:`Plan` says.

It owns what is not one layer's business: moving the input into the plan's dtype and layout,
cache blocking the leading stages, the dense view (fc6 as a GEMM over pool5's 7x7 patches, so
the fc6 weights are never re-laid out or copied), feature taps, the compiled variant
(:mod:`.compiled`) and CUDA graphs (:mod:`.cuda`). :func:`optimize` is what
``VGG.optimized()`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from verydeep import configs
from verydeep.core.defaults import dtype_of
from verydeep.errors import VerydeepError
from verydeep.runtime.compiled import compile_views
from verydeep.runtime.cpu import quantize_activation
from verydeep.runtime.cuda import CudaGraphs, cuda_flags
from verydeep.runtime.int8 import Calibration, calibrate
from verydeep.runtime.plan import MAX_GRAPHS, Plan, make_plan
from verydeep.runtime.source import as_source
from verydeep.runtime.steps import (
    ConvStep,
    FcStep,
    Kernels,
    LrnStep,
    PoolStep,
    ReluStep,
    Step,
    build_steps,
    dequantize,
    quantized_outputs,
)

#: A step as a function of the previous step's output, named by its layer.
NamedStep = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


class FastVGG(nn.Module):
    """A VGG's classic view executed by a :class:`Plan`; ``.dense()`` gives the dense view.

    Input: N x 3 x 224 x 224 Caffe-space float (any device; moved to the plan's). Output:
    float32 N x num_classes fc8 scores on the plan's device, like ``VGG.forward``.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        cache_dir: str | os.PathLike[str] | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        super().__init__()
        source = as_source(model)
        self.plan = plan
        self.config = source.config
        self.num_classes = source.num_classes
        self.class_names = getattr(model, "class_names", None)
        self.layer_names: list[str] = list(source.layer_names)
        c, h, w = source.fc6_input
        self.fc6_input: tuple[int, int, int] = (c, h, w)
        self._device = torch.device(plan.device)
        self._int8 = plan.dtype == "int8"
        self._dtype = torch.float32 if self._int8 else dtype_of(plan.dtype)
        self._kernels = Kernels(plan)
        self.calibration = calibration
        self._input_codes = calibration.input_quantization(plan.int8_levels) if self._int8 and calibration else None
        self._steps = build_steps(model, plan, calibration)
        self._fc_steps = [s for s in self._steps if isinstance(s, FcStep)]
        self._conv_steps = [s for s in self._steps if not isinstance(s, FcStep)]
        pools = [i for i, s in enumerate(self._conv_steps) if isinstance(s, PoolStep)]
        stages = plan.blocked_stages
        self._block_end = pools[stages - 1] + 1 if stages and len(pools) >= stages else 0
        first = next(s for s in self._steps if isinstance(s, ConvStep))
        self._first_channels = int(first.weight.shape[0])
        self._classic: Callable[[torch.Tensor], torch.Tensor] = self._classic_impl
        self._dense: Callable[[torch.Tensor], torch.Tensor] = self._dense_impl
        if plan.compile:
            views = compile_views(
                model, self._device, self._dtype, channels_last=plan.channels_last, cache_dir=cache_dir
            )
            self._plain = views.net  # keeps the parameters alive for the compiled graphs
            self._compiled_modules = views.compiled
            self._classic, self._dense = views.classic, views.dense
        if plan.cuda_graphs:
            self._classic = CudaGraphs(self._classic, MAX_GRAPHS)
            self._dense = CudaGraphs(self._dense, MAX_GRAPHS)

    def extra_repr(self) -> str:
        p = self.plan
        return (
            f"config={self.config!r}, device={p.device}, dtype={p.dtype}, conv={p.conv}, linear={p.linear}, "
            f"cache_bytes={p.cache_bytes}, cuda_graphs={p.cuda_graphs}, compile={p.compile}"
        )

    @property
    def graphs_captured(self) -> int:
        """Input shapes the classic view holds a captured CUDA graph for (0 without graphs)."""
        return len(self._classic.graphs) if isinstance(self._classic, CudaGraphs) else 0

    # -- the input and the flags -----------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the plan computes on it: on its device, in its dtype and memory layout, with
        conv1_1's input channels zero-padded where the plan pads them."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise VerydeepError(f"expected N x 3 x H x W Caffe-space input, found {tuple(x.shape)}")
        x = x.to(self._device, self._dtype, non_blocking=True)
        pad = self.plan.pad_channels
        if pad > x.shape[1]:  # zero channels meet conv1_1's zero weights: the same result
            n, c, h, w = x.shape
            padded = torch.empty(
                (n, pad, h, w), dtype=x.dtype, device=x.device, memory_format=self._kernels.memory_format
            )
            padded[:, c:].zero_()
            padded[:, :c].copy_(x)
            return padded
        x = x.contiguous(memory_format=self._kernels.memory_format)
        if self._input_codes is not None:  # int8: the uint8 codes conv1_1 takes
            return quantize_activation(x, *self._input_codes, self.plan.int8_levels)
        return x

    def context(self) -> AbstractContextManager[None]:
        """The backend flags the plan runs under (cuDNN autotuning; TF32 off in fp32 on GPU)."""
        if self._device.type == "cuda":
            return cuda_flags(exact=self._dtype == torch.float32)
        return nullcontext()

    def stages(self) -> tuple[list[NamedStep], list[NamedStep]]:
        """The plan's steps as (layer name, function) pairs, for timing one layer at a time: those
        up to pool5 (the first takes :meth:`prepare`'s output), then the fc layers (the first
        takes pool5 flattened). Composed, they compute the classic view without cache blocking."""
        k = self._kernels
        return [(s.name, k.step(s)) for s in self._conv_steps], [(s.name, k.step(s)) for s in self._fc_steps]

    # -- execution -------------------------------------------------------------------------------
    def _run(
        self,
        x: torch.Tensor,
        start: int,
        stop: int,
        taps: dict[str, torch.Tensor] | None = None,
        want: set[str] | None = None,
    ) -> torch.Tensor:
        """conv/pool/LRN steps ``[start, stop)``; with ``want``, records those layers in ``taps``."""
        out = taps if taps is not None else {}
        k = self._kernels
        relu_pending = False  # a ReLU moved after the pool that follows it
        for i in range(start, stop):
            s = self._conv_steps[i]
            if isinstance(s, ConvStep):
                if want and s.name in want and s.relu:  # the pre-activation is wanted: unfused
                    x = k.conv(s, x, relu=False)
                    out[s.name] = x
                    x = F.relu(x)
                elif self.plan.relu_after_pool and s.pool_next and not (want and want & set(s.after)) and i + 1 < stop:
                    x = k.conv(s, x, relu=False)
                    relu_pending = True
                else:
                    x = k.conv(s, x)
            elif isinstance(s, ReluStep):
                x = F.relu(x) if want else F.relu_(x)  # in place would overwrite a tapped map
            elif isinstance(s, PoolStep):
                x = k.pool(x)
                if relu_pending:
                    x, relu_pending = F.relu_(x), False
            elif isinstance(s, LrnStep):
                x = k.lrn(s, x)
            if want:
                for name in _names_of(s):
                    if name in want:
                        out[name] = dequantize(s, x)
        return x

    def _sub_batch(self, x: torch.Tensor) -> int:
        """Images per cache-blocked pass over the leading stages (>= N: no blocking)."""
        budget = self.plan.cache_bytes
        if not budget or not self._block_end:
            return x.shape[0]
        per_image = self._first_channels * x.shape[-2] * x.shape[-1] * x.element_size()
        return max(1, budget // per_image)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """conv1_1 ... pool5, the leading stages cache-blocked."""
        n, k = x.shape[0], self._block_end
        sub = self._sub_batch(x)
        if sub < n:
            x = torch.cat([self._run(x[i : i + sub], 0, k) for i in range(0, n, sub)])
            return self._run(x, k, len(self._conv_steps))
        return self._run(x, 0, len(self._conv_steps))

    def _check_pool5(self, x: torch.Tensor) -> None:
        c, h, w = self.fc6_input
        if tuple(x.shape[1:]) != (c, h, w):
            raise VerydeepError(
                f"fc6 expects pool5 of shape {c}x{h}x{w} (a {configs.CROP}x{configs.CROP} input), "
                f"found {'x'.join(map(str, x.shape[1:]))}; use .dense() for other sizes"
            )

    def _classic_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x)
        self._check_pool5(x)
        x = torch.flatten(x.contiguous(), 1)  # row-major C,H,W like Caffe's InnerProduct
        for s in self._fc_steps:
            x = self._kernels.linear(s, x)
        return x.float()

    def _dense_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x)
        n, c, h, w = x.shape
        ch, kh, kw = self.fc6_input
        if h < kh or w < kw:
            raise VerydeepError(
                f"dense view needs pool5 of at least {kh}x{kw} (an input of at least "
                f"{configs.CROP}x{configs.CROP}), found {h}x{w}"
            )
        oh, ow = h - kh + 1, w - kw + 1
        # fc6 as a 7x7 convolution = a GEMM over pool5's 7x7 patches, in fc6's (C, H, W) order.
        if x.dtype == torch.uint8:  # int8 codes: unfold has no integer kernel; a strided view does
            y = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
        else:
            y = F.unfold(x.contiguous(), (kh, kw)).transpose(1, 2)  # N x positions x C*7*7
            y = y.reshape(n * oh * ow, -1)
        for s in self._fc_steps:
            y = self._kernels.linear(s, y)
        return y.view(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc8 scores, float32, N x num_classes (no softmax), like ``VGG.forward``."""
        with torch.inference_mode(), self.context():
            return self._classic(self.prepare(x))

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.context():
            return self._dense(self.prepare(x))

    def dense(self) -> FastDenseVGG:
        """The fully convolutional view, executed by the same plan (shares the weights)."""
        return FastDenseVGG(self)

    # -- feature taps ----------------------------------------------------------------------------
    def features(self, x: torch.Tensor, taps: Iterable[str] = ("fc7",)) -> dict[str, torch.Tensor]:
        """Like ``VGG.features``: outputs of the named layers as float32 (contiguous NCHW for
        maps), computed by the plan; stops after the last requested tap. Not compiled or
        graph-captured (the set of taps varies)."""
        taps = list(taps)
        unknown = [t for t in taps if t not in self.layer_names]
        if unknown:
            raise VerydeepError(
                f"unknown layer {unknown[0]!r} for config {self.config}; layers: {', '.join(self.layer_names)}"
            )
        want = set(taps)
        out: dict[str, torch.Tensor] = {}
        fc_names = {n for s in self._fc_steps for n in _names_of(s, pre_activation=True)} | {"prob"}
        conv_want = want - fc_names
        if want & fc_names:
            stop = len(self._conv_steps)
        else:  # stop after the step that produces the last wanted map
            stop = 1 + max(i for i, s in enumerate(self._conv_steps) if conv_want & {s.name, *s.after})
        with torch.inference_mode(), self.context():
            x = self._map_taps(self.prepare(x), stop, conv_want, out)
            if want & fc_names:
                self._fc_taps(x, want, max(taps, key=self.layer_names.index), out)
            return {t: out[t].float().contiguous() for t in taps}

    def _map_taps(self, x: torch.Tensor, stop: int, want: set[str], out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Steps up to ``stop`` (the leading ones cache-blocked), recording ``want`` in ``out``."""
        n, k = x.shape[0], min(self._block_end, stop)
        sub = self._sub_batch(x)
        start = 0
        if sub < n and k:
            parts: list[dict[str, torch.Tensor]] = []
            chunks = []
            for i in range(0, n, sub):
                part: dict[str, torch.Tensor] = {}
                chunks.append(self._run(x[i : i + sub], 0, k, part, want))
                parts.append(part)
            for name in parts[0]:
                out[name] = torch.cat([p[name] for p in parts])
            x, start = torch.cat(chunks), k
        return self._run(x, start, stop, out, want)

    def _fc_taps(self, x: torch.Tensor, want: set[str], last: str, out: dict[str, torch.Tensor]) -> None:
        """fc6 ... fc8 (and the soft-max) from pool5 up to ``last``, recording ``want`` in ``out``."""
        self._check_pool5(x)
        x = torch.flatten(x.contiguous(), 1)
        for s in self._fc_steps:
            if s.name in want and s.relu:  # the pre-activation is wanted: unfused
                x = self._kernels.linear(s, x, relu=False)
                out[s.name] = x
                x = F.relu(x)
            else:
                x = self._kernels.linear(s, x)
            for name in _names_of(s):
                if name in want:
                    out[name] = dequantize(s, x)
            if last in (s.name, *s.after):
                break
        if "prob" in want:
            out["prob"] = torch.softmax(dequantize(self._fc_steps[-1], x).float(), dim=1)


def _names_of(s: Step, *, pre_activation: bool = False) -> list[str]:
    """The layers whose output is ``s``'s output; a fused ReLU hides the step's own pre-activation
    name unless ``pre_activation``."""
    return ([s.name] if pre_activation or not s.relu else []) + s.after


class FastDenseVGG(nn.Module):
    """``FastVGG.dense()``: N x 3 x H x W -> float32 N x C x h x w score map, like ``DenseVGG``."""

    def __init__(self, fast: FastVGG) -> None:
        super().__init__()
        self.fast = fast
        self.plan = fast.plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast.dense_forward(x)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def optimize(
    model: nn.Module,
    precision: str = "fp32",
    *,
    device: str | torch.device | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    fallback: bool = True,
    cache_bytes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    calibration: torch.Tensor | Calibration | None = None,
    winograd: bool | None = None,
) -> FastVGG:
    """The fast inference module for ``model`` (see :mod:`verydeep.runtime`).

    ``device`` defaults to the model's. ``precision`` is the lowest precision you accept:
    fp32 stays within 1e-5 of the exact path; bf16 within 2e-2 (measured: a few 1e-3 on VGG-16);
    fp16 within 1e-2. ``compile=True`` uses ``torch.compile`` with freezing instead of the
    pre-packed plan (kernels cached under :func:`~verydeep.runtime.compiled.compile_cache_dir`);
    ``cuda_graphs`` defaults to on for CUDA devices; ``cache_bytes`` overrides the CPU
    cache-blocking budget. In fp32 on CPU the 3x3 layers run Winograd F(4x4)/F(2x2)
    (:mod:`verydeep.runtime.winograd`), within the same 1e-5; ``winograd=False`` keeps oneDNN's
    direct kernel.

    ``precision="int8"`` is static quantization (:mod:`verydeep.runtime.int8`): ``calibration``
    is N x 3 x 224 x 224 Caffe-space images like the ones to be classified (the first
    :data:`~verydeep.runtime.int8.CALIBRATION_IMAGES` are used), or a :class:`Calibration`
    from an earlier call (``fast.calibration``). Where int8 is not native (no x86 oneDNN int8
    kernels) the plan computes in fp32 and says so.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    plan = make_plan(
        precision, dev, compile=compile, cuda_graphs=cuda_graphs, fallback=fallback, cache_bytes=cache_bytes,
        winograd=winograd,
    )  # fmt: skip
    if plan.dtype != "int8":
        return FastVGG(model, plan, cache_dir=cache_dir)
    if calibration is None:
        raise VerydeepError(
            "precision='int8' needs calibration images: optimized('int8', calibration=images) with N x 3 x 224 x 224 "
            "Caffe-space images like the ones to classify (the CLI: --calibration DIR)"
        )
    if isinstance(calibration, torch.Tensor):
        exact = FastVGG(model, make_plan("fp32", dev))  # the ranges of the exact net
        layers = quantized_outputs(as_source(model).specs)
        calibration = calibrate(exact.features, calibration.to(dev), layers=layers)
    return FastVGG(model, plan, cache_dir=cache_dir, calibration=calibration)
