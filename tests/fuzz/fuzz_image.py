"""Fuzz image decoding (``verydeep.data.preprocess.open_image`` -> ``to_uint8_chw``): every format
verydeep reads, EXIF blocks, modes; the pixel budget and the skip-and-report handling.

Pillow's Python side (the format plugins, EXIF and TIFF tag parsing) is instrumented too, so the
fuzzer is guided through the parsers that corrupt files reach.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import main

#: Pillow's modules that parse what a file holds (the plugins of ``preprocess.FORMATS``).
PIL_PARSERS = [
    "PIL.Image",
    "PIL.ImageFile",
    "PIL.ImageOps",
    "PIL.TiffTags",
    "PIL.TiffImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.MpoImagePlugin",
    "PIL.PngImagePlugin",
    "PIL.BmpImagePlugin",
    "PIL.GifImagePlugin",
    "PIL.PpmImagePlugin",
    "PIL.WebPImagePlugin",
]


def seeds(folder: Path) -> list[bytes]:
    import numpy as np
    from PIL import Image, features

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the EXIF transpose runs
    exif[0x011A] = 72.0  # XResolution
    exif[0x010F] = "verydeep"  # Make
    images: list[tuple[Image.Image, str, dict]] = [
        (rgb, "JPEG", {"exif": exif.tobytes(), "quality": 80}),
        (rgb, "JPEG", {"progressive": True, "quality": 60}),
        (rgb.convert("RGBA"), "PNG", {}),
        (rgb.convert("P"), "PNG", {"transparency": 0}),
        (Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)), "PNG", {}),
        (rgb, "TIFF", {"compression": "tiff_deflate", "exif": exif.tobytes()}),
        (rgb.convert("CMYK"), "TIFF", {}),
        (rgb.convert("P"), "GIF", {}),
        (rgb, "BMP", {}),
        (rgb.convert("L"), "PPM", {}),
        (rgb, "WEBP", {"quality": 50}),
    ]
    out = []
    for image, fmt, options in images:
        if fmt == "WEBP" and not features.check("webp"):  # a Pillow built without WebP
            continue
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out.append(buffer.getvalue())
    return out


def one_input(data: bytes, folder: Path) -> None:
    from verydeep.data.preprocess import to_uint8_chw

    path = folder / "input.img"
    path.write_bytes(data)
    to_uint8_chw(path)


if __name__ == "__main__":
    main(seeds, one_input, [*PIL_PARSERS, "verydeep.data.preprocess"], instrument=("verydeep", "PIL"))
