"""Long-run behaviour end to end, in subprocesses: a killed run resumes to the same scores file,
and two torchrun ranks (gloo, CPU) give what one process gives."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import photo

from verydeep.cli import main
from verydeep.evaluate.run import EXIT_AFTER_ENV

PY = sys.executable


@pytest.fixture
def val(tmp_path):
    """9 images in 10 ImageFolder classes (7 empty), one corrupt: 5 chunks of 2."""
    root = tmp_path / "val"
    for c in range(10):
        (root / f"n0000000{c}").mkdir(parents=True)
    for n in range(8):
        photo(224 + 8 * n, 240 - 4 * n, seed=n).save(root / f"n0000000{n % 3}" / f"img{n}.JPEG")
    (root / "n00000002" / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture
def one_thread():
    """In-process runs use the kernels the OMP_NUM_THREADS=1 subprocesses use (same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", **extra)  # the same kernels in every process
    e.pop(EXIT_AFTER_ENV, None)
    e.update(extra)
    return e


def cli(weights: str, val, scores, *extra: str) -> list[str]:
    return [
        "evaluate", str(val), "--weights", weights, "--protocol", "dense", "--scales", "224", "240",
        "--batch-size", "2", "--device", "cpu", "--scores", str(scores), "--no-progress", *extra,
    ]  # fmt: skip


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)


def npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same_file(a, b) -> None:
    za, zb = npz(a), npz(b)
    assert za.keys() == zb.keys()
    for k in za:
        np.testing.assert_array_equal(za[k], zb[k], err_msg=k)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_scores_file(narrow_weights, val, tmp_path, one_thread, capsys):
    full, part = tmp_path / "full.npz", tmp_path / "part.npz"
    assert main(cli(narrow_weights, val, full, "--workers", "0")) == 0
    assert "corrupt.JPEG" in capsys.readouterr().err  # reported, not fatal
    # Killed after 3 of 5 chunks (os._exit: no flush, no cleanup, like SIGKILL).
    killed = cli(narrow_weights, val, part, "--workers", "1", "--checkpoint-every", "0")
    r = run([PY, "-m", "verydeep", *killed], env=env(**{EXIT_AFTER_ENV: "3"}))
    assert r.returncode == 75, r.stderr
    assert not part.exists()
    assert len(list((tmp_path / "part.npz.parts").glob("chunks-*.npz"))) == 3
    assert main(cli(narrow_weights, val, part, "--workers", "1", "--resume", "--json")) == 0
    out = capsys.readouterr().out
    # Chunks in ImageFolder order: [img0 img3] [img6 img1] [img4 img7] [corrupt img2] [img5]:
    # only the last two ran, with two readable images.
    assert '"images_computed": 2' in out
    assert not (tmp_path / "part.npz.parts").exists()
    assert_same_file(full, part)
    z = npz(full)
    assert len(z["ids"]) == 8 and list(z["failed_ids"]) == ["n00000002/corrupt.JPEG"]


@pytest.mark.slow
def test_two_torchrun_ranks_match_one_process(narrow_weights, val, tmp_path, one_thread):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert main(cli(narrow_weights, val, one, "--workers", "0")) == 0
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "verydeep"]
    r = run([*torchrun, *cli(narrow_weights, val, two, "--workers", "1", "--json")], env=env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('"images": 8') == 1  # rank 0 alone reports
    assert_same_file(one, two)
