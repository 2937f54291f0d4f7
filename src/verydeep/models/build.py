"""From arrays to a ready VGG: recognise the net from parameter shapes, check every array
against the parameter it fills, build the module without paying for a random init.

Every loader (caffemodel, safetensors, torchvision ``.pth``, Keras ``.h5``, a Caffe graph's
blobs) checks shapes with the one rule :func:`shape_fits`, and every VGG they build passes its
values through :func:`checked_tensor` (dense, floating point, finite), so a file that loads
through one format loads through all of them, and a bad one is refused by all for one reason.
:func:`error_reason` quotes a library's exception, :func:`quote` a name or value found in a file,
inside such a one-line message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence

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


def candidate_widths(channels: Mapping[int, int | None]) -> list[float]:
    """The widths that give the channels found (Table 1's channels -> channels found, None where
    unknown), widest layer first: a narrow net's channel counts are rounded (VGG at 1/256 has one
    channel in conv1 and in conv2), so the widest layer tells the width best."""
    out: list[float] = []
    for table, found in sorted(channels.items(), reverse=True):
        if found is not None and found >= 1 and found / table not in out:
            out.append(found / table)
    return out


def _channels(shape: Sequence[int] | None) -> int | None:
    return int(shape[0]) if shape is not None and len(shape) > 0 else None


def vgg_spec_from_shapes(shapes: Mapping[str, Sequence[int]]) -> NetSpec | None:
    """The Table 1 net whose parameters (Caffe names) have these shapes, or None.

    LRN has no parameters, so A-LRN's parameters read as A's. Any shape is taken (0-d, empty):
    this only recognises, :func:`state_from_arrays` explains what does not fit.
    """
    fc8 = shapes.get("fc8.bias")
    num_classes = math.prod(fc8) if fc8 is not None else 0
    widths = candidate_widths(
        {
            configs.FC_WIDTH: _channels(shapes.get("fc7.weight")),
            configs.STAGE_CHANNELS[4]: _channels(shapes.get("conv5_1.weight")),
            configs.STAGE_CHANNELS[0]: _channels(shapes.get("conv1_1.weight")),
        }
    )
    if num_classes < 1:
        return None
    for config in configs.TABLE_1:
        for width in widths:
            expected = configs.param_shapes(config, width, num_classes)
            if set(expected) == set(shapes) and all(shape_fits(shapes[k], s) for k, s in expected.items()):
                try:
                    return NetSpec(config, num_classes, width)
                except ValueError:  # a width NetSpec refuses: no Table 1 net
                    return None
    return None


def default_class_names(num_classes: int) -> str | None:
    """ImageNet's names (looked up when first used) for a 1000-class net, else none."""
    return IMAGENET if num_classes == 1000 else None


def shape_error(origin: str, key: str, expected: Sequence[int], found: Sequence[int]) -> WeightsError:
    """The one message for an array that does not fit parameter ``key``."""
    layer, kind = key.rsplit(".", 1)
    return WeightsError(
        f"{origin}: layer {layer}: {kind} expected shape {format_shape(expected)}, found {format_shape(found)}"
    )


def to_float32(array: np.ndarray) -> np.ndarray:
    """``array`` as float32, without numpy's overflow warning: float64 values beyond float32's range
    become inf, which :func:`checked_tensor` refuses naming the tensor (a warning would say nothing more)."""
    with np.errstate(over="ignore"):
        return np.asarray(array, dtype=np.float32)


def dense_problem(value: torch.Tensor) -> str | None:
    """Why ``value`` holds no dense data (sparse, meta), or None: checked before its storage is read."""
    if value.device.type == "meta":
        return "expected a dense tensor, found a meta tensor (no data)"
    if value.layout != torch.strided:
        return f"expected a dense tensor, found a {value.layout} tensor"
    return None


def tensor_problem(value: np.ndarray | torch.Tensor) -> str | None:
    """Why ``value`` cannot be a parameter's values (:func:`dense_problem`, or not floating point), or None."""
    if isinstance(value, torch.Tensor):
        problem = dense_problem(value)
        if problem is not None:
            return problem
        floating = value.is_floating_point()
    else:
        floating = value.dtype.kind == "f"
    return None if floating else f"expected floating-point values, found dtype {value.dtype}"


