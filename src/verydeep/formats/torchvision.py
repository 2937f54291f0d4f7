"""torchvision's VGG: its parameter names, its module, and its ``.pth`` files, both ways.

torchvision names layers by position (``features.28``, ``classifier.6``) and uses Caffe's OIHW
kernels; it builds configurations A, B, D and E (no LRN, no 1x1 convolutions). Its weights take
torchvision's input space, so conv1_1 is unfolded on the way in and folded on the way out
(:mod:`verydeep.formats.input_space`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from verydeep import configs
from verydeep.configs import NetSpec
from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError, WeightsError
from verydeep.formats.checks import TOLERANCE, ExportReport, ExportRequest, fail, probe, reference, rel_error
from verydeep.formats.input_space import INPUT_SPACES, fold_input, to_space, unfold_input
from verydeep.models.build import (
    build_vgg,
    candidate_widths,
    check_claimed,
    default_class_names,
    dense_problem,
    error_reason,
    format_shape,
    quote,
    shape_error,
    shape_fits,
    tensor_problem,
    vgg_spec_from_shapes,
)
from verydeep.models.vgg import VGG

#: Table 1 configurations torchvision builds (it has no LRN and no 1x1 convolutions).
TORCHVISION_ARCH = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
#: torchvision's classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear.
_TV_CLASSIFIER = {"fc6": 0, "fc7": 3, "fc8": 6}


def torchvision_names(config: str, width: float = 1.0, num_classes: int = 1000) -> dict[str, str]:
    """verydeep parameter name -> torchvision's (``conv1_1.weight`` -> ``features.0.weight``)."""
    config = configs.canonical(config)
    if config not in TORCHVISION_ARCH:
        raise WeightsError(
            f"config {config}: torchvision has no counterpart (it builds {', '.join(TORCHVISION_ARCH)}; "
            "no LRN, no 1x1 convolutions)"
        )
    names: dict[str, str] = {}
    index = 0  # position in torchvision's `features` Sequential
    for spec in configs.layer_specs(config, width, num_classes):
        if spec.kind == "conv":
            for kind in ("weight", "bias"):
                names[f"{spec.name}.{kind}"] = f"features.{index}.{kind}"
        elif spec.kind == "fc":
            for kind in ("weight", "bias"):
                names[f"{spec.name}.{kind}"] = f"classifier.{_TV_CLASSIFIER[spec.name]}.{kind}"
        if spec.kind in ("conv", "relu", "pool"):
            index += 1
    return names


def to_torchvision_state(model: VGG, space: str = "torchvision") -> dict[str, torch.Tensor]:
    """A verydeep VGG's parameters as a torchvision VGG state dict taking ``space`` input.

    conv1_1 is folded for ``space`` (see :func:`fold_input`; the offset goes into the bias).
    """
    names = torchvision_names(model.config, model.width, model.num_classes)
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    w, b, _ = fold_input(state["conv1_1.weight"], state["conv1_1.bias"], space, fold_offset=True)
    state["conv1_1.weight"], state["conv1_1.bias"] = w.contiguous(), b.contiguous()
    return {names[k]: v for k, v in state.items()}


def torchvision_model(
    config: str = "D", width: float = 1.0, num_classes: int = 1000, *, empty: bool = False
) -> torch.nn.Module:
    """torchvision's own VGG module for a Table 1 config: ``torchvision.models.vgg16()`` etc. at
    width 1, the same classes narrowed by ``width`` otherwise (for tests). Used to check exports
    against torchvision. ``empty``: parameters on the meta device (no init cost), for
    ``load_state_dict(state, assign=True)``."""
    import torchvision
    from torch import nn
    from torchvision.models import vgg as tv

    config = configs.canonical(config)
    arch = TORCHVISION_ARCH.get(config)
    if arch is None:
        torchvision_names(config)  # raises the explanation
        raise AssertionError(config)
    if width == 1.0:
        with torch.device("meta" if empty else "cpu"):
            return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    cfg = [v if v == "M" else configs.scaled(v, width) for v in tv.cfgs[config]]
    with torch.device("meta"):  # skips initialising the full-width classifier replaced below
        net = tv.VGG(tv.make_layers(cfg), num_classes=num_classes, init_weights=False)
    with torch.device("meta" if empty else "cpu"):
        c = configs.scaled(configs.STAGE_CHANNELS[-1], width)
        fc = configs.scaled(configs.FC_WIDTH, width)
        net.features = tv.make_layers(cfg)
        net.classifier[0] = nn.Linear(c * configs.POOL5_SIZE**2, fc)
        net.classifier[3] = nn.Linear(fc, fc)
        net.classifier[6] = nn.Linear(fc, num_classes)
    return net


