"""The ``torch.compile`` variant (``compile=True``) and the compiled max pool.

Instead of the plan's own kernels, a plain channels-last module in the compute dtype goes
through ``torch.compile`` with inductor's freezing (the weights become constants it folds and
pre-packs). Kernels are cached under :func:`compile_cache_dir`. It is opt-in because it did not
pay off: 0.75x the plan's speed in bf16 on a 2-core Sapphire Rapids (0.93x in fp32) after a
3-14 s first call, 0.81x on an H200 (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from verydeep.core.paths import home
from verydeep.runtime.source import as_source, bias_of, child


def compile_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where compiled kernels are cached: ``cache_dir``, else ``$TORCHINDUCTOR_CACHE_DIR``,
    else ``<verydeep home>/inductor`` (``$VERYDEEP_HOME``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return home() / "inductor"


# -- the compiled max pool -------------------------------------------------------------------------
def _pool_ceil(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, ceil_mode=True)


class _CompiledPool:
    """The compiled pool, built on first use; ATen's once compilation has failed."""

    def __init__(self) -> None:
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
            self.fn = torch.compile(_pool_ceil, fullgraph=True)
        try:
            return self.fn(x)
        except Exception:  # no working compiler toolchain: stay correct, lose a little speed
            self.fn = _pool_ceil
            return _pool_ceil(x)


_COMPILED_POOL = _CompiledPool()


def compiled_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Caffe's max pool through ``torch.compile`` (on CUDA a Triton kernel that writes no
    indices; kernels cached under :func:`compile_cache_dir`); ATen's if compilation fails."""
    return _COMPILED_POOL(x)


# -- the compiled net ------------------------------------------------------------------------------
class _PlainNet(nn.Module):
    """The classic view as plain channels-last modules in the compute dtype (what
    ``torch.compile`` with freezing sees: parameters it may fold and pre-pack)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        source = as_source(model)
        self.specs = [s for s in source.specs if s.kind != "dropout"]
        self.fc6_input = tuple(source.fc6_input)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for spec in self.specs:
            if spec.kind == "conv":
                conv = child(model, spec.name, nn.Conv2d)
                new: nn.Conv2d | nn.Linear = nn.Conv2d(
                    spec.in_channels, spec.out_channels, spec.kernel, padding=spec.kernel // 2, device="meta"
                )
                new.weight = nn.Parameter(conv.weight.detach().to(device, dtype).contiguous(memory_format=fmt), False)
                new.bias = nn.Parameter(bias_of(conv).to(device, dtype), False)
            elif spec.kind == "fc":
                fc = child(model, spec.name, nn.Linear)
                new = nn.Linear(spec.in_channels, spec.out_channels, device="meta")
                new.weight = nn.Parameter(fc.weight.detach().to(device, dtype), False)
                new.bias = nn.Parameter(bias_of(fc).to(device, dtype), False)
            elif spec.kind == "lrn":
                self.add_module(spec.name, child(model, spec.name, nn.Module))
                continue
            else:
                continue
            self.add_module(spec.name, new)
        self.first_fc = next(i for i, s in enumerate(self.specs) if s.kind == "fc")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for spec in self.specs[: self.first_fc]:
            if spec.kind == "conv":
                x = self.get_submodule(spec.name)(x)
            elif spec.kind == "relu":
                x = F.relu(x)
            elif spec.kind == "pool":
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            elif spec.kind == "lrn":
                x = self.get_submodule(spec.name)(x.float()).to(x.dtype)
        return x

    def fcs(self, x: torch.Tensor) -> torch.Tensor:
        for spec in self.specs[self.first_fc :]:
            x = self.get_submodule(spec.name)(x) if spec.kind == "fc" else F.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x).contiguous(), 1)
        return self.fcs(x).float()


class _PlainDense(nn.Module):
    """The dense view of a :class:`_PlainNet`: fc6 as a GEMM over pool5's 7x7 patches."""

    def __init__(self, net: _PlainNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.features(x)
        n, c, h, w = x.shape
        _, kh, kw = self.net.fc6_input
        oh, ow = h - kh + 1, w - kw + 1
        y = F.unfold(x.contiguous(), (kh, kw)).transpose(1, 2).reshape(n * oh * ow, -1)
        y = self.net.fcs(y)
        return y.view(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow).float()


@dataclass(frozen=True)
class CompiledViews:
    """The compiled classic and dense views as callables; whoever calls them keeps ``net`` (the
    parameters) and ``compiled`` (the compiled modules) alive."""

    classic: Callable[[torch.Tensor], torch.Tensor]
    dense: Callable[[torch.Tensor], torch.Tensor]
    net: nn.Module
    compiled: tuple[nn.Module, ...]


def compile_views(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    *,
    channels_last: bool,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CompiledViews:
    """``model``'s classic and dense views through ``torch.compile`` with freezing."""
    # inductor reads its cache location from the environment (process-wide)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir(cache_dir))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.freezing = True  # weights become constants: inductor pre-packs them
    net = _PlainNet(model, device, dtype, channels_last).eval()
    # torch.compile of a module returns a module (OptimizedModule)
    classic = cast(nn.Module, torch.compile(net, dynamic=False))
    dense = cast(nn.Module, torch.compile(_PlainDense(net), dynamic=False))
    return CompiledViews(classic.__call__, dense.__call__, net, (classic, dense))
