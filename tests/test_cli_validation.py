"""Bad command lines and refused writes are one line naming the option or the file, exit 1.

- Every numeric option has a range, checked by the parser (:mod:`verydeep.cli.common`), and the
  options that depend on the model (``--top``, ``--crop`` for fc layers, ``--size`` against the
  crop) are checked once it is loaded.
- ``extract --resume`` with other options says which flag differs.
- An output the OS refuses (under a regular file; over the disk's or the process's limit) is one
  line naming the path and the OS's reason, and leaves no temporary file behind.
- ``train --resume`` works whatever a killed run left: nothing, a half-made folder, or
  checkpoints without their config.toml.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image_folder, run_cli

from verydeep.cli import main
from verydeep.core.atomic import TEMP_GLOB, atomic_path, file_lock, write_text
from verydeep.core.store import ChunkStore
from verydeep.errors import VerydeepError

#: One dummy positional argument set per command, so the parser reaches the options.
POSITIONAL = {
    "classify": ["x.jpg"],
    "extract": ["imgs/", "--layer", "fc7", "-o", "out.npz"],
    "evaluate": ["val/"],
    "explain": ["x.jpg", "-o", "maps/"],
    "bench": [],
}
BAD_OPTIONS = [
    ("classify", ["--batch-size", "0"], "argument --batch-size: must be at least 1, found 0"),
    ("classify", ["--top", "0"], "argument --top: must be at least 1, found 0"),
    ("classify", ["--top", "five"], "argument --top: expected an integer, found 'five'"),
    ("extract", ["--crop", "0"], "argument --crop: must be 1..1024, found 0"),
    ("extract", ["--size", "-5"], "argument --size: must be 1..1024, found -5"),
    ("extract", ["--batch-size", "0"], "argument --batch-size: must be at least 1, found 0"),
    ("extract", ["--workers", "-1"], "argument --workers: must be 0..256, found -1"),
    ("extract", ["--chunk-size", "0"], "argument --chunk-size: must be at least 1, found 0"),
    ("evaluate", ["--scales", "256", "100"], "argument --scales: must be 224..1024, found 100"),
    ("evaluate", ["--grid-size", "0"], "argument --grid-size: must be 1..16, found 0"),
    ("evaluate", ["--max-batch", "0"], "argument --max-batch: must be at least 1, found 0"),
    ("evaluate", ["--limit", "0"], "argument --limit: must be at least 1, found 0"),
    ("evaluate", ["--checkpoint-every", "nan"], "argument --checkpoint-every: must be a finite number at least 0"),
    ("explain", ["--smooth", "-1"], "argument --smooth: must be 0..1000, found -1"),
    ("explain", ["--steps", "0"], "argument --steps: must be 1..100000, found 0"),
    ("explain", ["--step", "0"], "argument --step: must be a finite number greater than 0, found 0"),
    ("explain", ["--l2=-1e-5"], "argument --l2: must be a finite number at least 0, found -1e-5"),
    ("explain", ["--crop", "-1"], "argument --crop: must be 0..1024, found -1"),
    ("bench", ["--width", "0"], "argument --width: must be a finite number in (0, 4], found 0"),
    ("bench", ["--width", "inf"], "argument --width: must be a finite number in (0, 4], found inf"),
    ("bench", ["--repeats", "0"], "argument --repeats: must be at least 1, found 0"),
    ("bench", ["--warmup", "-1"], "argument --warmup: must be at least 0, found -1"),
    ("bench", ["--dense", "100"], "argument --dense: must be 0 (skip) or 224..1024, found 100"),
    ("bench", ["--threads", "0"], "argument --threads: must be 1..1024, found 0"),
    ("bench", ["--batch-size", "4", "0"], "argument --batch-size: must be at least 1, found 0"),
    ("bench", ["--num-classes", "0"], "argument --num-classes: must be at least 1, found 0"),
]


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"verydeep {command}: error: "), err
    return err.removeprefix(f"verydeep {command}: error: ").strip()


@pytest.mark.parametrize(
    ("command", "options", "expected"), BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else None
)
def test_every_numeric_option_has_a_range(command, options, expected, capsys):
    assert main([command, *POSITIONAL[command], *options]) == 1
    message = one_error_line(capsys, command)
    assert message.startswith(expected) and message.endswith(f"(see verydeep {command} --help)"), message


def test_argument_errors_are_one_line_with_exit_status_1_in_a_process():
    r = run_cli(["classify", "x.jpg", "--batch-size", "0"], check=False, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "usage:" not in r.stderr


# -- options checked against the model ------------------------------------------------------------------
def test_classify_top_must_be_within_the_classes(narrow_weights, image_files, capsys):
    assert main(["classify", image_files[0], "--weights", narrow_weights, "--top", "11"]) == 1
    assert one_error_line(capsys, "classify") == "--top 11: the model has 10 classes; use 1..10"
    assert main(["classify", image_files[0], "--weights", narrow_weights, "--top", "10", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 10


@pytest.mark.parametrize(
    ("layer", "size", "crop", "expected"),
    [
        ("fc7", "10", "224", "--size 10 is smaller than --crop 224: the crop would be mostly padding"),
        ("fc7", "256", "100", "--crop 100: layer fc7 (fc6 takes pool5 at 7x7) needs a crop of 193..224"),
        ("prob", "256", "225", "--crop 225: layer prob (fc6 takes pool5 at 7x7) needs a crop of 193..224"),
        ("conv5_3", "50", "64", "--size 50 is smaller than --crop 64"),
    ],
)
def test_extract_refuses_sizes_the_layer_cannot_use(
    layer, size, crop, expected, tmp_path, narrow_weights, image_files, capsys
):
    out = tmp_path / "f.npz"
    cmd = ["extract", image_files[0], "--layer", layer, "-o", str(out), "--weights", narrow_weights,
           "--size", size, "--crop", crop, "--no-progress", "--workers", "0"]  # fmt: skip
    assert main(cmd) == 1
    assert one_error_line(capsys, "extract").startswith(expected)
    assert list(tmp_path.glob("f.npz*")) == []


def test_extract_takes_any_crop_for_conv_layers_and_193_for_fc(tmp_path, narrow_weights, image_files):
    for layer, crop, size in (("pool5", "64", "64"), ("fc7", "193", "200")):
        out = tmp_path / f"{layer}.npz"
        cmd = ["extract", image_files[0], "--layer", layer, "-o", str(out), "--weights", narrow_weights,
               "--size", size, "--crop", crop, "--no-progress", "--workers", "0"]  # fmt: skip
        assert main(cmd) == 0
        assert np.load(out)[layer].shape[0] == 1


def test_extract_resume_with_another_layer_says_which_flag_differs(
    tmp_path, narrow_weights, image_files, capsys, monkeypatch
):
    import verydeep.extract.job as job

    base = ["extract", str(Path(image_files[0]).parent), "-o", "", "--weights", narrow_weights, "--no-progress",
            "--workers", "0", "--batch-size", "1", "--chunk-size", "1"]  # fmt: skip
    finished, partial = tmp_path / "done.npz", tmp_path / "part.npz"

    def cmd(out: Path, *layers: str, resume: bool = True) -> list[str]:
        line = [*base]
        line[line.index("")] = str(out)
        return [*line, *(x for t in layers for x in ("--layer", t)), *(["--resume"] if resume else [])]

    assert main(cmd(finished, "fc7", resume=False)) == 0
    monkeypatch.setattr(job, "merge", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # killed at the end
    assert main(cmd(partial, "fc7", resume=False)) == 130  # interrupted, its chunks kept
    monkeypatch.undo()
    capsys.readouterr()
    for out, remedy in ((finished, "pass --overwrite to replace it"), (partial, "pass --overwrite to start over")):
        assert main(cmd(out, "fc6")) == 1
        assert one_error_line(capsys, "extract") == (
            f"{out}: cannot resume: it was started with --layer fc7, now --layer fc6; "
            f"use a new output or the same options, or {remedy}"
        )
        assert main(cmd(out, "fc7", "pool5")) == 1
        assert "now --layer fc7 pool5" in one_error_line(capsys, "extract")
    assert main(cmd(partial, "fc7")) == 0  # the same options continue it
    assert np.load(partial)["fc7"].shape[0] == 3


# -- writes the OS refuses ----------------------------------------------------------------------------------
@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file where an output's folder would have to be."""
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


