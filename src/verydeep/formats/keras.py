"""Keras' VGG16/VGG19 weight files (``.h5``, every HDF5 layout Keras has written) onto verydeep.

Keras stores conv kernels HWIO and dense kernels (in, out), and its ``Flatten`` after pool5 runs
in H, W, C order (channels_last) where Caffe's InnerProduct reads C, H, W: fc6's rows are
permuted accordingly. Keras' files were converted from the Caffe models and expect Caffe
preprocessing, so conv1_1 needs no unfolding.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verydeep import configs
from verydeep.errors import WeightsError
from verydeep.formats.torchvision import build_from_meta
from verydeep.models.vgg import VGG

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


def load_keras(path: str | os.PathLike[str]) -> VGG:
    """A Keras VGG16/VGG19 ``.h5`` as a ready verydeep VGG (eval mode, Caffe input space)."""
    state, meta = load_keras_h5(path)
    model = build_from_meta(state, meta, str(path))
    if not meta["top"]:
        model.class_names = None
    return model
