"""The VGG nets as torch modules, built from the paper's Table 1 (:mod:`verydeep.configs`).

- :mod:`.vgg`: :class:`VGG` (the classic net with Caffe's layer names, feature taps by name),
  :class:`DenseVGG` (the fully convolutional view sharing its parameters),
  :func:`spatial_average`.
- :mod:`.build`: from stored arrays to a ready VGG: :func:`vgg_spec_from_shapes` recognises the
  configuration, :func:`shape_fits` is the one rule for whether an array fits a parameter,
  :func:`build_vgg` builds without paying for a random init.
- :mod:`.classes`: the ILSVRC-2012 class names in the models' output order.

Modules here take Caffe-space input (BGR, 0..255, mean pixel subtracted) and know nothing about
files; the formats that fill them are in :mod:`verydeep.formats`.
"""

from verydeep.models.build import build_vgg, shape_fits, state_from_arrays, vgg_spec_from_shapes
from verydeep.models.classes import imagenet_classes
from verydeep.models.vgg import IMAGENET, VGG, DenseVGG, spatial_average

__all__ = [
    "IMAGENET",
    "VGG",
    "DenseVGG",
    "build_vgg",
    "imagenet_classes",
    "shape_fits",
    "spatial_average",
    "state_from_arrays",
    "vgg_spec_from_shapes",
]
