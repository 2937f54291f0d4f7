"""Fixtures: an isolated cache for every test, narrow random nets saved where the CLI can load them,
sample image files. Plain helpers live in ``helpers.py``."""

from __future__ import annotations

import pytest
from helpers import photo, random_vgg

from verydeep import VGG


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache; never download from the real VGG site."""
    monkeypatch.setenv("VERYDEEP_HOME", str(tmp_path_factory.mktemp("verydeep_home")))
    monkeypatch.delenv("VERYDEEP_MIRROR", raising=False)


@pytest.fixture
def narrow_vgg() -> VGG:
    return random_vgg()


@pytest.fixture
def narrow_weights(tmp_path, narrow_vgg) -> str:
    from verydeep.formats.safetensors import save_safetensors

    narrow_vgg.class_names = [f"class{i}" for i in range(narrow_vgg.num_classes)]
    return str(save_safetensors(narrow_vgg, tmp_path / "narrow.safetensors"))


@pytest.fixture
def image_files(tmp_path) -> list[str]:
    paths = []
    for i, (h, w) in enumerate([(180, 240), (300, 200), (256, 256)]):
        p = tmp_path / f"img{i}.jpg"
        photo(h, w, seed=i).save(p, quality=95)
        paths.append(str(p))
    return paths
