"""From arrays to a ready VGG: recognise the net from parameter shapes, check every array
against the parameter it fills, build the module without paying for a random init.

Every loader (caffemodel, safetensors, torchvision ``.pth``, Keras ``.h5``, a Caffe graph's
blobs) checks shapes with the one rule :func:`shape_fits`, so a file that loads through one
format loads through all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from verydeep import configs
from verydeep.configs import NetSpec
from verydeep.errors import WeightsError
from verydeep.models.vgg import IMAGENET, VGG

Shape = tuple[int, ...]


def _strip(shape: Sequence[int]) -> Shape:
    """``shape`` without its leading 1s (Caffe's legacy 4-D blobs pad fc and bias shapes so)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def shape_fits(found: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether an array of shape ``found`` can fill a parameter of shape ``expected``.

    The same shape; or the same once Caffe's leading 1s are dropped (V1 files store an fc weight
    as 1x1xOUTxIN and a bias as 1x1x1xOUT); or an fc weight stored as a convolution of the same
    size and back (OUT x IN <-> OUT x C x H x W, as in dense deploy nets).
    """
    f, e = tuple(found), tuple(expected)
    if f == e or _strip(f) == _strip(e):
        return True
    f, e = _strip(f), _strip(e)
    return bool(f and e) and f[0] == e[0] and math.prod(f) == math.prod(e) and 2 in (len(f), len(e))


def format_shape(shape: Sequence[int]) -> str:
    """``64x3x3x3``; ``scalar`` for a 0-d shape."""
    return "x".join(map(str, shape)) or "scalar"


def vgg_spec_from_shapes(shapes: Mapping[str, Sequence[int]]) -> NetSpec | None:
    """The Table 1 net whose parameters (Caffe names) have these shapes, or None.

    LRN has no parameters, so A-LRN's parameters read as A's.
    """
    if "conv1_1.weight" not in shapes or "fc8.bias" not in shapes:
        return None
    width = shapes["conv1_1.weight"][0] / configs.STAGE_CHANNELS[0]
    num_classes = int(np.prod(shapes["fc8.bias"]))
    if width <= 0 or num_classes < 1:
        return None
    for config in configs.TABLE_1:
        expected = configs.param_shapes(config, width, num_classes)
        if set(expected) == set(shapes) and all(shape_fits(shapes[k], s) for k, s in expected.items()):
            return NetSpec(config, num_classes, width)
    return None


def default_class_names(num_classes: int) -> str | None:
    """ImageNet's names (looked up when first used) for a 1000-class net, else none."""
    return IMAGENET if num_classes == 1000 else None


def state_from_arrays(
    arrays: Mapping[str, np.ndarray | torch.Tensor], model: nn.Module, origin: str
) -> dict[str, torch.Tensor]:
    """Match ``arrays`` to ``model``'s parameters by name, each checked with :func:`shape_fits`
    and reshaped to the parameter's shape. Errors name the file, the layer, expected and found."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        layer, kind = key.rsplit(".", 1)
        if key not in arrays:
            raise WeightsError(f"{origin}: layer {layer}: missing {kind} (expected shape {format_shape(shape)})")
        value = arrays[key]
        found = tuple(value.shape)
        if not shape_fits(found, shape):
            raise WeightsError(
                f"{origin}: layer {layer}: {kind} expected shape {format_shape(shape)}, found {format_shape(found)}"
            )
        tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        state[key] = tensor.reshape(shape).to(torch.float32)
    extra = sorted({k.rsplit(".", 1)[0] for k in arrays} - {k.rsplit(".", 1)[0] for k in expected})
    if extra:
        raise WeightsError(f"{origin}: layer {extra[0]}: has weights but no such layer in the net")
    return state


def build_vgg(
    spec: NetSpec,
    arrays: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    *,
    origin: str = "weights",
    class_names: Sequence[str] | str | None = None,
) -> VGG:
    """A VGG for ``spec`` whose parameters are ``arrays`` (checked; no random init is paid for),
    or with uninitialised (meta) parameters when ``arrays`` is None."""
    with torch.device("meta"):
        model = VGG(spec.config, spec.num_classes, spec.width, lrn_k=spec.lrn_k, class_names=class_names)
    if arrays is not None:
        model.load_state_dict(state_from_arrays(arrays, model, origin), strict=True, assign=True)
    return model
