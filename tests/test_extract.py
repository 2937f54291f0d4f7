"""verydeep extract: equal to model.features, every output format, skipped images, resume, shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import photo, random_vgg

from verydeep.cli import main
from verydeep.core.distributed import Context
from verydeep.errors import VerydeepError
from verydeep.extract import job as extract_module
from verydeep.extract.job import extract

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return random_vgg()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Ten small photos of different sizes and one file that is not an image (index 4)."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(10):
        p = d / f"im{i:02d}.jpg"
        photo(60 + 7 * i, 90 - 3 * i, seed=i).save(p, quality=90)
        paths.append(p)
    bad = d / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    paths.insert(4, bad)
    return paths


def good(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.name != "broken.jpg"]


def reference(model, paths, taps):
    with torch.no_grad():
        return {k: v.numpy() for k, v in model.features(model.preprocess([str(p) for p in paths]), taps=taps).items()}


def run(model, paths, layers, out, **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("workers", 0)
    kw.setdefault("chunk_size", 4)
    kw.setdefault("progress", False)
    return extract(model, paths, layers, out, **kw)


def test_fc7_and_pool5_equal_model_features_and_bad_image_has_no_row(tmp_path, model, images):
    out = tmp_path / "feats.npz"
    result = run(model, images, ["fc7", "pool5"], out)
    ref = reference(model, good(images), ["fc7", "pool5"])
    with np.load(out) as z:
        assert list(z["path"]) == [str(p) for p in good(images)]  # input order, broken.jpg absent
        for layer in ("fc7", "pool5"):
            assert z[layer].shape == ref[layer].shape
            assert np.allclose(z[layer], ref[layer], rtol=1e-5, atol=1e-5 * np.abs(ref[layer]).max())
    assert result.rows == 10 and result.images == 11
    assert [f.path for f in result.failed] == [str(images[4])]
    listed = (tmp_path / "feats.npz.failed.tsv").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(images[4]) + "\t")
    assert not (tmp_path / "feats.npz.parts").exists()


def test_formats_pooling_and_path_columns(tmp_path, model, images):
    some = images[:6]
    maps = reference(model, good(some), ["relu5_3", "fc7"])
    expected = {"avg": maps["relu5_3"].mean(axis=(2, 3)), "max": maps["relu5_3"].max(axis=(2, 3))}
    names = [str(p) for p in good(some)]
    for pool, want in expected.items():
        run(model, some, ["relu5_3", "fc7"], tmp_path / f"{pool}.parquet", pool=pool)
        table = pq.read_table(tmp_path / f"{pool}.parquet")
        assert table.column("path").to_pylist() == names
        got = np.stack(table.column("relu5_3").to_numpy(zero_copy_only=False))
        assert np.allclose(got, want, atol=1e-5 * np.abs(want).max())
        fc7 = np.stack(table.column("fc7").to_numpy(zero_copy_only=False))  # fc layers are not pooled
        assert np.allclose(fc7, maps["fc7"], atol=1e-5 * np.abs(maps["fc7"]).max())
    run(model, some, ["relu5_3"], tmp_path / "maps.h5")
    with h5py.File(tmp_path / "maps.h5") as f:
        assert [p.decode() for p in f["path"][:]] == names
        assert np.allclose(f["relu5_3"][:], maps["relu5_3"], atol=1e-5 * np.abs(maps["relu5_3"]).max())
    run(model, some, ["fc7"], tmp_path / "fc7.npy")
    assert np.allclose(np.load(tmp_path / "fc7.npy"), maps["fc7"], atol=1e-5 * np.abs(maps["fc7"]).max())
    assert (tmp_path / "fc7.npy.paths.txt").read_text().splitlines() == names
    with pytest.raises(VerydeepError, match="one layer"):
        run(model, some, ["fc7", "fc6"], tmp_path / "two.npy")
    with pytest.raises(VerydeepError, match="unknown layer 'fc9'"):
        run(model, some, ["fc9"], tmp_path / "x.npz")


def test_resume_after_interruption_gives_the_same_file(tmp_path, model, images, monkeypatch):
    whole = tmp_path / "whole.npz"
    run(model, images, ["fc7", "relu4_3"], whole, pool="max")
    out = tmp_path / "resumed.npz"
    real_write = extract_module._write_chunk
    calls = []

    def dying_write(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third chunk was in flight
        calls.append(1)
        real_write(*args, **kw)

    monkeypatch.setattr(extract_module, "_write_chunk", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(model, images, ["fc7", "relu4_3"], out, pool="max")
    monkeypatch.setattr(extract_module, "_write_chunk", real_write)
    assert not out.exists() and len(list((tmp_path / "resumed.npz.parts").glob("chunk-*.npz"))) == 2
    with pytest.raises(VerydeepError, match="--resume"):
        run(model, images, ["fc7", "relu4_3"], out, pool="max")
    with pytest.raises(VerydeepError, match="pool"):
        run(model, images, ["fc7", "relu4_3"], out, pool="avg", resume=True)
    result = run(model, images, ["fc7", "relu4_3"], out, pool="max", resume=True)
    assert result.chunks_reused == 2
    assert out.read_bytes() == whole.read_bytes()
    again = run(model, images, ["fc7", "relu4_3"], out, pool="max", resume=True)  # done: a no-op
    assert again.rows == 10


def test_sharded_equals_unsharded(tmp_path, model, images):
    """Two ranks' shards (run one after the other, as torchrun's ranks would) merge to the same file."""
    whole = tmp_path / "whole.npy"
    run(model, images, ["fc7"], whole)
    out = tmp_path / "sharded.npy"
    assert run(model, images, ["fc7"], out, ctx=Context(1, 2, 1)) is None  # not rank 0: no merge
    assert not out.exists()
    result = run(model, images, ["fc7"], out, ctx=Context(0, 2, 0), resume=True)
    assert result.rows == 10
    assert out.read_bytes() == whole.read_bytes()
    assert Path(str(out) + ".paths.txt").read_text() == Path(str(whole) + ".paths.txt").read_text()


def test_cli_reads_paths_on_stdin(tmp_path, narrow_weights, images, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{p}\n" for p in images[:5])))
    out = tmp_path / "cli.npz"
    code = main(
        [
            "extract",
            "-",
            "--layer",
            "pool5",
            "--pool",
            "avg",
            "-o",
            str(out),
            "--weights",
            narrow_weights,
            "--workers",
            "0",
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 4 and result["shapes"] == {"pool5": [32]} and len(result["failed"]) == 1
    code = main(["extract", "-", "--layer", "nope", "-o", str(tmp_path / "y.npz"), "--weights", narrow_weights])
    assert code == 1 and "unknown layer 'nope'" in capsys.readouterr().err


def _many_images(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        photo(40, 48, seed=i % 7).save(folder / f"{i:04d}.png")


@pytest.mark.slow
def test_resume_after_sigkill_of_the_cli(tmp_path, narrow_weights):
    data = tmp_path / "many"
    _many_images(data, 240)
    base = [
        sys.executable,
        "-m",
        "verydeep",
        "extract",
        str(data),
        "--layer",
        "fc7",
        "--weights",
        narrow_weights,
        "--batch-size",
        "4",
        "--chunk-size",
        "8",
        "--workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole.npy"
    subprocess.run(base + ["-o", str(whole)], check=True, env=env, capture_output=True)
    out = tmp_path / "killed.npy"
    proc = subprocess.Popen(base + ["-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.npy.parts"
    deadline = time.time() + 120
    while not (parts / "chunk-0000002.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done = len(list(parts.glob("chunk-*.npz")))
    assert 3 <= done < 30
    subprocess.run(base + ["-o", str(out), "--resume"], check=True, env=env, capture_output=True)
    assert out.read_bytes() == whole.read_bytes()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, narrow_weights):
    data = tmp_path / "many"
    _many_images(data, 30)
    args = [
        "extract",
        str(data),
        "--layer",
        "fc7",
        "--layer",
        "pool5",
        "--weights",
        narrow_weights,
        "--batch-size",
        "4",
        "--chunk-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "verydeep", *args, "-o", str(tmp_path / "one.npz")],
        check=True,
        env=env,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "verydeep",
            *args,
            "-o",
            str(tmp_path / "two.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
