"""Every option of ``verydeep train`` in one record whose defaults are the paper's recipe.

Precedence is defaults < TOML config file < command line; the effective configuration is
written to ``RUN_DIR/config.toml`` so a run can be repeated or resumed from its folder alone.
Keys are the long option names with ``_`` for ``-`` (``--batch-size`` <-> ``batch_size``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from verydeep.configs import CROP, MAX_LOADER_WORKERS, MAX_SCALE, MAX_WIDTH, TABLE_1, canonical, layer_specs
from verydeep.core.atomic import write_text
from verydeep.core.defaults import PRECISIONS
from verydeep.data.images import quoted, read_text
from verydeep.errors import VerydeepError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found]  # the 3.10 backport, absent where mypy runs (3.11)


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe (Sec. 3.1) as defaults; every field is a ``verydeep train`` option."""

    # -- data -----------------------------------------------------------------------------
    data: str | None = None  # ImageFolder: one sub-folder per class
    val: str | None = None  # ImageFolder with (a subset of) the same class folders
    scale: list[int] = field(default_factory=lambda: [256])  # S, or [S_min, S_max] jittered per image
    val_scale: int | None = None  # Q; default S, or (S_min + S_max) / 2 when jittered (paper)
    crop: int = 224
    flip: bool = True
    lighting_std: float = 0.1  # AlexNet's PCA colour shift; 0 turns it off
    workers: int | None = None  # loader processes per rank; default core.defaults.default_workers: min(8, CPUs)
    # -- model ----------------------------------------------------------------------------
    arch: str = "D"
    width: float = 1.0
    num_classes: int | None = None  # default: number of class folders in `data`
    weights: str | None = None  # fine-tune from these weights (fc8 replaced if classes differ)
    prototxt: str | None = None
    init: str = "balanced"  # balanced | glorot | normal | PATH of a trained shallower net (e.g. config A)
    init_std: float = 0.01  # std of `normal` (Caffe's VGG fillers; the paper's "variance 1e-2", std 0.1, explodes)
    init_layers: list[str] | None = None  # layers copied by init=PATH; default first 4 conv + fc6-8
    freeze_through: str | None = None  # this layer and all before it are not trained
    lr_mult: dict[str, float] = field(default_factory=dict)  # Caffe's lr_mult: {"fc8": 10}
    dropout: float = 0.5  # on fc6 and fc7
    # -- optimisation ---------------------------------------------------------------------
    epochs: int = 74
    batch_size: int = 256  # global: over all ranks and accumulation steps
    micro_batch: int | None = None  # per rank and forward pass; default batch_size / ranks
    lr: float | None = None  # default: REFERENCE_LR x batch_size / REFERENCE_BATCH (linear scaling)
    warmup: float = 1.0  # epochs over which the LR rises linearly from lr/steps to lr; 0 turns it off
    clip_grad_norm: float | None = None  # rescale gradients whose global L2 norm exceeds this
    divergence_checks: bool = True  # stop when the loss explodes or the net sits at chance (NaN always stops)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_factor: float = 0.1  # the LR is multiplied by this when val top-1 stops improving
    max_lr_drops: int = 3
    plateau_patience: int = 3  # epochs without a new best val top-1 before the LR drops
    plateau_threshold: float = 0.0  # top-1 gain (fraction) that counts as an improvement
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke tests)
    # -- run ------------------------------------------------------------------------------
    out: str | None = None  # RUN_DIR; default runs/<arch>-<date>-<time>
    checkpoint_every: int = 1000  # optimiser steps; checkpoints are also written at each epoch end
    keep_checkpoints: int = 3
    seed: int = 0
    deterministic: bool = False
    device: str | None = None  # default core.defaults.default_device: cuda if visible, else cpu
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with loss scaling)
    channels_last: str = "auto"  # auto (on for CPU and CUDA) | on | off
    compile: bool = False
    log_every: int = 10
    metrics_format: str = "jsonl"  # jsonl | csv
    tensorboard: bool = True  # event files too, when the tensorboard package is installed
    progress: bool = True

    # -------------------------------------------------------------------------------------
    @property
    def scale_range(self) -> tuple[int, int]:
        return (self.scale[0], self.scale[-1])

    @property
    def base_lr(self) -> float:
        """The LR before warm-up and plateau drops: ``lr``, or the paper's 1e-2 scaled to the batch."""
        return self.lr if self.lr is not None else linear_scaling_lr(self.batch_size)

    @property
    def test_scale(self) -> int:
        """Q for validation: S, or the middle of the jitter range (the paper's Q for S in [256, 512])."""
        if self.val_scale is not None:
            return self.val_scale
        lo, hi = self.scale_range
        return (lo + hi) // 2

    def validate(self) -> TrainConfig:
        """Raise :class:`VerydeepError` naming the option for values that cannot work: each value
        against :data:`SCHEMA`, then the relations between options."""
        for name in FIELDS:
            _coerce(name, getattr(self, name), "")
        lo, hi = self.scale_range
        if lo > hi:
            raise VerydeepError(f"scale: S_min {lo} is larger than S_max {hi}")
        if lo < self.crop or self.test_scale < self.crop:
            raise VerydeepError(
                f"scale: S and Q must be at least the crop size {self.crop}, found S={lo} Q={self.test_scale}"
            )
        if self.weights is not None and self.init not in INIT_SCHEMES:
            raise VerydeepError("init: --init FROM builds a net from scratch; it cannot be combined with --weights")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The paper's LR and the global batch it was set for; without ``--lr`` the LR scales linearly
