"""The download path against a local HTTP server on 127.0.0.1: resume after an interruption,
md5 mismatch rejected, nothing half-written left under the final name, offline error text."""

from __future__ import annotations

import hashlib

import pytest
from helpers import Server

from verydeep.errors import WeightsError
from verydeep.hub.download import download


@pytest.fixture
def server():
    s = Server({"blob.bin": bytes(range(256)) * 4000})  # ~1 MB
    yield s
    s.close()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    body = server.files["blob.bin"]
    md5 = hashlib.md5(body).hexdigest()
    dest = tmp_path / "cache" / "blob.bin"
    server.cut_after = 300_000
    with pytest.raises(WeightsError, match="resume"):
        download(f"{server.base}/blob.bin", dest, size=len(body), md5=md5, progress=False)
    assert not dest.exists()
    assert (tmp_path / "cache" / "blob.bin.part").stat().st_size == 300_000
    sha = download(f"{server.base}/blob.bin", dest, size=len(body), md5=md5, progress=False)
    assert server.ranges[-1] == "bytes=300000-"
    assert dest.read_bytes() == body
    assert sha == hashlib.sha256(body).hexdigest()
    assert not (tmp_path / "cache" / "blob.bin.part").exists()


def test_md5_mismatch_is_rejected_and_nothing_remains(server, tmp_path):
    body = server.files["blob.bin"]
    dest = tmp_path / "blob.bin"
    with pytest.raises(WeightsError, match=r"md5 mismatch: expected 0+, found " + hashlib.md5(body).hexdigest()):
        download(f"{server.base}/blob.bin", dest, size=len(body), md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_rejected(server, tmp_path):
    body = server.files["blob.bin"]
    with pytest.raises(WeightsError, match=f"expected {len(body) - 1} bytes, found {len(body)}"):
        download(f"{server.base}/blob.bin", tmp_path / "b", size=len(body) - 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_says_so_quickly(tmp_path):
    with pytest.raises(WeightsError, match="cannot download"):
        download("http://127.0.0.1:9/none.caffemodel", tmp_path / "x", timeout=5, progress=False)


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(WeightsError, match="missing.bin: HTTP 404"):
        download(f"{server.base}/missing.bin", tmp_path / "x", progress=False)
