"""The paper's Table 1 as data.

Each configuration is five convolutional stages; a stage lists its layers in order. An int is
a convolution with that kernel size (3, or 1 for config C's 1x1 layers), ``"LRN"`` is the local
response normalisation of config A-LRN. Every stage ends with a 2x2/2 max pool; three fully
connected layers (fc6, fc7, fc8) follow. Layer names follow Caffe's VGG deploy files:
``conv{stage}_{i}``, ``relu{stage}_{i}``, ``norm1``, ``pool{stage}``, ``fc6``...``fc8``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A stage's layers: an int is a convolution's kernel size, "LRN" local response normalisation.
Stage = tuple[int | str, ...]

#: Table 1 of Simonyan & Zisserman (arXiv:1409.1556).
TABLE_1: dict[str, tuple[Stage, ...]] = {
    "A": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "A-LRN": ((3, "LRN"), (3,), (3, 3), (3, 3), (3, 3)),
    "B": ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3)),
    "C": ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    "D": ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "E": ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}

#: The mean pixel of the training set, in Caffe's channel order (B, G, R): the model's input is
#: BGR, 0..255, with this subtracted (the model-zoo page).
MEAN_BGR = (103.939, 116.779, 123.68)

#: Output channels of each stage's convolutions (Table 1: conv3-64 ... conv3-512).
STAGE_CHANNELS = (64, 128, 256, 512, 512)
#: Width of fc6 and fc7.
FC_WIDTH = 4096
#: The fully connected layers see pool5 as 7x7 (224 / 2**5).
POOL5_SIZE = 7
#: Training/test crop size.
CROP = 224

# -- the bounds every option shares (train's config and the command line check against these) --
#: The largest rescale (shorter side S or Q): twice the paper's S_max of 512. The crop is 224, so
#: larger rescales only cost memory (a 32:1 panorama at S = 1024 is 100 MB of pixels).
MAX_SCALE = 1024
#: The widest net ``width`` may ask for: 4x the paper's channels is 16x its 138M parameters,
#: ~35 GB with gradients and momentum, beyond any one GPU; narrow nets (1/16) are for tests.
MAX_WIDTH = 4.0
#: Loader processes per rank: each holds a copy of the file list; beyond this they exhaust the
#: process and file limits long before decoding gets faster (the default is at most 8).
MAX_LOADER_WORKERS = 256

#: Common names for configurations.
ALIASES = {"vgg11": "A", "vgg11-lrn": "A-LRN", "vgg13": "B", "vgg16-c": "C", "vgg16": "D", "vgg19": "E"}

#: Caffe's LRN defaults as used by the paper (AlexNet's): size 5, alpha 1e-4, beta 0.75;
#: k is Caffe's default 1 unless a prototxt says otherwise (the paper cites k=2).
LRN_DEFAULTS = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}


@dataclass(frozen=True)
class NetSpec:
    """What builds one Table 1 net: the configuration, the classes, the width, LRN's k.

    ``width`` narrows every layer's channels (fc6/fc7 included) for test nets; ``dense`` marks a
    deploy net whose fc layers are written as convolutions (it changes the Caffe file, not the
    parameters). A recognised prototxt, caffemodel or state dict comes back as one of these.
    """

    config: str
    num_classes: int = 1000
    width: float = 1.0
    lrn_k: float = LRN_DEFAULTS["k"]
    dense: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", canonical(self.config))
        if int(self.num_classes) < 1 or not 0 < float(self.width) <= 1e3:
            raise ValueError(f"NetSpec: num_classes {self.num_classes} and width {self.width} must be positive")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "lrn_k", float(self.lrn_k))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape (Caffe's layout) for this net."""
        return param_shapes(self.config, self.width, self.num_classes)

    def num_params(self) -> int:
        return num_params(self.config, self.width, self.num_classes)


def canonical(config: str) -> str:
    """Return the Table 1 key for ``config`` ("d", "D", "vgg16" -> "D")."""
    key = config.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    if key.upper() in TABLE_1:
        return key.upper()
    raise ValueError(f"unknown VGG configuration {config!r}; known: {', '.join(TABLE_1)}")


def scaled(channels: int, width: float) -> int:
    """Channels of a layer in a net narrowed by ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the classic net, in forward order."""

    name: str  # Caffe layer name, e.g. "conv3_2"
    kind: str  # "conv", "relu", "lrn", "pool", "flatten", "fc", "dropout"
    in_channels: int = 0
    out_channels: int = 0
    kernel: int = 0


def layer_specs(config: str, width: float = 1.0, num_classes: int = 1000) -> list[LayerSpec]:
    """Expand a Table 1 configuration into Caffe-named layers in forward order."""
    stages = TABLE_1[canonical(config)]
    specs: list[LayerSpec] = []
    channels = 3
    for s, (stage, out) in enumerate(zip(stages, STAGE_CHANNELS), start=1):
        out = scaled(out, width)
        i = 0
        for item in stage:
            if item == "LRN":
                specs.append(LayerSpec(f"norm{s}", "lrn", channels, channels))
                continue
            i += 1
            specs.append(LayerSpec(f"conv{s}_{i}", "conv", channels, out, int(item)))
            specs.append(LayerSpec(f"relu{s}_{i}", "relu", out, out))
            channels = out
        specs.append(LayerSpec(f"pool{s}", "pool", channels, channels, 2))
    fc = scaled(FC_WIDTH, width)
    flat = channels * POOL5_SIZE * POOL5_SIZE
    specs += [
        LayerSpec("fc6", "fc", flat, fc),
        LayerSpec("relu6", "relu", fc, fc),
        LayerSpec("drop6", "dropout", fc, fc),
        LayerSpec("fc7", "fc", fc, fc),
        LayerSpec("relu7", "relu", fc, fc),
        LayerSpec("drop7", "dropout", fc, fc),
        LayerSpec("fc8", "fc", fc, num_classes),
    ]
    return specs


def param_shapes(config: str, width: float = 1.0, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, in Caffe's layout (conv OIHW, fc (out, in))."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in layer_specs(config, width, num_classes):
        if spec.kind == "conv":
            shapes[f"{spec.name}.weight"] = (spec.out_channels, spec.in_channels, spec.kernel, spec.kernel)
            shapes[f"{spec.name}.bias"] = (spec.out_channels,)
        elif spec.kind == "fc":
            shapes[f"{spec.name}.weight"] = (spec.out_channels, spec.in_channels)
            shapes[f"{spec.name}.bias"] = (spec.out_channels,)
    return shapes


def num_params(config: str, width: float = 1.0, num_classes: int = 1000) -> int:
    """Number of learned parameters (weights and biases) of a Table 1 net."""
    total = 0
    for shape in param_shapes(config, width, num_classes).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def multiply_adds(config: str, size: int = CROP, width: float = 1.0, num_classes: int = 1000) -> int:
    """Multiply-adds of one forward pass of the classic net at ``size`` x ``size``."""
    total, hw = 0, size
    for spec in layer_specs(config, width, num_classes):
        if spec.kind == "conv":
            total += hw * hw * spec.out_channels * spec.in_channels * spec.kernel * spec.kernel
        elif spec.kind == "pool":
            hw = -(-(hw - 2) // 2) + 1  # Caffe rounds up
        elif spec.kind == "fc":
            total += spec.in_channels * spec.out_channels
    return total