def invocations(weights: str, images: list[str], val: Path, train: Path, under: Path) -> dict[str, list[str]]:
    """A command per write of extract, evaluate (scores, predictions), convert, export, explain,
    plot and train, each with its output under ``under``."""
    return {
        "extract": ["extract", images[0], "--layer", "fc7", "-o", str(under / "f.npz"), "--weights", weights],
        "evaluate --scores": ["evaluate", str(val), "--weights", weights, "--scores", str(under / "s.npz")],
        "evaluate --predictions": ["evaluate", str(val), "--weights", weights, "--predictions", str(under / "p.csv")],
        "convert": ["convert", weights, "-o", str(under / "c.safetensors")],
        "export": ["export", weights, "--format", "safetensors", "-o", str(under / "e.safetensors")],
        "explain": ["explain", images[0], "--weights", weights, "-o", str(under / "maps")],
        "plot": ["plot", str(train), "-o", str(under / "curves.png")],
        "train": ["train", "--data", str(train), "-o", str(under / "run")],
    }


def test_an_output_under_a_regular_file_is_refused_before_any_work(
    tmp_path, narrow_weights, image_files, val_folder, blocker, capsys
):
    for name, cmd in invocations(narrow_weights, image_files, val_folder, tmp_path, blocker).items():
        assert main(cmd) == 1, name
        message = one_error_line(capsys, cmd[0])
        assert f"cannot write {blocker}/" in message and f"{blocker} is a file, not a folder" in message, (
            name,
            message,
        )


