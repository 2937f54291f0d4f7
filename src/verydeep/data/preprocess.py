"""From images to the model's input space: Caffe's BGR, 0..255, mean pixel subtracted.

This and ``export --input`` are the only places that convert between colour spaces, so the
RGB/BGR mistakes users of the Caffe model hit cannot happen elsewhere.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from verydeep.configs import CROP, MEAN_BGR
from verydeep.data.choices import INTERPOLATION_MODES
from verydeep.errors import ImageError, VerydeepError

#: Resize size of the seed's single-crop preprocessing (shorter side).
RESIZE = 256

ImageLike: TypeAlias = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


#: The most pixels (width x height) an image file may have. The nets see every image rescaled
#: so its shorter side is S or Q, at most 512 in the paper (training S_max, the largest test
#: scale), so detail beyond a few megapixels is thrown away; 2**26 (8192 x 8192) still takes
#: every camera photo up to 61 MP whole, and bounds a decode at 256 MB (Pillow keeps 4 bytes a
#: pixel) where a 69-byte PNG can claim 1 x 100,000,000. Checked from the header, before any
#: pixel is decoded.
MAX_PIXELS = 2**26
#: The most an image's longer side may exceed its shorter side: rescaled to S or Q = 512, a
#: 32:1 panorama is 512 x 16,384 (~100 MB as float32); a 1 x 30,000,000 strip within
#: :data:`MAX_PIXELS` would be 512 x 15 billion.
MAX_ASPECT = 32
#: The Pillow decoders verydeep opens (the formats of ``images.IMAGE_SUFFIXES``). Pillow would
#: also try 40 others by content (EPS runs Ghostscript); none of them holds photos.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
#: Pillow's messages are short; longer ones are cut so a report stays one readable line.
_REASON_CHARS = 300


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image, honouring EXIF orientation.

    The one place files are decoded: the size is checked against :data:`MAX_PIXELS` and
    :data:`MAX_ASPECT` from the header, and anything that goes wrong (truncated or
    unidentified files, decompression bombs, a corrupt EXIF block, a decoder running out of
    memory) is an :class:`ImageError` naming the file, which jobs skip and report.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its two bomb limits; here a bomb is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as im:
                check_size(im.size, path)
                im.load()
                check_size(im.size, path)  # a few decoders settle the size while loading
                return _rgb(im)
    except Exception as e:
        raise unreadable(e, path) from None


def check_size(size: tuple[int, int], path: str | os.PathLike) -> None:
    """Raise :class:`ImageError` for an image size beyond :data:`MAX_PIXELS` or :data:`MAX_ASPECT`."""
    width, height = size
    where = os.fspath(path)
    if width < 1 or height < 1:
        raise ImageError(f"{where}: image of {width}x{height} pixels has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{where}: image of {width}x{height} = {width * height:,} pixels; verydeep reads images of up to "
            f"{MAX_PIXELS:,} pixels"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"{where}: image of {width}x{height} pixels; verydeep reads images whose longer side is at most "
            f"{MAX_ASPECT} times the shorter"
        )


def unreadable(error: Exception, name: str | os.PathLike) -> ImageError:
    """``error``, raised while decoding ``name``, as one :class:`ImageError` line naming ``name``.

    Beside the documented OSError, ValueError and DecompressionBombError, Pillow's plugins raise
    whatever their parsers hit on corrupt bytes (SyntaxError, struct.error, EOFError, IndexError,
    KeyError, TypeError, ZeroDivisionError, MemoryError, ...); for a long run each one means the
    same thing: this file cannot be decoded, skip it and report why.
    """
    where = os.fspath(name)
    if isinstance(error, ImageError):
        return error
    if isinstance(error, UnidentifiedImageError):
        return ImageError(f"{where}: not an image in a format verydeep reads ({', '.join(FORMATS)})")
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow checked the header's size before check_size could: report it the same way.
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(claimed[1]):,} pixels" if claimed else "more pixels than Pillow allows"
        return ImageError(f"{where}: image of {pixels}; verydeep reads images of up to {MAX_PIXELS:,} pixels")
    detail = " ".join(str(error).replace(where, "").split()).strip(" :'\"")
    if len(detail) > _REASON_CHARS:
        detail = detail[:_REASON_CHARS] + "..."
    kind = type(error).__name__
    return ImageError(
        f"{where}: not a readable image ({kind}: {detail})" if detail else f"{where}: not a readable image ({kind})"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (L, P, RGBA, CMYK, I;16, F, ...) -> 8-bit RGB, EXIF rotation applied.

    Raises :class:`ImageError`, as :func:`open_image` does (a corrupt EXIF block included).
    """
    try:
        return _rgb(image)
    except Exception as e:
        raise unreadable(e, getattr(image, "filename", "") or "image") from None


def _rgb(image: Image.Image) -> Image.Image:
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
        image = open_image(image)  # already RGB, rotated as its EXIF says
    elif isinstance(image, Image.Image):
        image = to_rgb(image)
    if isinstance(image, Image.Image):
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(image)
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