#: with the batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD": the rule large-batch
#: ImageNet training uses), so batch 32 gets 1.25e-3 and batch 1024 gets 4e-2.
REFERENCE_LR, REFERENCE_BATCH = 0.01, 256


def linear_scaling_lr(batch_size: int) -> float:
    """The paper's 1e-2 for a global batch of 256, scaled to ``batch_size``."""
    return REFERENCE_LR * batch_size / REFERENCE_BATCH


#: Options that may differ when a run is resumed: they change how, not what, is computed.
RESUMABLE = frozenset(
    {
        "epochs",
        "max_steps",
        "workers",
        "device",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "tensorboard",
        "progress",
        "compile",
        "out",
        "data",
        "val",
    }
)

#: Options holding paths; relative paths in a config file are relative to that file.
#: ``init`` is a path unless it names a scheme (balanced, glorot, normal).
PATH_KEYS = ("data", "val", "weights", "prototxt", "out", "init")
INIT_SCHEMES = ("balanced", "glorot", "normal")
#: The smallest crop the classic net accepts: pool5 (rounding up, like Caffe) is 7x7 for 193..CROP.
MIN_CROP = 193

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: The longest warm-up, in epochs: longer than any run (the paper's has 74 epochs), and small
#: enough that warmup x steps per epoch stays a finite number of steps.
MAX_WARMUP = 1e6
#: The largest seed: it seeds numpy's generators, and torch's 64-bit one as seed x 1,000,003 + epoch.
SEED_MAX = 2**32 - 1
#: A config file is a few hundred bytes (every option: ~2 KB); a larger one is not a config file.
MAX_CONFIG_BYTES = 2**20


@dataclass(frozen=True)
class Check:
    """What an option's value must be (each item of a list, each value of a table)."""

    admits: Callable[[Any], bool]
    expected: str


def between(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number in the interval from ``low`` to ``high`` (ends open or closed)."""

    def admits(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        # An int is finite (and math.isfinite cannot take one beyond the range of a float).
        return (isinstance(v, int) or math.isfinite(v)) and above and below

    if high == math.inf:
        where = f"{'>' if low_open else '>='} {_number(low)}"
    else:
        where = f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"
    return Check(admits, f"a finite number {where}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def one_of(*values: str) -> Check:
    return Check(lambda v: v in values, f"one of {', '.join(values)}")


def _known_arch(value: str) -> bool:
    try:
        canonical(value)
    except ValueError:
        return False
    return True


#: The layer names of Table 1's nets in forward order (E's, and A-LRN's norm1 after relu1_1):
#: a config names layers before the net, which ``weights`` may change, is built.
_ORDER = [s.name for s in layer_specs("E")]
_SPECS = sorted(
    {s.name: s for config in TABLE_1 for s in layer_specs(config)}.values(),
    key=lambda s: _ORDER.index(s.name) if s.name in _ORDER else _ORDER.index("relu1_1") + 0.5,
)
LAYERS = tuple(s.name for s in _SPECS)
PARAM_LAYERS = tuple(s.name for s in _SPECS if s.kind in ("conv", "fc"))
ANY = Check(lambda v: True, "")
PATH = Check(lambda v: bool(v) and "\0" not in v, "a path (not empty, without a NUL character)")
POSITIVE = between(1)

#: Every option's rule (the annotation gives its type; a list's or table's rule is its items').
#: Ranges are what the recipe can use: probabilities in [0, 1), scales that crop to 224, ...
SCHEMA: dict[str, Check] = {
    "data": PATH,
    "val": PATH,
    "scale": between(MIN_CROP, MAX_SCALE),
    "val_scale": between(MIN_CROP, MAX_SCALE),
    "crop": Check(
        lambda v: MIN_CROP <= v <= CROP,
        f"{MIN_CROP}..{CROP}: fc6 needs pool5 of 7x7, which only these crops give (the paper: {CROP})",
    ),
    "flip": ANY,
    "lighting_std": between(0),
    "workers": between(0, MAX_LOADER_WORKERS),
    "arch": Check(_known_arch, f"a configuration of Table 1 ({', '.join(TABLE_1)}) or its name (vgg16, ...)"),
    "width": between(0, MAX_WIDTH, low_open=True),
    "num_classes": POSITIVE,
    "weights": PATH,
    "prototxt": PATH,
    "init": PATH,
    "init_std": between(0, low_open=True),
    "init_layers": Check(lambda v: v in PARAM_LAYERS, f"layers with parameters ({', '.join(PARAM_LAYERS)})"),
    "freeze_through": Check(lambda v: v in LAYERS, f"a layer of Table 1's nets ({LAYERS[0]} ... {LAYERS[-1]})"),
    "lr_mult": between(0),
    "dropout": between(0, 1, high_open=True),
    "epochs": POSITIVE,
    "batch_size": POSITIVE,
    "micro_batch": POSITIVE,
    "lr": between(0, low_open=True),
    "warmup": between(0, MAX_WARMUP),
    "clip_grad_norm": between(0, low_open=True),
    "divergence_checks": ANY,
    "momentum": between(0, 1, high_open=True),
    "weight_decay": between(0),
    "lr_factor": between(0, 1, low_open=True),
    "max_lr_drops": between(0),
    "plateau_patience": POSITIVE,
    "plateau_threshold": between(0, 1),  # 1: no gain counts (a plateau every epoch)
    "max_steps": POSITIVE,
    "out": PATH,
    "checkpoint_every": between(0),  # 0: at epoch ends only
    "keep_checkpoints": POSITIVE,
    "seed": between(0, SEED_MAX),
    "deterministic": ANY,
    "device": Check(lambda v: re.fullmatch(r"[a-z_]+(:\d+)?", v) is not None, "a device such as cpu, cuda or cuda:1"),
    "precision": one_of(*PRECISIONS),
    "channels_last": one_of("auto", "on", "off"),
    "compile": ANY,
    "log_every": POSITIVE,
    "metrics_format": one_of("jsonl", "csv"),
    "tensorboard": ANY,
    "progress": ANY,
}
#: Rules for the keys of table options: ``lr_mult`` names a layer or one of its blobs (fc8.bias).
KEYS: dict[str, Check] = {
    "lr_mult": Check(
        lambda k: k.removesuffix(".weight").removesuffix(".bias") in PARAM_LAYERS,
        "a layer with parameters, or its .weight or .bias",
    )
}
#: How many items a list option holds: S, or S_min and S_max.
LENGTHS: dict[str, tuple[int, int]] = {"scale": (1, 2)}


def check_option(name: str, value: Any, origin: str = "") -> None:
    """Raise :class:`VerydeepError` unless ``value`` (already of the option's type) fits :data:`SCHEMA`.

    ``origin`` (a file and line, or "command line") starts the message when given.
    """
    if value is None:
        return
    where = _where(name, origin)
    if name in LENGTHS:
        low, high = LENGTHS[name]
        if not low <= len(value) <= high:
            raise VerydeepError(f"{where}: expected {low} to {high} values, found {len(value)}")
    items = (
        value.items()
        if isinstance(value, dict)
        else ((None, v) for v in value)
        if isinstance(value, list)
        else [(None, value)]
    )
    rule = SCHEMA[name]
    for key, item in items:
        if key is not None and name in KEYS and not KEYS[name].admits(key):
            raise VerydeepError(f"{where}: key {quoted(key)}: expected {KEYS[name].expected}")
        if not rule.admits(item):
            at = f" {key}" if key is not None else ""
            raise VerydeepError(f"{where}{at}: expected {rule.expected}, found {quoted(item)}")


def _where(name: str, origin: str) -> str:
    """How a message names an option: ``run.toml: line 3: option lr`` or, checking a config, ``lr``."""
    return f"{origin}: option {name}" if origin else name


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Check ``value`` against the field's annotation; ints are accepted where floats are."""
    hint = _hints()[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin_type = typing.get_origin(hint) or hint

    def fail() -> NoReturn:
        found = type(value).__name__
        raise VerydeepError(f"{_where(name, origin)}: expected {_type_name(hint)}, found {found} {quoted(value)}")

    coerced: Any
    if origin_type is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, (int, str)) and not isinstance(value, bool) else fail()
        coerced = [_scalar(v, item, fail) for v in value]
    elif origin_type is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            fail()
        coerced = {str(k): _scalar(v, item, fail) for k, v in value.items()}
    else:
        coerced = _scalar(value, hint, fail)
    check_option(name, coerced, origin)
    return coerced


def _scalar(value: Any, kind: type, fail: Callable[[], NoReturn]) -> Any:
    if kind is bool:
        return value if isinstance(value, bool) else fail()
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if kind is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail()
    if kind is str:
        return value if isinstance(value, str) else fail()
    return value  # pragma: no cover


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {typing.get_args(hint)[0].__name__}"
    if origin is dict:
        return f"a table of {typing.get_args(hint)[1].__name__}"
    return getattr(hint, "__name__", str(hint))


def _unknown(name: str, origin: str) -> VerydeepError:
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return VerydeepError(f"{origin}: unknown option {name!r}{hint}")


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's options, type- and range-checked, with relative paths made relative to the file.

    Errors name the file and, where the parser or a search for the key finds it, the line.
    """
    path = Path(path)
    text = read_text(path, "config file", MAX_CONFIG_BYTES)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # Python 3.11's message ends "(at line L, column C)"; the line goes up front, like every error's.
        found = re.fullmatch(r"(.*) \(at (?:line (\d+), column \d+|end of document)\)", str(e), re.S)
        line = (found[2] or text.count("\n") + 1) if found else None
        where = f"line {line}: " if line else ""
        raise VerydeepError(f"{path}: {where}not valid TOML ({found[1] if found else e})") from None
    except RecursionError:
        raise VerydeepError(f"{path}: not a config file (values nested deeper than TOML can be read)") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        line = _line_of(text, key)
        origin = f"{path}: line {line}" if line else str(path)
        if name not in FIELDS:
            raise _unknown(key, origin)
        value = _coerce(name, value, origin)
        if name in PATH_KEYS and isinstance(value, str) and not _is_name_or_url(name, value):
            value = _absolute(path.parent / value, f"{origin}: option {name}")
        out[name] = value
    return out


def _line_of(text: str, key: str) -> int | None:
    """The line where top-level ``key`` is set (``key =``, ``key.sub =`` or ``[key]``), if found."""
    quoted = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    found = re.search(rf"^[ \t]*(?:\[[ \t]*{quoted}[ \t]*\]|{quoted}[ \t]*[=.])", text, re.M)
    return text.count("\n", 0, found.start()) + 1 if found else None


def _absolute(path: Path, where: str) -> str:
    """``path`` made absolute; a home folder that cannot be found or a symlink loop is an error."""
    try:
        return str(path.expanduser().resolve())
    except (OSError, RuntimeError) as e:
        raise VerydeepError(f"{where}: cannot resolve the path {path} ({e})") from None


def _is_name_or_url(key: str, value: str) -> bool:
    """A registry name (``--weights vgg16``) or a URL is not a path to resolve."""
    if "://" in value:
        return True
    if key == "init":
        return value in INIT_SCHEMES
    if key == "weights":
        from verydeep.hub.registry import REGISTRY

        return value in REGISTRY
    return False


def merge(*layers: dict[str, Any], base: TrainConfig | None = None, origin: str = "command line") -> TrainConfig:
    """Apply option dicts in order over ``base`` (default: the recipe)."""
    values = (base or TrainConfig()).to_dict()
    for layer in layers:
        for name, value in layer.items():
            if name not in FIELDS:
                raise _unknown(name, origin)
            values[name] = _coerce(name, value, origin)
    return TrainConfig(**values)


def load(config_file: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < ``config_file`` < ``overrides`` (command-line options), validated."""
    layers = [read_toml(config_file)] if config_file is not None else []
    return merge(*layers, overrides or {}).validate()


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """The same config with local paths made absolute (the saved config must not depend on cwd)."""
    values = config.to_dict()
    for key in PATH_KEYS:
        v = values[key]
        if isinstance(v, str) and not _is_name_or_url(key, v):
            values[key] = _absolute(Path(v), key)
    return TrainConfig(**values)


def to_toml(config: TrainConfig, header: str = "") -> str:
    """TOML text for ``config`` (None values are omitted: TOML has no null)."""
    lines = [f"# {line}" for line in header.splitlines()] + ([""] if header else [])
    tables: list[str] = []
    for name, value in config.to_dict().items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append(f"\n[{name}]")
            tables += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")  # pragma: no cover


def save_toml(config: TrainConfig, path: str | os.PathLike[str]) -> Path:
    """Write the effective configuration atomically."""
    text = to_toml(config, header="verydeep train: effective configuration (defaults < config file < command line)")
    return write_text(path, text)


def changed_on_resume(saved: TrainConfig, requested: dict[str, Any]) -> list[str]:
    """Options given on the command line that differ from the run's and may not change."""
    values = saved.to_dict()
    bad = []
    for name, value in requested.items():
        if name in RESUMABLE or name not in values:
            continue
        value = _coerce(name, value, "command line")
        if name in PATH_KEYS and isinstance(value, str) and not _is_name_or_url(name, value):
            value = _absolute(Path(value), f"command line: option {name}")
        if value != values[name]:
            bad.append(name)
    return bad