def test_a_library_write_under_a_regular_file_names_the_path(blocker):
    with pytest.raises(VerydeepError) as e:
        write_text(blocker / "deeper" / "x.json", "{}")
    assert str(e.value) == f"{blocker / 'deeper' / 'x.json'}: cannot write: {blocker} is a file, not a folder"
    with pytest.raises(VerydeepError, match="cannot write: it exists and is not a regular file"):
        write_text("/dev/null", "never replace a device")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_refused_write_is_one_line_with_the_os_reason_and_leaves_no_temporary_file(tmp_path, code):
    target = tmp_path / "scores.npz"
    with pytest.raises(VerydeepError) as e:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    assert str(e.value).startswith(f"{target}: cannot write: {os.strerror(code)}") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_extract_is_one_line(tmp_path, narrow_weights, image_files, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)  # the chunk store's writer
    out = tmp_path / "f.npz"
    assert main(["extract", image_files[0], "--layer", "fc7", "-o", str(out), "--weights", narrow_weights,
                 "--no-progress", "--workers", "0"]) == 1  # fmt: skip
    message = one_error_line(capsys, "extract")
    assert (
        message
        == f"{out}.parts/chunk-0000000.npz: cannot write: No space left on device; free some space or write elsewhere"
    )
    assert list((tmp_path / "f.npz.parts").glob(TEMP_GLOB)) == []


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past ``limit`` bytes fail with EFBIG, not SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    ("name", "limit"), [("extract", 1024), ("evaluate --scores", 1024), ("convert", 8192), ("train", 8192)]
)
def test_a_write_the_kernel_refuses_is_one_line_in_every_writer(
    name, limit, tmp_path, narrow_weights, image_files, val_folder
):
    """The real thing: past ``ulimit -f`` the kernel fails every write with EFBIG, whichever
    library makes it (numpy's zip, safetensors' Rust, torch's checkpoint writer)."""
    train = make_image_folder(tmp_path / "train", 2, seed=0)
    out = tmp_path / "out"
    cmd = invocations(narrow_weights, image_files, val_folder, train, out)[name]
    if name != "convert":  # loader processes pass tensors through /dev/shm files, which the limit caps too
        cmd += ["--workers", "0"]
    if name == "train":
        cmd += ["--arch", "A", "--width", "0.03125", "--scale", "224", "--batch-size", "8",
                "--device", "cpu", "--no-progress", "--no-tensorboard", "--max-steps", "1"]  # fmt: skip
    env = {"VERYDEEP_HOME": str(tmp_path / "home")}
    r = run_cli(cmd, env=env, check=False, timeout=300, preexec_fn=_file_size_limit(limit))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"verydeep {cmd[0]}: error: {out}/") and ": cannot write: File too large" in last, r.stderr
    assert [p for p in out.rglob("*") if ".tmp-" in p.name] == []