def checked_tensor(origin: str, key: str, value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``value`` as a float32 CPU tensor, refused (naming the tensor) unless it holds real numbers.

    Parameters must be dense floating-point values: an integer, boolean or complex array is not a
    weight (converting it would hide a wrong file), a sparse or meta tensor holds no dense data
    (:func:`tensor_problem`). Non-finite values are refused rather than warned about: one NaN or
    inf in any parameter reaches every score after that layer (ReLU and max pooling pass NaN on),
    so the net computes nothing usable, and no trained VGG holds one; the error names the tensor
    to look at.
    """
    problem = tensor_problem(value)
    if problem is not None:
        raise WeightsError(f"{origin}: {key}: {problem}")
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(to_float32(value))
    else:
        tensor = value.detach().to("cpu", torch.float32)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor.numel() - int(finite.sum())
        raise WeightsError(
            f"{origin}: {key}: {bad} of {tensor.numel()} values are NaN or infinite; a net with them computes "
            "no usable score"
        )
    return tensor


def state_from_arrays(
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    model: nn.Module,
    origin: str,
    *,
    absent: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Match ``arrays`` to ``model``'s parameters by name, each checked with :func:`shape_fits`
    and :func:`checked_tensor` and reshaped to the parameter's shape. Errors name the file, the
    layer, expected and found.

    Layers in ``absent`` are ones the file does not hold (a Keras file saved without its top):
    their parameters are NaN, so that no score computed through them can pass for a real one.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        layer, kind = key.rsplit(".", 1)
        if layer in absent:
            state[key] = torch.full(shape, float("nan"))
            continue
        if key not in arrays:
            raise WeightsError(f"{origin}: layer {layer}: missing {kind} (expected shape {format_shape(shape)})")
        value = arrays[key]
        if not shape_fits(tuple(value.shape), shape):
            raise shape_error(origin, key, shape, tuple(value.shape))
        state[key] = checked_tensor(origin, key, value).reshape(shape)
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
    absent: Collection[str] = (),
) -> VGG:
    """A VGG for ``spec`` whose parameters are ``arrays`` (checked; no random init is paid for),
    or with uninitialised (meta) parameters when ``arrays`` is None. ``absent``: layers the file
    lacks, filled with NaN (see :func:`state_from_arrays`)."""
    with torch.device("meta"):
        model = VGG(spec.config, spec.num_classes, spec.width, lrn_k=spec.lrn_k, class_names=class_names)
    if arrays is not None:
        model.load_state_dict(state_from_arrays(arrays, model, origin, absent=absent), strict=True, assign=True)
    return model


#: Bytes of tensors a weights file may claim per byte it holds. A format may compress (a zip
#: member of a ``.pth``, a gzip-filtered HDF5 dataset), but trained weights are noise in their
#: low bits and shrink to about 90%; 16x allows any honest compression and refuses bombs (deflate
#: reaches 1032x) and views that repeat one stored value (stride 0) before they are expanded.
MAX_EXPANSION = 16

#: Longest library error text quoted in a message: the first sentence is the reason, the rest
#: (stack-like detail, hex dumps) would not fit on the one line the CLI prints.
REASON_CHARS = 160


def check_claimed(origin: str, what: str, claimed: int, size: int) -> None:
    """Refuse ``claimed`` bytes of tensors from a file of ``size`` bytes beyond :data:`MAX_EXPANSION`."""
    if claimed > MAX_EXPANSION * max(size, 1):
        raise WeightsError(
            f"{origin}: {what} claims {claimed:,} bytes, more than {MAX_EXPANSION}x the file's {size:,} bytes"
        )


def quote(value: object, limit: int = 40) -> str:
    """``value``'s repr cut to about ``limit`` characters, for a name or value found in a file: a
    string is cut before its repr is made (a file's string may be megabytes), and stays quoted."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def error_reason(error: BaseException) -> str:
    """``TypeName: first sentence`` of a library's exception, one printable line, never empty.

    Library messages may be empty, span lines, carry terminal colour codes or control
    characters, or be only punctuation; whatever they are, the loaders' own one-line message
    must survive quoting them.
    """
    try:
        text = str(error)
    except Exception:  # a broken __str__ must not take the error path down with it
        text = ""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = "".join(c if c.isprintable() else " " for c in line).split(". ")[0].strip().rstrip(".")
    if len(line) > REASON_CHARS:
        line = line[:REASON_CHARS].rsplit(" ", 1)[0] + " ..."
    name = type(error).__name__
    return f"{name}: {line}" if line.strip(" .") else name
