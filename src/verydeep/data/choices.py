"""The names of the data choices a user makes (rescaling, label layouts), free of torch, so the
command line can offer them without importing it (``verydeep evaluate --help`` stays quick)."""

from __future__ import annotations

#: Rescaling: name -> (torchvision ``InterpolationMode`` member, antialias). "bilinear" is
#: Pillow's / Matlab imresize's antialiased shrink; "bilinear-opencv" is cv2.resize(INTER_LINEAR),
#: what Caffe's data layers use. Antialiasing only changes a shrink with the bilinear and bicubic
#: filters.
INTERPOLATION_MODES: dict[str, tuple[str, bool]] = {
    "bilinear": ("BILINEAR", True),
    "bicubic": ("BICUBIC", True),
    "bilinear-opencv": ("BILINEAR", False),
    "nearest": ("NEAREST", False),
    "lanczos": ("LANCZOS", True),
}
#: The rescaling names, in the order ``--interpolation`` lists them.
INTERPOLATIONS: tuple[str, ...] = tuple(INTERPOLATION_MODES)

#: Layouts of a labelled image set (:mod:`verydeep.data.eval_set`); "auto" detects one.
LAYOUTS = ("auto", "imagefolder", "caffe", "devkit", "kaggle", "unlabeled")
