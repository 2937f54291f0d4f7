"""Caffe's text format (``deploy.prototxt``): read V1 or V2, normalise to V2, validate, write.

Everything downstream (graph, loader, VGG recognition) sees one form, the *normalised V2*
NetParameter: ``layer {}`` entries with string types, inputs as ``input`` + ``input_shape``.
V1 files (``layers {}``, enum types, ``input_dim``) are upgraded on reading the way Caffe's own
``UpgradeNetAsNeeded`` does, and can be written back for tools that only read V1.

This module also builds the Table 1 deploy nets (:func:`vgg_net`) and recognises them
(:func:`vgg_spec`), so a prototxt can be mapped onto the project's VGG module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from verydeep import configs
from verydeep.errors import CaffeFormatError
from verydeep.formats.caffe import caffe_pb2 as pb

NetParameter = pb.NetParameter
LayerParameter = pb.LayerParameter

#: V1 enum name -> V2 type string (Caffe's UpgradeV1LayerType).
V1_TO_V2: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}
V2_TO_V1: dict[str, str] = {v: k for k, v in V1_TO_V2.items() if v}

#: Layer types a deploy net may use (see :mod:`verydeep.formats.caffe.graph`).
COMPUTE_TYPES = (
    "Convolution",
    "ReLU",
    "Pooling",
    "LRN",
    "InnerProduct",
    "Dropout",
    "Softmax",
    "Concat",
    "Eltwise",
    "Flatten",
)
#: Layers that only feed data in; at deploy their first top is an input of the net.
INPUT_TYPES = ("Input", "Data", "ImageData", "DummyData", "MemoryData", "HDF5Data", "WindowData")
SUPPORTED_TYPES = COMPUTE_TYPES + INPUT_TYPES

_SEQUENCE_FIELDS = ("include", "exclude", "loss_weight", "blobs")


# ----------------------------------------------------------------------------- reading


def read_prototxt(source: str | os.PathLike[str]) -> NetParameter:
    """Parse a V1 or V2 prototxt (a path, or the text itself) into a validated, normalised V2 net.

    A ``str`` containing a newline or ``{`` is taken as the text; anything else as a path.
    Errors are :class:`CaffeFormatError` naming the file and the line (syntax) or the layer.
    """
    text, name = _load_text(source)
    net = _parse(text, name)
    net = upgrade(net, name)
    validate(net, name)
    return net


def _load_text(source: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(source, str) and ("\n" in source or "{" in source):
        return source, "<prototxt text>"
    path = os.fspath(source)
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise CaffeFormatError(f"{path}: no such prototxt file") from None
    except UnicodeDecodeError:
        raise CaffeFormatError(f"{path}: expected a text prototxt, found binary data (a .caffemodel?)") from None
    except OSError as e:
        raise CaffeFormatError(f"{path}: cannot read prototxt: {e.strerror}") from None


def _parse(text: str, name: str) -> NetParameter:
    """Strict parse; on an unknown field, first look for an unsupported layer type to blame."""
    net = NetParameter()
    try:
        text_format.Parse(text, net)
        return net
    except text_format.ParseError as err:
        line, col = err.GetLine(), err.GetColumn()
        detail = (str(err).split(" : ", 1)[-1] if line is not None else str(err)).replace("verydeep.caffe.", "caffe.")
        where = f"{name}:{line}:{col}" if line else name
        syntax = CaffeFormatError(f"{where}: syntax error: {detail}")
    lenient = NetParameter()
    try:
        text_format.Parse(text, lenient, allow_unknown_field=True)
    except text_format.ParseError:
        raise syntax from None
    _check_types(upgrade(lenient, name), name)  # raises the clearer error when a type is unsupported
    raise syntax


# ----------------------------------------------------------------------------- V1 <-> V2


def upgrade(net: NetParameter, source: str = "<net>") -> NetParameter:
    """A normalised V2 copy of ``net`` (V1 layers and ``input_dim`` upgraded as Caffe does)."""
    if net.layer and net.layers:
        raise CaffeFormatError(f"{source}: mixes V1 'layers' and V2 'layer' entries; use one format")
    out = NetParameter()
    out.CopyFrom(net)
    out.ClearField("layers")
    if net.input_dim:
        if net.input_shape or len(net.input_dim) != 4 * len(net.input):
            raise CaffeFormatError(
                f"{source}: expected 4 input_dim per input ({len(net.input)} inputs), found {len(net.input_dim)}"
            )
        out.ClearField("input_dim")
        for i in range(len(net.input)):
            out.input_shape.add().dim.extend(net.input_dim[4 * i : 4 * i + 4])
    for v1 in net.layers:
        out.layer.append(_upgrade_layer(v1))
    return out


def _upgrade_layer(v1: pb.V1LayerParameter) -> LayerParameter:
    enum = pb.V1LayerParameter.LayerType.Name(v1.type)
    layer = LayerParameter(name=v1.name, type=V1_TO_V2[enum], bottom=v1.bottom, top=v1.top)
    for field in _SEQUENCE_FIELDS:
        getattr(layer, field).extend(getattr(v1, field))
    for i in range(max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay))):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for field, value in v1.ListFields():
        if field.name.endswith("_param"):
            getattr(layer, field.name).CopyFrom(value)
    return layer


def downgrade(net: NetParameter, source: str = "<net>") -> NetParameter:
    """A V1 copy of ``net`` (any form): enum types, ``input_dim``, ``blobs_lr``/``weight_decay``.

    V1 has no Input layer: Input layers become net inputs. Types or parameters V1 cannot express
    are a :class:`CaffeFormatError`.
    """
    v2 = upgrade(net, source)
    out = NetParameter()
    out.CopyFrom(v2)
    for field in ("layer", "input", "input_shape"):
        out.ClearField(field)
    inputs = list(zip(v2.input, v2.input_shape))
    for layer in v2.layer:
        if layer.type == "Input":
            shapes = list(layer.input_param.shape)
            inputs += [(top, shapes[i if len(shapes) > 1 else 0]) for i, top in enumerate(layer.top)]
        else:
            out.layers.append(_downgrade_layer(layer, source))
    for name, shape in inputs:
        if len(shape.dim) != 4:
            raise CaffeFormatError(f"{source}: input {name!r}: V1 needs 4 input dims, found {list(shape.dim)}")
        out.input.append(name)
        out.input_dim.extend(shape.dim)
    return out


def _downgrade_layer(layer: LayerParameter, source: str) -> pb.V1LayerParameter:
    if layer.type not in V2_TO_V1:
        raise CaffeFormatError(f"{source}: layer {layer.name!r}: type {layer.type!r} has no V1 equivalent")
    v1 = pb.V1LayerParameter(name=layer.name, bottom=layer.bottom, top=layer.top)
    v1.type = pb.V1LayerParameter.LayerType.Value(V2_TO_V1[layer.type])
    for field in _SEQUENCE_FIELDS:
        getattr(v1, field).extend(getattr(layer, field))
    for spec in layer.param:
        if spec.HasField("name"):
            v1.param.append(spec.name)
    if any(s.HasField("lr_mult") for s in layer.param):
        v1.blobs_lr.extend(s.lr_mult for s in layer.param)
    if any(s.HasField("decay_mult") for s in layer.param):
        v1.weight_decay.extend(s.decay_mult for s in layer.param)
    v1_fields = pb.V1LayerParameter.DESCRIPTOR.fields_by_name
    for field, value in layer.ListFields():
        if field.name.endswith("_param") and field.name != "param":
            if field.name not in v1_fields:
                raise CaffeFormatError(f"{source}: layer {layer.name!r}: {field.name} has no V1 equivalent")
            getattr(v1, field.name).CopyFrom(value)
    return v1


# ----------------------------------------------------------------------------- writing


def format_prototxt(net: NetParameter, version: str = "V2") -> str:
    """The text of ``net`` as a V2 (``layer {}``) or V1 (``layers {}``) prototxt."""
    if version not in ("V1", "V2"):
        raise ValueError(f"version must be 'V1' or 'V2', not {version!r}")
    net = downgrade(net) if version == "V1" else upgrade(net)
    layers, key = (net.layers, "layers") if version == "V1" else (net.layer, "layer")
    head = NetParameter()
    head.CopyFrom(net)
    head.ClearField(key)
    parts = [text_format.MessageToString(head)]  # net fields first, then the layers in order
    for layer in layers:
        body = text_format.MessageToString(layer)
        parts.append(f"{key} {{\n" + "".join(f"  {line}\n" for line in body.splitlines()) + "}\n")
    return "".join(parts)


def write_prototxt(net: NetParameter, path: str | os.PathLike[str], version: str = "V2") -> None:
    """Write ``net`` as a V2 or V1 prototxt file."""
    Path(path).write_text(format_prototxt(net, version), encoding="utf-8")


# ----------------------------------------------------------------------------- validation


def active_layers(net: NetParameter) -> list[LayerParameter]:
    """The layers Caffe instantiates for ``net``'s state (TEST phase unless the net says otherwise)."""
    phase = net.state.phase if net.HasField("state") else pb.TEST
    level = net.state.level
    stages = set(net.state.stage)

    def meets(rule: pb.NetStateRule) -> bool:
        return (
            (not rule.HasField("phase") or rule.phase == phase)
            and (not rule.HasField("min_level") or level >= rule.min_level)
            and (not rule.HasField("max_level") or level <= rule.max_level)
            and all(s in stages for s in rule.stage)
            and not any(s in stages for s in rule.not_stage)
        )

    def included(layer: LayerParameter) -> bool:
        if layer.include:
            return any(meets(r) for r in layer.include)
        return not any(meets(r) for r in layer.exclude)

    return [layer for layer in net.layer if included(layer)]


def validate(net: NetParameter, source: str = "<net>") -> None:
    """Check a normalised net can run: supported types and parameters, every bottom produced earlier."""
    _check_types(net, source)
    blobs = set(net.input)
    for layer in active_layers(net):
        where = f"{source}: layer {layer.name!r} ({layer.type})"
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise CaffeFormatError(f"{where}: bottom {bottom!r} is not produced by an earlier layer or a net input")
        if layer.type == "Pooling" and layer.pooling_param.pool == pb.PoolingParameter.STOCHASTIC:
            raise CaffeFormatError(f"{where}: STOCHASTIC pooling is not supported (MAX and AVE are)")
        if layer.type in ("Convolution", "InnerProduct"):
            param = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
            if not param.num_output:
                raise CaffeFormatError(f"{where}: num_output is missing")
        conv = layer.convolution_param
        if layer.type == "Convolution" and not (conv.kernel_size or conv.kernel_h):
            raise CaffeFormatError(f"{where}: kernel_size is missing")
        if layer.type == "LRN" and layer.lrn_param.local_size % 2 == 0:
            raise CaffeFormatError(f"{where}: local_size must be odd, found {layer.lrn_param.local_size}")
        blobs.update(layer.top)


def _check_types(net: NetParameter, source: str) -> None:
    for layer in active_layers(net):
        if layer.type not in SUPPORTED_TYPES:
            found = repr(layer.type) if layer.type else "no type"
            raise CaffeFormatError(
                f"{source}: layer {layer.name!r}: unsupported layer type {found}; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )


# ----------------------------------------------------------------------------- geometry


def _pair(param: Any, name: str, default: int) -> tuple[int, int]:
    """Caffe's 2-D reading of a size field (``pad``, ``stride``, ``kernel``) with ``_h``/``_w`` overrides."""
    h, w = f"{name}_h", f"{name}_w"
    if param.HasField(h) or param.HasField(w):
        return getattr(param, h), getattr(param, w)
    field = "kernel_size" if name == "kernel" else name
    value = getattr(param, field)
    values = list(value) if not isinstance(value, int) else ([value] if param.HasField(field) else [])
    if not values:
        return default, default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def conv_geometry(p: pb.ConvolutionParameter) -> dict[str, tuple[int, int]]:
    """Kernel, stride, pad and dilation (each as (h, w)) of a Convolution layer."""
    dilation = list(p.dilation) or [1]
    return {
        "kernel": _pair(p, "kernel", 0),
        "stride": _pair(p, "stride", 1),
        "pad": _pair(p, "pad", 0),
        "dilation": (dilation[0], dilation[-1]),
    }


def pool_geometry(p: pb.PoolingParameter) -> dict[str, tuple[int, int]]:
    """Kernel, stride and pad (each as (h, w)) of a Pooling layer; ignore for ``global_pooling``."""
    return {"kernel": _pair(p, "kernel", 0), "stride": _pair(p, "stride", 1), "pad": _pair(p, "pad", 0)}


# ----------------------------------------------------------------------------- Table 1 nets

#: Names of the published deploy files' nets.
_PUBLISHED_NAMES = {"D": "VGG_ILSVRC_16_layers", "E": "VGG_ILSVRC_19_layers"}
#: Dense (fully convolutional) kernel of each fc layer: fc6 sees pool5 as 7x7.
_DENSE_KERNEL = {"fc6": configs.POOL5_SIZE, "fc7": 1, "fc8": 1}


def vgg_net(
    config: str,
    width: float = 1.0,
    num_classes: int = 1000,
    *,
    dense: bool = False,
    batch: int = 1,
    size: int = configs.CROP,
    version: str = "V2",
    lrn_k: float = configs.LRN_DEFAULTS["k"],
) -> NetParameter:
    """The deploy net of a Table 1 configuration, laid out and named like the published files.

    ``dense=True`` gives the fully convolutional net (fc6 a 7x7 convolution, fc7/fc8 1x1) with
    the same parameter names. ``version="V1"`` returns the V1 form (``layers``, ``input_dim``).
    """
    cfg = configs.canonical(config)
    net = NetParameter(name=_PUBLISHED_NAMES.get(cfg, f"VGG_{cfg}"), input=["data"])
    net.input_shape.add().dim.extend([batch, 3, size, size])
    blob = "data"
    for spec in configs.layer_specs(cfg, width, num_classes):
        layer = net.layer.add(name=spec.name, bottom=[blob])
        if spec.kind == "conv" or (spec.kind == "fc" and dense):
            kernel = spec.kernel if spec.kind == "conv" else _DENSE_KERNEL[spec.name]
            layer.type = "Convolution"
            layer.convolution_param.num_output = spec.out_channels
            if spec.kind == "conv" and kernel // 2:
                layer.convolution_param.pad.append(kernel // 2)
            layer.convolution_param.kernel_size.append(kernel)
        elif spec.kind == "fc":
            layer.type = "InnerProduct"
            layer.inner_product_param.num_output = spec.out_channels
        elif spec.kind == "relu":
            layer.type = "ReLU"
        elif spec.kind == "dropout":
            layer.type = "Dropout"
            layer.dropout_param.dropout_ratio = 0.5
        elif spec.kind == "lrn":
            layer.type = "LRN"
            lrn = configs.LRN_DEFAULTS
            layer.lrn_param.local_size = lrn["size"]
            layer.lrn_param.alpha = lrn["alpha"]
            layer.lrn_param.beta = lrn["beta"]
            layer.lrn_param.k = lrn_k
        elif spec.kind == "pool":
            layer.type = "Pooling"
            layer.pooling_param.pool = pb.PoolingParameter.MAX
            layer.pooling_param.kernel_size = 2
            layer.pooling_param.stride = 2
        else:
            raise AssertionError(f"unexpected layer kind {spec.kind!r}")
        if spec.kind not in ("relu", "dropout"):  # those work in place
            blob = spec.name
        layer.top.append(blob)
    net.layer.add(name="prob", type="Softmax", bottom=[blob], top=["prob"])
    return downgrade(net) if version == "V1" else net


def vgg_spec(net: NetParameter) -> configs.NetSpec | None:
    """The :class:`~verydeep.configs.NetSpec` of ``net`` when it is a Table 1 VGG, else None.

    The net must be the plain chain of :func:`vgg_net` (any batch/input size, V1 or V2, with or
    without dropout, the final Softmax, data layers and loss/accuracy heads) with Caffe's names on
    the conv and fc layers, so its parameters map onto the VGG module by name.
    """
    net = upgrade(net)
    layers = [l for l in active_layers(net) if not _ignored_by_vgg_spec(l)]
    if layers and layers[-1].type == "Softmax":
        layers.pop()
    if len(layers) < 2 or layers[0].name != "conv1_1" or layers[0].type != "Convolution":
        return None
    if not _is_chain(net, layers):
        return None
    num_outputs = {l.name: _num_output(l) for l in layers}
    num_classes, dense = num_outputs[layers[-1].name], layers[-1].type == "Convolution"
    # conv1_1 gives the width; fc6 (4096 wide) gives it more precisely when rounding hides it.
    widths = [num_outputs["conv1_1"] / configs.STAGE_CHANNELS[0], num_outputs.get("fc6", 0) / configs.FC_WIDTH]
    for width in dict.fromkeys(w for w in widths if w > 0):
        for config in configs.TABLE_1:
            specs = [s for s in configs.layer_specs(config, width, num_classes) if s.kind != "dropout"]
            if len(specs) == len(layers) and all(_is_table1_layer(l, s, dense) for l, s in zip(layers, specs)):
                lrn = [l.lrn_param.k for l in layers if l.type == "LRN"]
                k = lrn[0] if lrn else configs.LRN_DEFAULTS["k"]
                return configs.NetSpec(config, num_classes, width, k, dense)
    return None


def _ignored_by_vgg_spec(layer: LayerParameter) -> bool:
    """Inputs, dropout (identity at test) and the training heads a caffemodel's own net may carry."""
    return layer.type in INPUT_TYPES or layer.type in ("Dropout", "Accuracy") or layer.type.endswith("Loss")


def _num_output(layer: LayerParameter) -> int:
    return (layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param).num_output


def _is_chain(net: NetParameter, layers: list[LayerParameter]) -> bool:
    """Each layer reads the previous one's output, from a 3-channel input."""
    shapes = [s.dim for s in net.input_shape] + [
        s.dim for l in net.layer if l.type == "Input" for s in l.input_param.shape
    ]
    if any(len(dims) > 1 and dims[1] != 3 for dims in shapes):
        return False
    blob = layers[0].bottom[0] if len(layers[0].bottom) == 1 else None
    for layer in layers:
        if list(layer.bottom) != [blob] or len(layer.top) != 1:
            return False
        blob = layer.top[0]
    return True


def _is_table1_layer(layer: LayerParameter, spec: configs.LayerSpec, dense: bool) -> bool:
    """Whether ``layer`` is exactly the Table 1 layer ``spec`` (dense: fc as convolution)."""
    if spec.kind == "conv" or (spec.kind == "fc" and dense):
        p = layer.convolution_param
        k = spec.kernel if spec.kind == "conv" else _DENSE_KERNEL[spec.name]
        pad = k // 2 if spec.kind == "conv" else 0
        geometry = conv_geometry(p)
        return (
            layer.type == "Convolution"
            and layer.name == spec.name
            and p.num_output == spec.out_channels
            and geometry == {"kernel": (k, k), "stride": (1, 1), "pad": (pad, pad), "dilation": (1, 1)}
            and p.group == 1
            and p.bias_term
            and p.axis == 1
        )
    if spec.kind == "fc":
        p = layer.inner_product_param
        return (
            layer.type == "InnerProduct"
            and layer.name == spec.name
            and p.num_output == spec.out_channels
            and p.bias_term
            and p.axis == 1
            and not p.transpose
        )
    if spec.kind == "relu":
        return layer.type == "ReLU" and layer.relu_param.negative_slope == 0
    if spec.kind == "pool":
        p = layer.pooling_param
        return (
            layer.type == "Pooling"
            and p.pool == pb.PoolingParameter.MAX
            and not p.global_pooling
            and pool_geometry(p) == {"kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)}
            and p.round_mode == pb.PoolingParameter.CEIL
        )
    if spec.kind == "lrn":
        p, lrn = layer.lrn_param, configs.LRN_DEFAULTS
        return (
            layer.type == "LRN"
            and p.local_size == lrn["size"]
            and abs(p.alpha - lrn["alpha"]) < 1e-9
            and p.beta == lrn["beta"]
            and p.norm_region == pb.LRNParameter.ACROSS_CHANNELS
        )
    return False
