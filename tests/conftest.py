"""Shared fixtures: narrow random nets (fast) saved where the CLI can load them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from verydeep import VGG

#: Narrow nets keep the suite fast; a few tests use the full 138M-parameter VGG-16.
NARROW = 1 / 16


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache; never download from the real VGG site."""
    monkeypatch.setenv("VERYDEEP_HOME", str(tmp_path_factory.mktemp("verydeep_home")))
    monkeypatch.delenv("VERYDEEP_MIRROR", raising=False)


def random_vgg(config: str = "D", num_classes: int = 10, width: float = NARROW, seed: int = 0, **kw) -> VGG:
    torch.manual_seed(seed)
    model = VGG(config, num_classes=num_classes, width=width, **kw)
    with torch.no_grad():  # biases non-zero so that a swapped weight/bias is caught
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def narrow_vgg() -> VGG:
    return random_vgg()


@pytest.fixture
def narrow_weights(tmp_path, narrow_vgg) -> str:
    from verydeep.hub.weights import save_safetensors

    narrow_vgg.class_names = [f"class{i}" for i in range(narrow_vgg.num_classes)]
    return str(save_safetensors(narrow_vgg, tmp_path / "narrow.safetensors"))


def photo(height: int = 180, width: int = 240, seed: int = 0) -> Image.Image:
    """A smooth random colour image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 20), max(2, width // 20), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


@pytest.fixture
def image_files(tmp_path) -> list[str]:
    paths = []
    for i, (h, w) in enumerate([(180, 240), (300, 200), (256, 256)]):
        p = tmp_path / f"img{i}.jpg"
        photo(h, w, seed=i).save(p, quality=95)
        paths.append(str(p))
    return paths
