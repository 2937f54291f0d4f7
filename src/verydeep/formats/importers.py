"""Other published VGG weights onto verydeep's module, and back: torchvision and Keras.

Three facts decide every conversion here:

* **Input space.** verydeep's model takes Caffe input (BGR, 0..255, mean pixel subtracted).
  torchvision's VGGs take RGB in [0, 1] normalised by ImageNet mean/std; its own ImageNet
  weights were *trained* in that space. The spaces differ by a per-channel affine map
  (channel swap, scale, offset), which :func:`fold_input` moves into conv1_1 and
  :func:`unfold_input` takes out again (its exact inverse). Keras' VGG16/VGG19 files were
  converted from the Caffe models and expect Caffe preprocessing, so they need no unfolding.
* **Layouts.** torchvision names layers by position (``features.28``, ``classifier.6``) and
  uses Caffe's OIHW kernels. Keras stores conv kernels HWIO, dense kernels (in, out), and its
  ``Flatten`` after pool5 runs in H, W, C order (channels_last) where Caffe's InnerProduct
  reads C, H, W: fc6's rows are permuted accordingly.
* **Zero padding.** conv1_1 pads with zeros *in its input space*. A folded offset is exact in
  the interior of the image but not in conv1_1's one-pixel border, where the padded value
  stands for a different pixel. For torchvision's space the offset is the difference between
  ImageNet's mean (x255) and Caffe's mean pixel, at most 0.5 grey levels; :mod:`verydeep.formats.export`
  keeps the offset as a separate op wherever the target format allows, so its ONNX and Caffe
  exports are exact.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verydeep import configs
from verydeep.configs import MEAN_BGR
from verydeep.errors import WeightsError

# -- input spaces ------------------------------------------------------------------------------

#: torchvision's ImageNet normalisation (RGB order).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpace:
    """How a model input channel relates to pixels: ``pixel (0..255) = value * gain + bias``,
    channel ``j`` of the input carrying colour ``order[j]``."""

    name: str
    order: str  # "BGR" or "RGB"
    gain: tuple[float, float, float]
    bias: tuple[float, float, float]
    description: str

    def caffe_channel(self, j: int) -> int:
        """The Caffe (BGR) channel that input channel ``j`` feeds."""
        return "BGR".index(self.order[j])

    def offsets(self) -> np.ndarray:
        """Per input channel, Caffe's value where this space's value is 0: ``bias - mean``."""
        return np.array([self.bias[j] - MEAN_BGR[self.caffe_channel(j)] for j in range(3)], dtype=np.float64)


_MEAN_RGB = tuple(reversed(MEAN_BGR))
INPUT_SPACES: dict[str, InputSpace] = {
    s.name: s
    for s in (
        InputSpace(
            "caffe", "BGR", (1.0, 1.0, 1.0), MEAN_BGR, "BGR, 0..255, Caffe mean pixel subtracted (verydeep's own)"
        ),
        InputSpace("rgb255", "RGB", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), "RGB, 0..255, nothing subtracted"),
        InputSpace("rgb01", "RGB", (255.0, 255.0, 255.0), (0.0, 0.0, 0.0), "RGB, 0..1, nothing subtracted"),
        InputSpace(
            "torchvision",
            "RGB",
            tuple(255.0 * s for s in TORCHVISION_STD),
            tuple(255.0 * m for m in TORCHVISION_MEAN),
            "RGB, 0..1, then (x - ImageNet mean) / std (torchvision's usual input)",
        ),
    )
}


def input_space(name: str) -> InputSpace:
    if name not in INPUT_SPACES:
        raise WeightsError(f"unknown input space {name!r}; known: {', '.join(INPUT_SPACES)}")
    return INPUT_SPACES[name]


def to_space(x_caffe: torch.Tensor, space: str) -> torch.Tensor:
    """Caffe-space input -> the same images in ``space`` (N x 3 x H x W); for checks and tests."""
    s = input_space(space)
    mean = torch.tensor(MEAN_BGR, dtype=x_caffe.dtype, device=x_caffe.device).view(1, 3, 1, 1)
    pixels = x_caffe + mean  # BGR 0..255
    chans = [(pixels[:, s.caffe_channel(j)] - s.bias[j]) / s.gain[j] for j in range(3)]
    return torch.stack(chans, dim=1)


def fold_input(
    weight: torch.Tensor, bias: torch.Tensor, space: str, *, fold_offset: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv1_1 (weight, bias) for Caffe input -> (weight', bias', offset) for ``space`` input.

    ``conv(x_space + offset, weight') == conv(x_caffe, weight)`` exactly, zero padding included.
    With ``fold_offset`` the offset is also folded into ``bias'`` (for formats that can hold
    nothing but conv weights): exact except in conv1_1's one-pixel border; the returned offset is
    then what the border misses. Computed in float64.
    """
    s = input_space(space)
    w = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64)
    gain = torch.tensor(s.gain, dtype=torch.float64)
    cols = [w[:, s.caffe_channel(j)] * gain[j] for j in range(3)]
    w_new = torch.stack(cols, dim=1)
    offset = torch.tensor(s.offsets(), dtype=torch.float64) / gain  # in the space's own units
    if fold_offset:
        b = b + (w_new * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return w_new.to(weight.dtype), b.to(bias.dtype), offset.to(weight.dtype)


def unfold_input(weight: torch.Tensor, bias: torch.Tensor, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact inverse of ``fold_input(..., fold_offset=True)``: conv1_1 for ``space`` input
    -> conv1_1 for Caffe input."""
    s = input_space(space)
    w = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64)
    gain = torch.tensor(s.gain, dtype=torch.float64)
    offset = torch.tensor(s.offsets(), dtype=torch.float64) / gain
    b = b - (w * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    cols = [None, None, None]
    for j in range(3):
        cols[s.caffe_channel(j)] = w[:, j] / gain[j]
    return torch.stack(cols, dim=1).to(weight.dtype), b.to(bias.dtype)


# -- torchvision -------------------------------------------------------------------------------

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


def to_torchvision_state(model: Any, space: str = "torchvision") -> dict[str, torch.Tensor]:
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


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: all mean "not a plain state dict"
        raise WeightsError(
            f"{path}: not a state dict that loads with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    # Training checkpoints often wrap the state dict.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    prefix = "module."  # DistributedDataParallel
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


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
        return {k: v.to(torch.float32) for k, v in raw.items()}, meta
    if any(k.endswith("running_mean") for k in raw):
        raise WeightsError(f"{path}: a batch-norm VGG (vgg*_bn): not a Table 1 net, not supported")
    feats = sorted({int(m.group(1)) for k in raw if (m := re.fullmatch(r"features\.(\d+)\.weight", k))})
    if not feats or "classifier.6.weight" not in raw:
        sample = ", ".join(list(raw)[:4])
        raise WeightsError(
            f"{path}: not a torchvision VGG state dict: expected features.N.weight and classifier.6.weight, found {sample}, ..."
        )
    kernels = tuple(raw[f"features.{i}.weight"].shape[-1] for i in feats)
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
    width = raw[f"features.{feats[0]}.weight"].shape[0] / configs.STAGE_CHANNELS[0]
    num_classes = int(raw["classifier.6.weight"].shape[0])
    names = torchvision_names(config, width, num_classes)
    inverse = {v: k for k, v in names.items()}
    missing = sorted(set(inverse) - set(raw))
    extra = sorted(set(raw) - set(inverse))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise WeightsError(f"{path}: torchvision {TORCHVISION_ARCH[config]} state dict: {what}")
    state = {inverse[k]: v.to(torch.float32) for k, v in raw.items()}
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
    from verydeep.hub.weights import vgg_spec_from_shapes

    spec = vgg_spec_from_shapes({k: tuple(v.shape) for k, v in state.items()})
    if spec is None:
        raise WeightsError(f"{path}: parameters in Caffe names do not form a Table 1 VGG")
    return spec


def _build(state: dict[str, torch.Tensor], meta: dict[str, Any], origin: str) -> Any:
    from verydeep.hub.weights import _default_names, build_vgg, state_from_arrays

    spec = {k: meta[k] for k in ("config", "width", "num_classes")}
    model = build_vgg(spec, class_names=_default_names(spec["num_classes"]))
    model.load_state_dict(state_from_arrays(state, model, origin), strict=True, assign=True)
    return model.eval()


def load_torchvision(path: str | os.PathLike) -> Any:
    """A torchvision VGG ``.pth`` as a ready verydeep VGG (eval mode, Caffe input space)."""
    state, meta = load_torchvision_state(path)
    return _build(state, meta, str(path))


# -- Keras ---------------------------------------------------------------------------------------

_KERAS_FC = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}


def _keras_layer_name(name: str) -> str | None:
    """Keras' layer name -> Caffe's (``block3_conv2`` -> ``conv3_2``, ``fc1`` -> ``fc6``)."""
    m = re.fullmatch(r"block(\d)_conv(\d)", name)
    if m:
        return f"conv{m.group(1)}_{m.group(2)}"
    return _KERAS_FC.get(name)


def _keras_weights(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> [kernel, bias] from any of Keras' HDF5 weight layouts:

    * Keras 1/2 weight files (``save_weights``, the published ``vgg16_weights_tf_*.h5``):
      root attribute ``layer_names``; each layer group lists ``weight_names``, old style
      ``block1_conv1_W_1:0`` or new style ``block1_conv1/kernel:0``;
    * Keras 2 whole-model files: the same under a ``model_weights`` group;
    * Keras 3 ``.weights.h5``: ``layers/<name>/vars/0`` (kernel) and ``/1`` (bias).
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        out: dict[str, list[np.ndarray]] = {}
        if "layer_names" in root.attrs:
            for raw_name in root.attrs["layer_names"]:
                name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
                group = root[name]
                weight_names = [
                    w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs.get("weight_names", [])
                ]
                if weight_names:
                    out[name] = [np.asarray(group[w]) for w in weight_names]
        elif "layers" in root:
            for name, group in root["layers"].items():
                if "vars" in group and len(group["vars"]):
                    out[name] = [np.asarray(group["vars"][str(i)]) for i in range(len(group["vars"]))]
        else:
            raise WeightsError(f"{path}: no Keras weights found (no 'layer_names' attribute, no 'layers' group)")
    return out


def load_keras_h5(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Keras VGG16/VGG19 ``.h5`` weights file -> (state dict in verydeep names, meta).

    Kernels HWIO -> OIHW; dense kernels (in, out) -> (out, in); fc1's input rows go from Keras'
    channels_last flatten order (H, W, C) to Caffe's (C, H, W). Keras' VGG expects Caffe
    preprocessing (BGR, mean pixel subtracted), so no input unfolding. A file without the top
    (``include_top=False``) has no fc layers: ``meta["top"]`` is False and fc6-fc8 are NaN in
    the returned model so that no score computed from them can pass for a real one.
    """
    path = Path(path)
    layers = _keras_weights(path)
    arrays: dict[str, np.ndarray] = {}
    for keras_name, values in layers.items():
        name = _keras_layer_name(keras_name)
        if name is None:
            continue
        if len(values) != 2:
            raise WeightsError(f"{path}: layer {keras_name}: expected kernel and bias, found {len(values)} arrays")
        arrays[f"{name}.weight"], arrays[f"{name}.bias"] = values
    convs = sorted(k[:-7] for k in arrays if k.startswith("conv") and k.endswith(".weight"))
    if not convs:
        raise WeightsError(
            f"{path}: no Keras VGG layers (block1_conv1 ...) found; layers: {', '.join(list(layers)[:5])}"
        )
    counts = tuple(sum(1 for c in convs if c.startswith(f"conv{s}_")) for s in range(1, 6))
    config = next(
        (
            c
            for c, stages in configs.TABLE_1.items()
            if tuple(len(st) for st in stages) == counts
            and "LRN" not in sum(stages, ())
            and all(k == 3 for st in stages for k in st)
        ),
        None,
    )
    if config is None:
        raise WeightsError(f"{path}: convolutions per block {counts} match no Table 1 configuration")
    k11 = arrays["conv1_1.weight"]
    if k11.ndim != 4 or k11.shape[:3] != (3, 3, 3):
        raise WeightsError(
            f"{path}: layer block1_conv1: expected an HWIO kernel 3x3x3xOUT (TensorFlow ordering), found "
            f"{'x'.join(map(str, k11.shape))}; use the *_tf_dim_ordering_tf_kernels.h5 file"
        )
    width = k11.shape[3] / configs.STAGE_CHANNELS[0]
    top = "fc8.weight" in arrays
    num_classes = int(arrays["fc8.weight"].shape[1]) if top else 1000
    shapes = configs.param_shapes(config, width, num_classes)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        layer = key.rsplit(".", 1)[0]
        if key not in arrays:
            if layer.startswith("fc") and not top:
                state[key] = torch.full(shape, float("nan"))
                continue
            raise WeightsError(f"{path}: layer {layer}: missing in the Keras file")
        a = np.asarray(arrays[key], dtype=np.float32)
        if key.endswith(".weight") and a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif key == "fc6.weight":
            c, h, w = shape[1] // configs.POOL5_SIZE**2, configs.POOL5_SIZE, configs.POOL5_SIZE
            if a.shape != (h * w * c, shape[0]):
                raise WeightsError(
                    f"{path}: layer fc1: expected kernel {h * w * c}x{shape[0]}, found {'x'.join(map(str, a.shape))}"
                )
            a = a.reshape(h, w, c, shape[0]).transpose(3, 2, 0, 1).reshape(shape)  # (H,W,C,out) -> (out,C,H,W)
        elif key.endswith(".weight"):
            a = a.T  # Dense (in, out) -> (out, in)
        if a.shape != shape:
            raise WeightsError(
                f"{path}: layer {layer}: expected {'x'.join(map(str, shape))}, found {'x'.join(map(str, a.shape))}"
            )
        state[key] = torch.from_numpy(np.ascontiguousarray(a))
    meta = {
        "source": str(path),
        "source_format": "keras",
        "config": config,
        "width": width,
        "num_classes": num_classes,
        "top": top,
        "file_input_space": "caffe",
    }
    return state, meta


def load_keras(path: str | os.PathLike) -> Any:
    """A Keras VGG16/VGG19 ``.h5`` as a ready verydeep VGG (eval mode, Caffe input space)."""
    state, meta = load_keras_h5(path)
    model = _build(state, meta, str(path))
    if not meta["top"]:
        model.class_names = None
    return model