#: Keys under which training checkpoints keep the state dict (``{"state_dict": ..., "epoch": 3}``).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
#: Wrappers unwrapped at most (``{"model": {"state_dict": ...}}`` is two): checkpoints nest one
#: or two deep; the bound keeps a crafted file from sending the search anywhere.
MAX_WRAPPERS = 4


def _zip_claims(path: Path, size: int) -> None:
    """Refuse a zip ``.pth`` whose members inflate past ``MAX_EXPANSION`` times the file
    (torch.save stores them uncompressed, torch.load would inflate any): before torch reads it."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy (pre-1.6) format: torch.load reads what the file holds
        with zipfile.ZipFile(path) as z:
            claimed = sum(i.file_size for i in z.infolist())
    except Exception as e:  # zipfile raises BadZipFile, NotImplementedError, EOFError, ValueError ...
        raise WeightsError(f"{path}: not a readable torch file: a damaged zip archive ({error_reason(e)})") from None
    check_claimed(str(path), "its zip archive", claimed, size)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a ``.pth`` holds, read with ``weights_only=True`` (no code is unpickled),
    unwrapped from a training checkpoint and DistributedDataParallel's ``module.``; every key a
    name, every value a dense CPU tensor whose data the file holds."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or error_reason(e)})") from None
    _zip_claims(path, size)
    try:
        with warnings.catch_warnings():
            # torch warns about the file's internals (its pickle protocol, sparse tensors it
            # validates); everything it returns is checked below and refused in one line.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: all mean "not a plain state dict"
        what = "a pickled object (a whole model?)" if "weights_only" in str(e) else "not a readable torch file"
        raise WeightsError(
            f"{path}: {what}, not a state dict that loads with weights_only=True ({error_reason(e)}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    for _ in range(MAX_WRAPPERS):  # training checkpoints wrap the state dict
        inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    if not obj:
        raise WeightsError(f"{path}: an empty state dict: no tensors")
    claimed = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightsError(f"{path}: key {quote(key)}: expected a parameter name, found {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: {quote(key)}: expected a tensor, found {type(value).__name__}")
        problem = dense_problem(value)  # a sparse or meta tensor has no storage to measure below
        if problem is not None:
            raise WeightsError(f"{path}: {quote(key)}: {problem}")
        nbytes = value.numel() * value.element_size()
        if nbytes > value.untyped_storage().nbytes():  # a stride-0 view repeating stored values
            raise WeightsError(
                f"{path}: {quote(key)}: a {format_shape(value.shape)} view of {value.untyped_storage().nbytes():,} "
                "stored bytes (an expanded tensor); save a copy: tensor.contiguous()"
            )
        claimed += nbytes
    check_claimed(str(path), "its state dict", claimed, size)
    prefix = "module."  # DistributedDataParallel
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _float32(path: Path, key: str, value: torch.Tensor) -> torch.Tensor:
    """A parameter as float32; an integer or boolean tensor is no weight (converting would hide it)."""
    problem = tensor_problem(value)
    if problem is not None:
        raise WeightsError(f"{path}: {quote(key)}: {problem}")
    return value.to(torch.float32)


def _kernels(raw: dict[str, torch.Tensor], feats: list[int], path: Path) -> tuple[int, ...]:
    """The kernel size of each ``features.N`` convolution, each checked to be OUTxINxKxK."""
    kernels = []
    for i in feats:
        shape = tuple(raw[f"features.{i}.weight"].shape)
        if len(shape) != 4 or shape[2] != shape[3]:
            raise WeightsError(
                f"{path}: features.{i}.weight: expected a convolution kernel OUTxINxKxK, found {format_shape(shape)}"
            )
        kernels.append(shape[3])
    return tuple(kernels)


def load_torchvision_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torchvision VGG ``.pth`` state dict -> (state dict in verydeep names, meta).

    The file is read with ``weights_only=True`` (tensors only, no code is unpickled). conv1_1 is
    unfolded from torchvision's input space to Caffe's (``meta["input_space"]`` of the file is
    "torchvision"). A ``.pth`` already in verydeep's names is taken as is (Caffe space).
    """
    path = Path(path)
    raw = _torch_load(path)
    meta: dict[str, Any] = {"source": str(path), "source_format": "torchvision"}
    if "conv1_1.weight" in raw:  # verydeep's own names: a torch.save(model.state_dict())
        meta.update(source_format="verydeep-state-dict", file_input_space="caffe")
        spec = _spec_from_verydeep(raw, path)
        meta.update(spec)
        return {k: _float32(path, k, v) for k, v in raw.items()}, meta
    if any(k.endswith("running_mean") for k in raw) and any(k.startswith("features.") for k in raw):
        raise WeightsError(f"{path}: a batch-norm VGG (vgg*_bn): not a Table 1 net, not supported")
    feats = sorted({int(m.group(1)) for k in raw if (m := re.fullmatch(r"features\.(0|[1-9]\d{0,3})\.weight", k))})
    if not feats or "classifier.6.weight" not in raw:
        sample = ", ".join(quote(k) for k in list(raw)[:4])
        raise WeightsError(
            f"{path}: not a torchvision VGG state dict: expected features.N.weight and classifier.6.weight, "
            f"found {sample}, ..."
        )
    kernels = _kernels(raw, feats, path)
    config = next(
        (
            c
            for c, stages in configs.TABLE_1.items()
            if tuple(k for st in stages for k in st if k != "LRN") == kernels and c in TORCHVISION_ARCH
        ),
        None,
    )
    if config is None:
        raise WeightsError(
            f"{path}: {len(feats)} convolutions with kernels {kernels}: no Table 1 configuration matches"
        )
    fc8 = tuple(raw["classifier.6.weight"].shape)
    if len(fc8) != 2 or fc8[0] < 1:
        raise WeightsError(f"{path}: classifier.6.weight: expected CLASSESxIN, found {format_shape(fc8)}")
    num_classes = int(fc8[0])
    names = torchvision_names(config, 1.0, num_classes)  # the names do not depend on the width
    inverse = {v: k for k, v in names.items()}
    missing = sorted(set(inverse) - set(raw))
    extra = sorted(set(raw) - set(inverse))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {quote(extra[0])}"
        raise WeightsError(f"{path}: torchvision {TORCHVISION_ARCH[config]} state dict: {what}")
    widths = candidate_widths(
        {
            configs.FC_WIDTH: int(raw["classifier.3.weight"].shape[0]) if raw["classifier.3.weight"].dim() else None,
            configs.STAGE_CHANNELS[4]: int(raw[f"features.{feats[-1]}.weight"].shape[0]),
            configs.STAGE_CHANNELS[0]: int(raw[f"features.{feats[0]}.weight"].shape[0]),
        }
    )

    def fits(width: float) -> bool:
        shapes = configs.param_shapes(config, width, num_classes)
        return all(shape_fits(tuple(raw[tv].shape), shapes[name]) for tv, name in inverse.items())

    if not widths:
        raise WeightsError(f"{path}: features.{feats[0]}.weight: a convolution without output channels")
    width = next((w for w in widths if fits(w)), widths[0])
    shapes = configs.param_shapes(config, width, num_classes)
    for tv_name, name in inverse.items():  # before unfolding conv1_1, which needs its shape right
        if not shape_fits(tuple(raw[tv_name].shape), shapes[name]):
            raise shape_error(f"{path}: {tv_name}", name, shapes[name], tuple(raw[tv_name].shape))
    state = {name: _float32(path, tv_name, raw[tv_name]).reshape(shapes[name]) for tv_name, name in inverse.items()}
    w, b = unfold_input(state["conv1_1.weight"], state["conv1_1.bias"], "torchvision")
    state["conv1_1.weight"], state["conv1_1.bias"] = w, b
    meta.update(
        config=config,
        width=width,
        num_classes=num_classes,
        file_input_space="torchvision",
        arch=TORCHVISION_ARCH[config],
    )
    return state, meta


