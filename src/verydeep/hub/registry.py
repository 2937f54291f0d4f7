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


#: The paper's ILSVRC-2012 validation errors (top-1 %, top-5 %) of the two released nets, both
#: trained with scale jittering S in [256, 512]: (table, protocol, test scales Q, D, E).
_PAPER_ERRORS = (
    ("Table 3", "dense", (384,), (25.6, 8.1), (25.5, 8.0)),
    ("Table 4", "dense", (256, 384, 512), (24.8, 7.5), (24.8, 7.5)),
    ("Table 5", "multicrop", (256, 384, 512), (24.6, 7.5), (24.6, 7.4)),
    ("Table 5", "combined", (256, 384, 512), (24.4, 7.2), (24.4, 7.1)),
)
#: The model zoo's caffemodels: (name, config, depth, bytes, md5, parameters).
_ZOO = (
    ("vgg16", "D", 16, 553_432_081, "441315b0ff6932dbfde97731be7ca852", 138_357_544),
    ("vgg19", "E", 19, 574_671_192, "b5c644beabd7cf06bdd9065cfd674c97", 143_667_240),
)


def _zoo_entry(column: int, name: str, config: str, depth: int, size: int, md5: str, params: int) -> WeightsEntry:
    filename = f"VGG_ILSVRC_{depth}_layers.caffemodel"
    paper = tuple(PaperResult(t, protocol, q, *errors[column]) for t, protocol, q, *errors in _PAPER_ERRORS)
    return WeightsEntry(
        name=name,
        config=config,
        filename=filename,
        url=_VGG_SITE + filename,
        size=size,
        md5=md5,
        description=f"VGG-{depth} (config {config}), ILSVRC-2014, Caffe model zoo",
        num_params=params,
        paper=paper,
    )


REGISTRY: dict[str, WeightsEntry] = {row[0]: _zoo_entry(i, *row) for i, row in enumerate(_ZOO)}


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
