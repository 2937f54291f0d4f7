"""The paper's test protocols (Sec. 3.2, 4.1-4.3) as data, and where their crops sit.

Every protocol works at one or several test scales Q: the image is rescaled isotropically so
its shorter side is Q, and the soft-max outputs of the scales are averaged.

- ``center``: the central 224x224 crop (and its horizontal flip), run through the classic net.
- ``multicrop``: a regular 5x5 grid of 224x224 crops spanning the rescaled image, and their
  flips: 50 crops per scale; soft-max averaged over the crops.
- ``dense``: the fully convolutional net over the whole rescaled image; the class score map
  is averaged spatially, then soft-maxed; image and flip soft-max averaged.
- ``combined``: the mean of the dense and multi-crop soft-max outputs.

Free of torch: the command line builds its choices from the names here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from verydeep.configs import CROP
from verydeep.data.choices import INTERPOLATIONS
from verydeep.errors import VerydeepError

PROTOCOLS = ("center", "multicrop", "dense", "combined")
#: The paper's best settings for the released nets (trained with S jittered in [256, 512]):
#: Q = {256, 384, 512}; ``center`` keeps the seed's single 256 scale.
DEFAULT_SCALES: dict[str, tuple[int, ...]] = {
    "center": (256,),
    "multicrop": (256, 384, 512),
    "dense": (256, 384, 512),
    "combined": (256, 384, 512),
}
#: Where the multi-crop grid's crops sit: "span" puts the outer crops at the image's corners and
#: spaces the rest evenly (the crops cover the image; the middle one is the center crop);
#: "cells" centres one crop on each cell of a 5x5 partition, shifted inside the image.
GRIDS = ("span", "cells")
#: Dense evaluation: average the class score map over positions before the soft-max ("scores",
#: the paper's sum-pooling of class scores) or average the per-position soft-max ("softmax").
DENSE_AVERAGES = ("scores", "softmax")
#: Which crop set the classic net sees under each protocol (absent: none).
_CROP_SETS = {"center": "center", "multicrop": "multicrop", "combined": "multicrop"}


# -- the protocol ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """What is computed for each image; every choice the paper leaves open is a field."""

    name: str = "dense"
    scales: tuple[int, ...] = DEFAULT_SCALES["dense"]
    flip: bool = True
    interpolation: str = "bilinear"
    grid: str = "span"
    grid_size: int = 5
    dense_average: str = "scores"

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise VerydeepError(f"unknown protocol {self.name!r}; expected one of {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "scales", tuple(int(q) for q in self.scales))
        if not self.scales:
            raise VerydeepError("at least one test scale Q is needed")
        if min(self.scales) < CROP:
            raise VerydeepError(f"test scale Q={min(self.scales)} is smaller than the {CROP}x{CROP} crop")
        if len(set(self.scales)) != len(self.scales):
            raise VerydeepError(f"test scales repeat: {list(self.scales)}")
        for value, choices, what in (
            (self.interpolation, INTERPOLATIONS, "interpolation"),
            (self.grid, GRIDS, "grid"),
            (self.dense_average, DENSE_AVERAGES, "dense average"),
        ):
            if value not in choices:
                raise VerydeepError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
        if self.grid_size < 1:
            raise VerydeepError(f"grid size must be positive, found {self.grid_size}")

    @classmethod
    def make(cls, name: str = "dense", scales: Sequence[int] | None = None, **kw: Any) -> Protocol:
        """A protocol with the paper's default scales for ``name`` unless ``scales`` are given."""
        if name not in PROTOCOLS:
            raise VerydeepError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
        return cls(name, tuple(scales) if scales else DEFAULT_SCALES[name], **kw)

    @property
    def uses_crops(self) -> str | None:
        """Which crop set the classic net sees: "center", "multicrop" or None."""
        return _CROP_SETS.get(self.name)

    @property
    def uses_dense(self) -> bool:
        return self.name in ("dense", "combined")

    def crops_per_scale(self) -> int:
        n = 1 if self.name == "center" else self.grid_size**2
        return n * (2 if self.flip else 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (as they read back from a scores file)."""
        return {**asdict(self), "scales": list(self.scales)}

    def describe(self) -> str:
        return f"{self.name} Q={','.join(map(str, self.scales))}{'' if self.flip else ' no-flip'}"


# -- geometry -------------------------------------------------------------------------------------
def center_offset(length: int, crop: int = CROP) -> int:
    """Offset of a centred crop (rounded as torchvision's center_crop rounds)."""
    return int(round((length - crop) / 2.0))


def grid_offsets(length: int, crop: int = CROP, *, n: int = 5, placement: str = "span") -> list[int]:
    """Start offsets of ``n`` crops along one side of length ``length`` (all inside it)."""
    if length < crop:
        raise VerydeepError(f"a {crop}-pixel crop does not fit in {length} pixels")
    room = length - crop
    if n == 1:
        return [center_offset(length, crop)]
    if placement == "span":  # first at 0, last at room, the middle one is the centre crop's
        return [int(round(room * i / (n - 1))) for i in range(n)]
    if placement == "cells":  # centred on each of n equal cells, shifted inside the image
        return [min(room, max(0, int(round((i + 0.5) * length / n - crop / 2)))) for i in range(n)]
    raise VerydeepError(f"unknown grid placement {placement!r}; expected one of {', '.join(GRIDS)}")


def crop_boxes(height: int, width: int, protocol: Protocol) -> list[tuple[int, int]]:
    """(top, left) of the 224x224 crops of a rescaled image, before flips."""
    if protocol.uses_crops == "center":
        return [(center_offset(height), center_offset(width))]
    rows = grid_offsets(height, CROP, n=protocol.grid_size, placement=protocol.grid)
    cols = grid_offsets(width, CROP, n=protocol.grid_size, placement=protocol.grid)
    return [(t, l) for t in rows for l in cols]
