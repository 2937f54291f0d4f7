"""Fixtures: an isolated cache for every test, narrow random nets saved where the CLI can load them,
sample image files and a small ImageNet-style val folder, a stand-in for the published VGG-16 served
by a local mirror. Plain helpers live in ``helpers.py``."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from helpers import Server, photo, random_vgg

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


@pytest.fixture
def val_folder(tmp_path) -> Path:
    """``val/n0000000{0..9}``: ten synset folders (the narrow nets' ten classes), the first three
    with one photo each."""
    root = tmp_path / "val"
    for c in range(10):
        (root / f"n0000000{c}").mkdir(parents=True)
    for n in range(3):
        photo(230, 240, seed=n).save(root / f"n0000000{n}" / f"img{n}.JPEG")
    return root


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A narrow VGG-16 caffemodel (V1, as published) standing in for the official file: the
    registry entry is pointed at its size and md5, the mirror at a local server. Yields
    (model, caffemodel bytes, server)."""
    from verydeep import hub
    from verydeep.formats.caffe import vgg_net, write_caffemodel

    model = random_vgg("D", num_classes=1000, width=1 / 16)
    blobs = {
        name: [m.weight.detach().numpy(), m.bias.detach().numpy()]
        for name, m in model.named_children()
        if hasattr(m, "weight")
    }
    path = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    write_caffemodel(path, blobs, vgg_net("D", 1 / 16, 1000, batch=10), version="V1")
    body = path.read_bytes()
    entry = dataclasses.replace(hub.REGISTRY["vgg16"], size=len(body), md5=hashlib.md5(body).hexdigest())
    monkeypatch.setitem(hub.REGISTRY, "vgg16", entry)
    server = Server({entry.filename: body})
    monkeypatch.setenv("VERYDEEP_MIRROR", server.base)
    yield model, body, server
    server.close()
