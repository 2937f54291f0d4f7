"""From images to the model's input space: Caffe's BGR, 0..255, mean pixel subtracted.

This and ``export --input`` are the only places that convert between colour spaces, so the
RGB/BGR mistakes users of the Caffe model hit cannot happen elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import numpy as np
import torch
from PIL import Image, ImageOps

from verydeep.configs import CROP, MEAN_BGR
from verydeep.data.choices import INTERPOLATION_MODES
from verydeep.errors import ImageError, VerydeepError

#: Resize size of the seed's single-crop preprocessing (shorter side).
RESIZE = 256

ImageLike: TypeAlias = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image, honouring EXIF orientation.

    Raises :class:`ImageError` naming the file for anything Pillow cannot decode.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, P, RGBA, CMYK, I;16, F, ...) -> 8-bit RGB, EXIF rotation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_uint8_chw(image: ImageLike) -> torch.Tensor:
    """One image (PIL, HxWx3 / HxW uint8 RGB array, 3xHxW uint8 tensor, or path) -> 3xHxW uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"expected a uint8 RGB array, found dtype {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageError(f"expected an HxWx3 RGB array, found shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ImageError(f"expected a 3xHxW uint8 RGB tensor, found {tuple(image.shape)} {image.dtype}")
        return image
    raise ImageError(f"cannot read an image from {type(image).__name__}")


def rescale(image: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Isotropic rescale of a ...x3xHxW image so its shorter side is ``size`` (the paper's S or Q);
    ``interpolation`` is a name of :data:`~verydeep.data.choices.INTERPOLATION_MODES`.

    torchvision is imported here, where an image is first transformed, not at import: it costs
    about a second, which loading weights should not pay.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if interpolation not in INTERPOLATION_MODES:
        raise VerydeepError(
            f"unknown interpolation {interpolation!r}; expected one of {', '.join(INTERPOLATION_MODES)}"
        )
    mode, antialias = INTERPOLATION_MODES[interpolation]
    return TF.resize(image, [size], interpolation=getattr(InterpolationMode, mode), antialias=antialias)


def center_crop(image: torch.Tensor, crop: int = CROP) -> torch.Tensor:
    """The central ``crop`` x ``crop`` square of a ...xHxW image (torchvision's rounding)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(image, [crop, crop])


def to_caffe(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) RGB, ...x3xHxW -> float32 BGR with the mean pixel subtracted
    (float64 input stays float64, so float64 references and gradient checks stay exact)."""
    dtype = torch.float64 if rgb.dtype == torch.float64 else torch.float32
    x = rgb.to(dtype).flip(-3)
    mean = torch.tensor(MEAN_BGR, dtype=dtype, device=x.device).view(3, 1, 1)
    return x - mean


def from_caffe(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_caffe`: float BGR mean-subtracted -> float RGB 0..255."""
    mean = torch.tensor(MEAN_BGR, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x + mean).flip(-3)


def center_crop_caffe(
    image: ImageLike, size: int = RESIZE, crop: int = CROP, interpolation: str = "bilinear"
) -> torch.Tensor:
    """The seed's single-crop preprocessing of one image: shorter side to ``size``, central
    ``crop`` x ``crop``, to Caffe space. Returns 3 x crop x crop float32."""
    return to_caffe(center_crop(rescale(to_uint8_chw(image), size, interpolation), crop))


def preprocess(
    images: ImageLike | Sequence[ImageLike] | Iterable[ImageLike],
    size: int = RESIZE,
    crop: int = CROP,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Images -> N x 3 x crop x crop float32 Caffe input (a single image gives N=1)."""
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor, str, os.PathLike)):
        if not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
            images = [images]
    return torch.stack([center_crop_caffe(im, size, crop, interpolation) for im in images])
