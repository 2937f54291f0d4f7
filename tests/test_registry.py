"""The registry path end to end (`verydeep.load("vgg16")`), served by a local HTTP server on
127.0.0.1 through ``$VERYDEEP_MIRROR``: download, verify, convert to the cached safetensors with
its metadata, later loads from the cache without the network, and the offline error text. The
stand-in for the published file is conftest's ``published`` fixture."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from helpers import cli_error_line

import verydeep
from verydeep import hub
from verydeep.cli import main
from verydeep.errors import WeightsError
from verydeep.formats.safetensors import read_metadata


def test_first_load_downloads_verifies_and_caches(published):
    model, body, server = published
    loaded = verydeep.load("vgg16", progress=False)
    assert isinstance(loaded, verydeep.VGG) and loaded.config == "D"
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    cached = hub.cached_path("vgg16")
    meta = read_metadata(cached)
    assert meta["config"] == "D" and meta["source_sha256"] == hashlib.sha256(body).hexdigest()
    assert meta["input_space"].startswith("caffe-bgr")
    assert meta["class_names"][0] == "tench" and len(meta["class_names"]) == 1000
    assert not hub.download_path("vgg16").exists()  # one copy kept: the safetensors file
    assert not list(cached.parent.rglob("*.part")) and not list(cached.parent.rglob("*.tmp"))

    requests = len(server.ranges)
    server.close()  # later loads need no network
    again = verydeep.load("vgg16", progress=False)
    assert len(server.ranges) == requests
    x = torch.randn(1, 3, 224, 224) * 50
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_weights_path_and_download_commands(published, capsys):
    assert main(["weights", "download", "vgg16"]) == 0
    capsys.readouterr()
    assert main(["weights", "path", "vgg16"]) == 0
    assert capsys.readouterr().out.strip() == str(hub.cached_path("vgg16"))


def test_offline_error_says_what_to_download_and_how_to_pass_it(monkeypatch, capsys):
    monkeypatch.setenv("VERYDEEP_MIRROR", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(WeightsError) as err:
        verydeep.load("vgg16", progress=False)
    text = str(err.value)
    assert "VGG_ILSVRC_16_layers.caffemodel" in text and "where you gave 'vgg16'" in text
    assert "553,432,081" in text and "441315b0ff6932dbfde97731be7ca852" in text
    assert main(["classify", __file__, "--weights", "vgg16"]) == 1
    assert "/path/to/VGG_ILSVRC_16_layers.caffemodel" in cli_error_line(capsys.readouterr().err)


def test_a_file_put_in_downloads_by_hand_is_used(published):
    model, body, server = published
    server.close()
    target = hub.download_path("vgg16")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    loaded = verydeep.load("vgg16", progress=False)
    assert np.array_equal(loaded.fc8.weight.detach().numpy(), model.fc8.weight.detach().numpy())


def test_a_wrong_file_put_by_hand_is_rejected(published):
    _, body, server = published
    server.close()
    target = hub.download_path("vgg16")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body[:-10] + b"0123456789")  # right size, wrong md5
    with pytest.raises(WeightsError, match="md5"):
        verydeep.load("vgg16", progress=False)
    assert not hub.cached_path("vgg16").exists()