# -- one run per output --------------------------------------------------------------------------------------
def test_a_second_train_on_a_busy_run_folder_refuses(tmp_path, capsys):
    train = make_image_folder(tmp_path / "train", 2, seed=0)
    run = tmp_path / "run"
    with file_lock(tmp_path / "run.lock", lambda holder: "held", wait=False):
        assert main(["train", "--data", str(train), "-o", str(run), "--device", "cpu"]) == 1
    assert one_error_line(capsys, "train") == (
        f"{run} is being written by another verydeep process (pid {os.getpid()}); wait for it or choose another -o"
    )
    assert not run.exists()


# -- train --resume whatever a killed run left ----------------------------------------------------------------
def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "-o", str(out), "--arch", "A", "--width", "0.03125", "--epochs", "1",
            "--scale", "224", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress",
            "--no-tensorboard", "--json", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("train") / "train", 2, seed=1)


def test_resume_of_a_run_killed_before_its_config_starts_it(train_folder, tmp_path, capsys):
    half = tmp_path / "half"
    half.mkdir()
    (half / "init.txt").write_text("conv1_1  random\n")  # what a kill during set-up could leave
    never = tmp_path / "never"  # killed before its folder was made (e.g. while downloading)
    for out in (half, never):
        assert main(train_cmd(train_folder, out, "--resume")) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["resumed_from"] is None and result["steps"] == 2
        assert (out / "config.toml").is_file() and (out / "model.safetensors").is_file()


def test_resume_of_a_run_whose_config_was_lost_continues_from_its_checkpoint(train_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_cmd(train_folder, out, "--max-steps", "1", "--checkpoint-every", "1")) == 0
    capsys.readouterr()
    (out / "config.toml").unlink()
    assert main(train_cmd(train_folder, out, "--resume", "--max-steps", "2")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resumed_from"].endswith("step-000000001.pt") and result["steps"] == 2
    assert (out / "config.toml").is_file()
    assert main(train_cmd(train_folder, out, "--resume", "--lr", "0.5")) == 1  # still checked against it
    assert "option lr is" in capsys.readouterr().err


def test_the_config_is_the_run_folders_first_file(train_folder, tmp_path, monkeypatch, capsys):
    import verydeep.train.trainer as trainer

    real = trainer.write_text

    def killed_at_init_txt(path, text):
        if Path(path).name == "init.txt":
            raise KeyboardInterrupt  # killed right after the run folder's first write
        return real(path, text)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "write_text", killed_at_init_txt)
    assert main(train_cmd(train_folder, out)) == 130
    assert sorted(p.name for p in out.iterdir()) == ["config.toml"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(train_cmd(train_folder, out, "--resume")) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_chunk_store_folder_under_a_file_is_one_line(blocker):
    with pytest.raises(VerydeepError, match=f"{blocker} is a file, not a folder"):
        ChunkStore(blocker / "out.parts").begin({"a": 1}, resume=False)
