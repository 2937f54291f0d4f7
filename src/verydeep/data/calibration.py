"""int8 calibration images from a folder: what ``--calibration DIR`` reads.

The images are preprocessed as the center-crop protocol does (shorter side to 256, the central
224x224, Caffe's BGR minus the mean pixel), so the ranges calibration measures are the ranges the
net sees in use. Unreadable files are skipped (and counted); the first ``count`` readable images
in file-name order (or the order of the command's inputs) are used, so a run is repeatable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from verydeep.data.images import resolve_inputs
from verydeep.data.preprocess import center_crop_caffe
from verydeep.errors import ImageError, VerydeepError


def calibration_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], count: int) -> torch.Tensor:
    """Up to ``count`` images of ``source`` as a Caffe-space N x 3 x 224 x 224 batch: a folder,
    list file or image (resolved, in file-name order), or a sequence of image paths (taken in its
    order, as a command's own inputs come); one line of error when none can be read."""
    if isinstance(source, (str, os.PathLike)):
        paths: Sequence[str | os.PathLike[str]] = sorted(resolve_inputs(source))
    else:
        paths = source  # already image paths: no need to stat every one of a 50,000-image set
    crops: list[torch.Tensor] = []
    first_error = ""
    for path in paths:
        if len(crops) == count:
            break
        try:
            crops.append(center_crop_caffe(path))
        except ImageError as e:
            first_error = first_error or str(e)
    if not crops:
        why = f" (first: {first_error})" if first_error else ""
        raise VerydeepError(f"{source}: --calibration found no readable images among {len(paths)} files{why}")
    return torch.stack(crops)