def _spec_from_verydeep(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    spec = vgg_spec_from_shapes({k: tuple(v.shape) for k, v in state.items()})
    if spec is None:
        raise WeightsError(f"{path}: parameters in Caffe names do not form a Table 1 VGG")
    return {"config": spec.config, "width": spec.width, "num_classes": spec.num_classes}


def build_from_meta(
    state: dict[str, torch.Tensor], meta: dict[str, Any], origin: str, absent: Collection[str] = ()
) -> VGG:
    """The VGG that ``meta`` (config, width, num_classes) describes, holding ``state``; eval mode.
    ``absent``: layers the file lacks (NaN, see :func:`verydeep.models.build.state_from_arrays`)."""
    try:
        spec = NetSpec(meta["config"], meta["num_classes"], meta["width"])
    except ValueError as e:  # a width or class count no Table 1 net has
        raise WeightsError(f"{origin}: {error_reason(e)}") from None
    model = build_vgg(spec, state, origin=origin, class_names=default_class_names(spec.num_classes), absent=absent)
    return model.eval()


def load_torchvision(path: str | os.PathLike[str]) -> VGG:
    """A torchvision VGG ``.pth`` as a ready verydeep VGG (eval mode, Caffe input space)."""
    state, meta = load_torchvision_state(path)
    return build_from_meta(state, meta, str(path))


# -- export ------------------------------------------------------------------------------------


def write_torchvision(request: ExportRequest) -> ExportReport:
    """Write a torchvision state dict taking ``request.space`` input; check it in torchvision's module."""
    model, out, space, dense = request.model, request.out, request.space, request.dense
    if dense:
        raise VerydeepError("--dense: torchvision's VGG has no fully convolutional form; export the classic net")
    state = to_torchvision_state(model, space)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    tv = torchvision_model(model.config, model.width, model.num_classes, empty=True).eval()
    tv.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True, assign=True)
    x = probe(1)
    with torch.inference_mode():
        found = tv(to_space(x, space))
    err = rel_error(found, reference(model, x, False))
    offset = INPUT_SPACES[space].offsets()
    exact = bool(abs(offset).max() == 0) or space == "caffe"
    arch = TORCHVISION_ARCH[model.config]
    loader = (
        f"torchvision.models.{arch}(num_classes={model.num_classes})"
        if model.width == 1
        else f"verydeep.formats.torchvision.torchvision_model({model.config!r}, {model.width}, "
        f"{model.num_classes}) (narrow net)"
    )
    notes = [
        f"load with {loader}.load_state_dict(torch.load(PATH, weights_only=True))",
        f"input: {INPUT_SPACES[space].description}",
        "torchvision pools with floor mode and AdaptiveAvgPool2d(7): equal to verydeep (Caffe's ceil mode) "
        "when height and width are multiples of 32, i.e. at 224x224 for the classic net; other sizes differ",
    ]
    if not exact:
        notes.append(
            "the input offset is folded into conv1_1's bias: exact except conv1_1's one-pixel border, where zero "
            f"padding stands for Caffe value(s) {', '.join(f'{v:+.3f}' for v in offset)} instead of 0 "
            f"(measured on the probe: {err:.2e} relative at fc8)"
        )
    if exact and err > TOLERANCE:
        fail([out], f"{out}: torchvision's {arch} differs from verydeep by {err:.2e} (relative)")
    return ExportReport("torchvision", [str(out)], space, f"torchvision {arch} module", err, exact, notes)
