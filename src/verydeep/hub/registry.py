"""The official weights verydeep knows by name, as typed records.

Each entry carries what a user needs to trust and use the file without reading the paper:
where it comes from and how to verify it, the net it builds, the input space its parameters
expect, its size, the paper's published errors with the protocol that produced them, and the
licence. The checksums come from third-party download scripts, not from the VGG site.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from verydeep.errors import WeightsError

#: The input space every official caffemodel expects (and verydeep's VGG takes).
CAFFE_INPUT = "caffe-bgr-0-255-mean-subtracted"
LICENSE = (
    "VGG team, Oxford: CC BY 4.0 per the VGG site (robots.ox.ac.uk/~vgg/research/very_deep/); "
    "the model-zoo gist says CC BY-NC 4.0"
)
_VGG_SITE = "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/"


@dataclass(frozen=True)
class PaperResult:
    """One published ILSVRC-2012 validation result (Simonyan & Zisserman, arXiv:1409.1556)."""

    table: str  # where in the paper, e.g. "Table 4"
    protocol: str  # the test protocol, in `verydeep evaluate` terms
    scales: tuple[int, ...]  # test scales Q
    top1_error: float  # percent
    top5_error: float  # percent


@dataclass(frozen=True)
class WeightsEntry:
    """An official model: the file, how to recognise it, the net it builds and what it scored."""

    name: str
    config: str  # Table 1 configuration
    filename: str
    url: str
    size: int  # bytes
    md5: str
    description: str
    num_params: int
    num_classes: int = 1000
    input_space: str = CAFFE_INPUT
    license: str = LICENSE
    source: str = "Caffe model zoo (VGG team, ILSVRC-2014)"
    paper: tuple[PaperResult, ...] = field(default_factory=tuple)


REGISTRY: dict[str, WeightsEntry] = {
    "vgg16": WeightsEntry(
        name="vgg16",
        config="D",
        filename="VGG_ILSVRC_16_layers.caffemodel",
        url=_VGG_SITE + "VGG_ILSVRC_16_layers.caffemodel",
        size=553_432_081,
        md5="441315b0ff6932dbfde97731be7ca852",
        description="VGG-16 (config D), ILSVRC-2014, Caffe model zoo",
        num_params=138_357_544,
        paper=(
            PaperResult("Table 3", "dense", (384,), 25.6, 8.1),
            PaperResult("Table 4", "dense", (256, 384, 512), 24.8, 7.5),
            PaperResult("Table 5", "multicrop", (256, 384, 512), 24.6, 7.5),
            PaperResult("Table 5", "combined", (256, 384, 512), 24.4, 7.2),
        ),
    ),
    "vgg19": WeightsEntry(
        name="vgg19",
        config="E",
        filename="VGG_ILSVRC_19_layers.caffemodel",
        url=_VGG_SITE + "VGG_ILSVRC_19_layers.caffemodel",
        size=574_671_192,
        md5="b5c644beabd7cf06bdd9065cfd674c97",
        description="VGG-19 (config E), ILSVRC-2014, Caffe model zoo",
        num_params=143_667_240,
        paper=(
            PaperResult("Table 3", "dense", (384,), 25.5, 8.0),
            PaperResult("Table 4", "dense", (256, 384, 512), 24.8, 7.5),
            PaperResult("Table 5", "multicrop", (256, 384, 512), 24.6, 7.4),
            PaperResult("Table 5", "combined", (256, 384, 512), 24.4, 7.1),
        ),
    ),
}


def get_entry(name: str) -> WeightsEntry:
    """The registry entry ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in REGISTRY:
        raise WeightsError(f"unknown weights {name!r}; registry names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def list_weights() -> list[WeightsEntry]:
    """Every official model verydeep can download by name, in registry order."""
    return list(REGISTRY.values())


def url_of(entry: WeightsEntry) -> str:
    """The download URL; ``$VERYDEEP_MIRROR`` (a base URL) replaces the VGG site."""
    mirror = os.environ.get("VERYDEEP_MIRROR")
    return f"{mirror.rstrip('/')}/{entry.filename}" if mirror else entry.url
