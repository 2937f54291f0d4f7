"""Caffe's input space: BGR order, 0..255, mean pixel subtracted; any Pillow mode and EXIF
orientation; resize shorter side to 256 and central 224 crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from verydeep import MEAN_BGR, preprocess
from verydeep.data.preprocess import center_crop_caffe, from_caffe, open_image, to_caffe
from verydeep.errors import ImageError


def test_channel_order_and_mean_on_a_flat_colour():
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[...] = (200, 100, 50)  # R, G, B
    x = preprocess(rgb)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    expected_bgr = np.array([50, 100, 200]) - np.array(MEAN_BGR)
    assert np.allclose(x[0, :, 100, 100].numpy(), expected_bgr, atol=1e-4)
    assert torch.allclose(
        from_caffe(to_caffe(torch.from_numpy(rgb).permute(2, 0, 1))), torch.from_numpy(rgb).permute(2, 0, 1).float()
    )


def test_resize_and_center_crop_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(256, 300, 3), dtype=np.uint8)
    x = center_crop_caffe(rgb)  # already 256 on the shorter side: no resampling
    top, left = (256 - 224) // 2, (300 - 224) // 2
    ref = rgb[top : top + 224, left : left + 224, ::-1].astype(np.float32) - np.array(MEAN_BGR, np.float32)
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-4)


def test_shorter_side_goes_to_256_for_portrait_and_landscape():
    for size in [(500, 300), (300, 500)]:  # PIL sizes are (w, h)
        im = Image.new("RGB", size, (10, 20, 30))
        assert preprocess(im, crop=224).shape == (1, 3, 224, 224)
        assert preprocess(im, size=256, crop=256).shape == (1, 3, 256, 256)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_any_pillow_mode_becomes_rgb(mode, tmp_path):
    im = Image.new("RGB", (64, 48), (255, 0, 0))
    if mode == "I;16":
        im = Image.fromarray(np.full((48, 64), 65535, np.uint16))
    else:
        im = im.convert(mode)
    x = preprocess(im, size=48, crop=48)
    assert x.shape == (1, 3, 48, 48) and torch.isfinite(x).all()
    if mode == "I;16":  # full-scale 16-bit white -> 255 in every channel
        assert np.allclose(x[0, :, 10, 10].numpy(), 255 - np.array(MEAN_BGR), atol=1e-3)


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, :40] = (255, 0, 0)  # left half red, right half black
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=100)
    shown = np.asarray(open_image(path))
    assert shown.shape == (80, 40, 3)  # displayed portrait
    assert shown[5, 20, 0] > 200 and shown[75, 20, 0] < 50  # red on top after rotation


def test_non_image_file_names_the_file(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a JPEG")
    with pytest.raises(ImageError, match="notes.jpg"):
        preprocess(str(bad))
