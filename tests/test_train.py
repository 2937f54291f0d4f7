"""``verydeep train`` end to end, through the CLI, on tiny generated ImageFolders on the CPU.

Nets are narrow VGG-A/D (width 1/32 or 1/8) at the paper's 224x224 crop. Every run uses one
thread (the machine is shared, and a subprocess with OMP_NUM_THREADS=1 then computes the same
bits as the test process). Expected values come from the paper's rules or from independent
computations, never from the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from helpers import CLASSES, make_image_folder, read_jsonl
from safetensors.torch import load_file

import verydeep
from verydeep import VGG
from verydeep.cli import main
from verydeep.formats.safetensors import save_safetensors
from verydeep.train import KILL_AT_ENV, Trainer, prepare_config

PY = sys.executable
TINY = 1 / 32  # conv1 has 2 channels: a forward/backward pass at 224 takes milliseconds


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """24 training images (6 per class) and 8 validation images, 224..239 px."""
    root = tmp_path_factory.mktemp("tiny")
    return make_image_folder(root / "train", 6, seed=10), make_image_folder(root / "val", 2, seed=11)


#: What every tiny test run shares: 224 crops, batch 8, no loader processes, quiet, on the CPU.
FAST = ["--scale", "224", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard"]


def args(data: Path, out: Path, *extra: str, val: Path | None = None) -> list[str]:
    """A ``verydeep train`` command line for a tiny, fast run (options in ``extra`` win)."""
    base = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--arch",
        "A",
        "--width",
        str(TINY),
        "--epochs",
        "1",
        *FAST,
    ]
    return base + (["--val", str(val)] if val else []) + list(extra)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    e.pop(KILL_AT_ENV, None)
    return {**e, **extra}


def assert_same_training(got: dict, expected: dict, start: dict, rel: float) -> list[float]:
    """Per tensor: max |got - expected| <= rel * max |expected - start| (a fraction of how far
    training moved it). Returns the measured fractions."""
    fractions = []
    for k in expected:
        moved = (expected[k] - start[k]).abs().max().item()
        diff = (got[k] - expected[k]).abs().max().item()
        assert moved > 0, f"{k} did not train"
        assert diff <= rel * moved, f"{k}: max diff {diff:.3g} > {rel:g} x {moved:.3g} (its change in training)"
        fractions.append(diff / moved)
    return fractions


def narrow_net(path: Path, config: str, num_classes: int, seed: int, class_names=None) -> VGG:
    """A random narrow net with non-zero biases, saved to ``path``."""
    torch.manual_seed(seed)
    net = VGG(config, num_classes=num_classes, width=TINY, class_names=class_names)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    save_safetensors(net, path)
    return net


# -- 1. it learns ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> dict:
    """The recipe, with a learning rate for a width-1/8 net on 128 images (the paper's 1e-2 is
    for batch 256 on ImageNet) and no dropout (fc7 has 512 units), on 4 colour classes."""
    root = tmp_path_factory.mktemp("task")
    train, val = make_image_folder(root / "train", 32, seed=0), make_image_folder(root / "val", 16, seed=1)
    out = root / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    code = main(
        args(
            train,
            out,
            "--width",
            "0.125",
            "--lr",
            "3e-4",
            "--dropout",
            "0",
            "--batch-size",
            "16",
            "--epochs",
            "7",
            "--checkpoint-every",
            "0",
            val=val,
        )
    )
    seconds = time.perf_counter() - t0
    torch.set_num_threads(before)
    assert code == 0
    return {"train": train, "val": val, "out": out, "seconds": seconds}


def test_narrow_vgg_a_learns_a_small_task_to_90_percent(learned):
    # On the 2-core development machine (1 thread, shared), 7 epochs of 128 images plus 7
    # validations of 64 take about 20 s; validation top-1 passes 90% after 4-5 epochs.
    print(f"7 epochs took {learned['seconds']:.1f} s")
    records = read_jsonl(learned["out"] / "metrics.jsonl")
    vals = [r for r in records if r["kind"] == "val"]
    assert len(vals) == 7 and vals[0]["images"] == 64
    assert vals[-1]["top1"] >= 0.90, [round(v["top1"], 2) for v in vals]
    assert vals[0]["top1"] < 0.9  # it learned here: it did not start there
    trains = [r for r in records if r["kind"] == "train"]
    assert trains[-1]["loss"] < 0.5 * trains[0]["loss"]
    summary = json.loads((learned["out"] / "summary.json").read_text())
    assert summary["epochs"] == 7 and summary["steps"] == 7 * (128 // 16)


def test_trained_weights_load_and_classify_with_the_class_names(learned, capsys):
    model = verydeep.load(str(learned["out"] / "model.safetensors"))
    assert model.class_names == list(CLASSES) and model.num_classes == 4 and model.config == "A"
    images = sorted((learned["val"] / "red").glob("*.jpg"))[:3] + sorted((learned["val"] / "blue").glob("*.jpg"))[:3]
    assert (
        main(
            [
                "classify",
                *map(str, images),
                "--weights",
                str(learned["out"] / "model.safetensors"),
                "--json",
                "--top",
                "2",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    labels = [r["predictions"][0]["label"] for r in results]
    assert labels.count("red") >= 2 and labels.count("blue") >= 2, labels  # the 256/224 protocol, not the training one


def test_curves_png_is_a_plot_of_the_logged_values(learned, tmp_path):
    from PIL import Image

    from verydeep.train import figure

    png = learned["out"] / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (learned["out"] / "metrics.jsonl").read_text().splitlines()]
    # The figure's lines hold exactly the logged numbers (accuracy in %).
    fig = figure(records)
    loss_ax, acc_ax, lr_ax, grad_ax = fig.axes
    lines = {(ax_i, ln.get_label()): ln for ax_i, ax in enumerate(fig.axes) for ln in ax.get_lines()}
    val = [r for r in records if r["kind"] == "val"]
    train = [r for r in records if r["kind"] == "train"]
    np.testing.assert_allclose(lines[1, "val top-1"].get_ydata(), [100 * r["top1"] for r in val])
    np.testing.assert_allclose(lines[1, "val top-1"].get_xdata(), [r["epoch"] for r in val])
    np.testing.assert_allclose(lines[0, "train"].get_ydata(), [r["loss"] for r in train])
    np.testing.assert_allclose(lines[2, "lr"].get_ydata(), [r["lr"] for r in train])
    np.testing.assert_allclose(lines[3, "train"].get_ydata(), [r["grad_norm"] for r in train])
    # The PNG shows them: a 16 x 3.8 inch figure at 100 dpi with lines in matplotlib's first
    # two colours (train: C0 blue #1f77b4, val: C1 orange #ff7f0e).
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (380, 1600, 3)
    near = lambda rgb: (np.abs(img - np.array(rgb)).sum(-1) < 40).sum()  # noqa: E731
    assert near((0x1F, 0x77, 0xB4)) > 300 and near((0xFF, 0x7F, 0x0E)) > 100
    # `verydeep plot RUN -o FILE` draws the same picture.
    other = tmp_path / "again.png"
    assert main(["plot", str(learned["out"]), "-o", str(other)]) == 0
    assert np.array_equal(np.asarray(Image.open(other).convert("RGB")), img.astype(np.uint8))


# -- 2. robustness ---------------------------------------------------------------------------
def test_sigkill_during_an_epoch_then_resume_gives_the_same_weights(tiny, tmp_path, capsys):
    train, val = tiny
    # 2 epochs x 3 steps; checkpoints at steps 2, 3 (epoch end), 4 and 6; killed right after
    # step 5 (epoch 2, step 2 of 3), so the resumed run restarts inside epoch 2 from step 4 and
    # redoes step 5. Dropout, flips, PCA lighting and scale jittering are all on: every random
    # number must be restored or re-derived. The killed run decodes in a worker process.
    common = ["--epochs", "2", "--scale", "224", "240", "--checkpoint-every", "2", "--deterministic", "--seed", "7"]
    whole = tmp_path / "whole"
    assert main(args(train, whole, *common, val=val)) == 0
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: the orphaned worker may linger
        r = subprocess.run(
            [PY, "-m", "verydeep", *args(train, killed, *common, "--workers", "1", val=val)],
            env=env(**{KILL_AT_ENV: "5"}),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert r.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "model.safetensors").exists()
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*.pt"))[-1] == "step-000000004.pt"
    capsys.readouterr()
    assert main(args(train, killed, *common, "--resume", val=val)) == 0
    assert "epoch 2, 1 of 3 steps done" in capsys.readouterr().err  # the position inside the epoch
    a, b = weights(whole / "model.safetensors"), weights(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"
    # The metrics file holds each step once, and both runs logged the same numbers.
    steps = [(r["kind"], r["step"]) for r in read_jsonl(killed / "metrics.jsonl")]
    assert len(steps) == len(set(steps))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_s")} for r in rs]  # noqa: E731
    assert strip(read_jsonl(killed / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    # The last K=3 checkpoints are kept; no temporary files are left behind.
    names = ["step-000000003.pt", "step-000000004.pt", "step-000000006.pt"]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == names


def test_resume_refuses_to_change_what_is_computed(tiny, tmp_path, capsys):
    train, _ = tiny
    out = tmp_path / "run"
    assert main(args(train, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(args(train, out, "--max-steps", "2", "--lr", "0.5", "--resume")) == 1
    assert "option lr is unset (its default)" in capsys.readouterr().err
    assert main(args(train, out, "--max-steps", "2")) == 1  # no --resume: the folder holds a run
    assert "--resume" in capsys.readouterr().err
    assert main(args(train, out, "--max-steps", "2", "--resume")) == 0  # max_steps may change


def test_unreadable_image_is_skipped_and_logged(tmp_path, capsys):
    train = make_image_folder(tmp_path / "train", 2, seed=3)
    bad = train / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (train / "blue" / "truncated.jpg").write_bytes((train / "blue" / "blue_000.jpg").read_bytes()[:200])
    out = tmp_path / "run"
    # 10 files, batch 5: two steps, each drawing 5 of them in the epoch's random order.
    assert main(args(train, out, "--batch-size", "5")) == 0
    err = capsys.readouterr().err
    assert f"skipped unreadable image {bad}" in err
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in skipped) == sorted([str(bad), str(train / "blue" / "truncated.jpg")])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["skipped"]) == 2 and summary["steps"] == 2
    assert all(torch.isfinite(t).all() for t in weights(out / "model.safetensors").values())


# -- 3. scale --------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny, tmp_path):
    train, val = tiny
    # Dropout masks are drawn per rank, so the comparison turns dropout off; everything else
    # (augmentation, order, the mean over the global batch of 8) is split-independent.
    common = ["--max-steps", "3", "--dropout", "0", "--lr", "1e-3", "--json", "--scale", "224", "240"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(train, one, *common, val=val)) == 0
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "verydeep"]
    r = subprocess.run(
        [*torchrun, *args(train, two, *common, val=val)], env=env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count('"steps": 3') == 1  # rank 0 alone reports
    assert "batch 8 = 2 rank(s) x 1 x 4" in r.stderr
    a, b = weights(one / "model.safetensors"), weights(two / "model.safetensors")
    # Tolerance, per tensor: 1e-3 of how far the 3 steps moved it (float32 sums in another
    # order: each rank sums 4 images, gloo adds the halves). A wrong split (another batch, a
    # mean over 4 instead of 8) moves tensors by a different amount altogether.
    assert_same_training(b, a, _initial_weights(train, tmp_path / "init"), 1e-3)
    va = [r for r in read_jsonl(one / "metrics.jsonl") if r["kind"] == "val"]
    vb = [r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "val"]
    assert vb[0]["images"] == va[0]["images"] == 8  # each validation image counted once
    assert abs(va[0]["loss"] - vb[0]["loss"]) < 1e-4


def _initial_weights(train: Path, out: Path) -> dict[str, torch.Tensor]:
    """The parameters a run starts from (Glorot, seeded by --seed 0), without training."""
    cfg = prepare_config(
        None,
        {
            "data": str(train),
            "out": str(out),
            "arch": "A",
            "width": TINY,
            "scale": [224],
            "batch_size": 8,
            "device": "cpu",
            "tensorboard": False,
            "progress": False,
        },
    )
    job = Trainer(cfg, log=lambda msg: None)
    state = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
    job.close()
    return state


def test_gradient_accumulation_gives_the_full_batch_step(tiny, tmp_path, capsys):
    train, _ = tiny
    common = ["--batch-size", "8", "--max-steps", "2", "--dropout", "0", "--lr", "1e-3"]
    assert main(args(train, tmp_path / "full", *common)) == 0
    assert main(args(train, tmp_path / "micro", *common, "--micro-batch", "2")) == 0
    assert "batch 8 = 1 rank(s) x 4 x 2" in capsys.readouterr().err
    a, b = weights(tmp_path / "full" / "model.safetensors"), weights(tmp_path / "micro" / "model.safetensors")
    # Tolerance as for torchrun: float32 sums of 4 partial gradients instead of one.
    assert_same_training(b, a, _initial_weights(train, tmp_path / "init"), 1e-3)


def test_one_step_is_the_textbook_sgd_step(tiny, tmp_path):
    """w <- w - lr * (grad of the batch-mean cross-entropy + wd * w): momentum's first step."""
    from verydeep.core.distributed import Context
    from verydeep.data.augment import TrainTransform, to_input
    from verydeep.data.training import LabelledImages, collate, micro_batches, scan_image_folder

    train, _ = tiny
    init = _initial_weights(train, tmp_path / "init")
    out = tmp_path / "run"
    extra = ("--max-steps", "1", "--dropout", "0", "--lr", "0.003", "--weight-decay", "0.01", "--warmup", "0")
    assert main(args(train, out, *extra)) == 0
    # The first batch, rebuilt by hand: the epoch-0 order and the per-image augmentation.
    folder = scan_image_folder(train)
    keys = micro_batches(len(folder), 8, 8, Context(), 0, 0)[0]
    data = LabelledImages(folder, TrainTransform((224, 224), 224, True, 0.1, 0))
    batch = collate([data[k] for k in keys], 224)
    net = VGG("A", num_classes=4, width=TINY)
    net.load_state_dict(init)
    net.drop6.p = net.drop7.p = 0.0
    loss = torch.nn.functional.cross_entropy(net(to_input(batch.crops, batch.shifts)), batch.labels)
    loss.backward()
    got = weights(out / "model.safetensors")
    for name, p in net.named_parameters():
        expected = init[name] - 0.003 * (p.grad + 0.01 * init[name])
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-7, msg=name)


# -- 4. initialisation and fine-tuning ---------------------------------------------------------
def test_init_from_a_shallower_net_copies_exactly_the_paper_layers(tiny, tmp_path, capsys):
    train, _ = tiny
    a = narrow_net(tmp_path / "A.safetensors", "A", 4, seed=1)
    out = tmp_path / "D"
    cfg = prepare_config(
        None,
        {
            "data": str(train),
            "out": str(out),
            "arch": "D",
            "width": TINY,
            "scale": [224],
            "init": str(tmp_path / "A.safetensors"),
            "batch_size": 8,
            "device": "cpu",
            "tensorboard": False,
            "progress": False,
        },
    )
    job = Trainer(cfg, log=print)
    d = job.model
    job.close()
    # The paper (Sec. 3.1): "the first four convolutional layers and the last three fully-connected layers".
    copied = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]
    drawn = ["conv1_2", "conv2_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    for name in copied:
        for kind in ("weight", "bias"):
            assert torch.equal(getattr(getattr(d, name), kind), getattr(getattr(a, name), kind)), name
    standardised = []
    # balanced: N(0, 2 / fan_in) times g = (0.5 / 57.63)^(1/16) for D's 16 parameter layers
    # (Caffe-space pixels of RMS 0.226 x 255 become logits of RMS 0.5).
    gain = (0.5 / (0.226 * 255)) ** (1 / 16)
    for name in drawn:
        layer = getattr(d, name)
        assert torch.all(layer.bias == 0), name  # zero biases
        fan_in = layer.weight.shape[1] * 9
        standardised.append(layer.weight.flatten() / (gain * (2 / fan_in) ** 0.5))
    # Divided by their std the weights are N(0, 1); over n > 10,000 values the sample std's
    # relative standard error is 1/sqrt(2n) < 1%.
    z = torch.cat(standardised)
    assert z.numel() > 10_000 and abs(z.std().item() - 1) < 0.05 and abs(z.mean().item()) < 0.05
    table = capsys.readouterr().out
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}
    assert [n for n, line in rows.items() if "copied from" in line] == copied[:4] + ["fc6", "fc7", "fc8"]
    assert all("random (balanced)" in rows[n] for n in drawn)
    saved = {line.split()[0]: line.split(None, 2)[2] for line in (out / "init.txt").read_text().splitlines()[2:]}
    assert saved == {n: f"copied from {tmp_path / 'A.safetensors'}" for n in copied} | {
        n: "random (balanced)" for n in drawn
    }
    # Through the CLI, with the layers named explicitly: only those are copied.
    out2 = tmp_path / "D2"
    assert (
        main(
            args(
                train,
                out2,
                "--arch",
                "D",
                "--init",
                str(tmp_path / "A.safetensors"),
                "--init-layers",
                "conv1_1",
                "fc8",
                "--max-steps",
                "1",
            )
        )
        == 0
    )
    init_txt = (out2 / "init.txt").read_text()
    assert [line.split()[0] for line in init_txt.splitlines() if "copied from" in line] == ["conv1_1", "fc8"]


def test_init_from_a_net_with_other_shapes_is_an_error(tiny, tmp_path, capsys):
    train, _ = tiny
    narrow_net(tmp_path / "A10.safetensors", "A", 10, seed=1)  # 10 classes: fc8 cannot be copied
    assert main(args(train, tmp_path / "run", "--arch", "D", "--init", str(tmp_path / "A10.safetensors"))) == 1
    assert "fc8" in capsys.readouterr().err


@pytest.fixture
def source(tmp_path) -> tuple[Path, VGG]:
    """A narrow "VGG-16" with 10 ImageNet-like classes to fine-tune from."""
    path = tmp_path / "vgg16-narrow.safetensors"
    return path, narrow_net(path, "D", 10, seed=2, class_names=[f"n0000000{i}" for i in range(10)])


def _finetune_config(train: Path, out: Path, src: Path, **extra) -> dict:
    return {
        "data": str(train),
        "out": str(out),
        "weights": str(src),
        "scale": [224],
        "batch_size": 8,
        "device": "cpu",
        "tensorboard": False,
        "progress": False,
        **extra,
    }


def test_fine_tuning_replaces_only_fc8_and_says_so(tiny, tmp_path, source, capsys):
    train, _ = tiny
    src_path, src = source
    job = Trainer(prepare_config(None, _finetune_config(train, tmp_path / "ft", src_path, num_classes=4)), log=print)
    model = job.model
    job.close()
    assert "fc8: replaced" in capsys.readouterr().out
    assert model.config == "D" and model.width == TINY and model.class_names == list(CLASSES)
    for name, p in model.named_parameters():
        if name.startswith("fc8"):
            assert p.shape[0] == 4
        else:
            assert torch.equal(p, src.state_dict()[name]), name
    assert model.fc8.weight.shape == (4, src.fc8.weight.shape[1])
    # --num-classes must agree with the folders.
    assert main(args(train, tmp_path / "bad", "--weights", str(src_path), "--num-classes", "5")) == 1
    assert "4 class folders" in capsys.readouterr().err


def test_fine_tuned_frozen_layers_do_not_change_and_the_result_classifies(tiny, tmp_path, source, capsys):
    train, val = tiny
    src_path, src = source
    out = tmp_path / "ft"
    code = main(
        [
            "train",
            "--weights",
            str(src_path),
            "--num-classes",
            "4",
            "--data",
            str(train),
            "--val",
            str(val),
            "--freeze-through",
            "conv4_1",
            "--lr-mult",
            "fc8=10",
            "--lr",
            "1e-3",
            "--epochs",
            "1",
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "fc8: replaced (128 -> 10 classes" in err  # a 1/32-wide net's fc7 has 128 outputs
    assert "frozen: conv1_1, conv1_2, conv2_1, conv2_2, conv3_1, conv3_2, conv3_3, conv4_1" in err
    got = weights(out / "model.safetensors")
    before = src.state_dict()
    frozen = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1"]
    for name in got:
        layer = name.split(".")[0]
        if layer in frozen:
            assert torch.equal(got[name], before[name]), f"{name} changed although frozen"
        elif layer != "fc8":
            assert not torch.equal(got[name], before[name]), f"{name} did not train"
    # The weights file is a verydeep model with the user's class names ...
    model = verydeep.load(str(out / "model.safetensors"))
    assert model.class_names == list(CLASSES) and model.num_classes == 4 and model.config == "D"
    # ... that classify, evaluate and extract accept.
    image = sorted((val / "green").glob("*.jpg"))[0]
    assert main(["classify", str(image), "--weights", str(out / "model.safetensors"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert sorted(p["label"] for p in preds) == sorted(CLASSES)
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-5
    assert (
        main(
            [
                "evaluate",
                str(val),
                "--weights",
                str(out / "model.safetensors"),
                "--protocol",
                "center",
                "--device",
                "cpu",
                "--workers",
                "0",
                "--no-progress",
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    feats = tmp_path / "f.npz"
    assert (
        main(
            [
                "extract",
                str(val),
                "--layer",
                "fc7",
                "--weights",
                str(out / "model.safetensors"),
                "-o",
                str(feats),
                "--workers",
                "0",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with np.load(feats) as z:
        assert any(z[k].shape == (8, 128) for k in z.files)


def test_lr_mult_scales_that_layers_step(tiny, tmp_path, source):
    train, _ = tiny
    src_path, src = source
    runs = {}
    for tag, extra in (
        ("plain", []),
        ("mult", ["--lr-mult", "fc8=10", "--lr-mult", "fc8.bias=20", "--lr-mult", "conv5_3=0.5"]),
    ):
        out = tmp_path / tag
        assert (
            main(
                [
                    "train",
                    "--weights",
                    str(src_path),
                    "--data",
                    str(train),
                    "--out",
                    str(out),
                    "--max-steps",
                    "1",
                    *FAST,
                    *extra,
                ]
            )
            == 0
        )
        runs[tag] = weights(out / "model.safetensors")
    # Both runs start from the same weights (fc8 drawn from the same seed) and see the same batch
    # and dropout masks, so with momentum's first step (v = g + wd*w) each update is lr*mult*v.
    start = {k: v for k, v in src.state_dict().items() if not k.startswith("fc8")}
    job = Trainer(prepare_config(None, _finetune_config(train, tmp_path / "init", src_path)), log=lambda m: None)
    start.update({k: v.detach().clone() for k, v in job.model.state_dict().items() if k.startswith("fc8")})
    job.close()
    step = {tag: {k: w[k] - start[k] for k in w} for tag, w in runs.items()}
    expected = {
        "fc8.weight": 10.0,
        "fc8.bias": 20.0,
        "conv5_3.weight": 0.5,
        "conv5_3.bias": 0.5,
        "fc7.weight": 1.0,
        "conv1_1.weight": 1.0,
    }
    for name, mult in expected.items():
        assert step["plain"][name].abs().max() > 0, name
        # atol: a difference of float32 weights of size <= 1 is exact to ~1e-7 (a few ulps)
        torch.testing.assert_close(
            step["mult"][name],
            mult * step["plain"][name],
            rtol=1e-4,
            atol=3e-7 * mult,
            msg=lambda m, n=name: f"{n}: {m}",
        )


# -- 5. schedule, configuration, observability ---------------------------------------------------
def test_learning_rate_drops_tenfold_on_a_plateau_at_most_three_times(tiny, tmp_path):
    train, val = tiny
    out = tmp_path / "run"
    # threshold 1.0: after the first validation no epoch counts as an improvement, so with
    # patience 1 each further epoch is a plateau; the paper drops the LR 3 times, then stops.
    assert (
        main(
            args(
                train,
                out,
                "--epochs",
                "6",
                "--plateau-patience",
                "1",
                "--plateau-threshold",
                "1.0",
                "--lr-mult",
                "fc8=10",
                "--batch-size",
                "24",
                "--lr",
                "0.01",
                "--no-divergence-checks",
                val=val,
            )
        )
        == 0
    )
    records = read_jsonl(out / "metrics.jsonl")
    train_lr = [r["lr"] for r in records if r["kind"] == "train"]  # one step per epoch
    np.testing.assert_allclose(train_lr, [1e-2, 1e-2, 1e-3, 1e-4, 1e-5, 1e-5], rtol=1e-9)
    # The optimizer used it: the last checkpoint's groups hold LR x lr_mult.
    last = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    groups = torch.load(last, weights_only=True)["optimizer"]["param_groups"]
    got = sorted((g["lr_mult"], g["lr"]) for g in groups)
    assert [m for m, _ in got] == [1.0, 10.0]
    np.testing.assert_allclose([lr for _, lr in got], [1e-5, 1e-4], rtol=1e-9)


def test_plateau_rule():
    from verydeep.train import Plateau

    p = Plateau(factor=0.1, patience=2, max_drops=3)
    drops = [p.step(t) for t in [0.30, 0.40, 0.40, 0.39, 0.45, 0.44, 0.44, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50]]
    # best 0.40 at epoch 2; epochs 3, 4 do not beat it -> drop; 0.45 is a new best; 6, 7 -> drop;
    # 0.50 new best; 9, 10 -> drop (third); then never again.
    assert [i + 1 for i, d in enumerate(drops) if d] == [4, 7, 10]
    assert p.scale == pytest.approx(1e-3)


def test_toml_config_with_cli_overrides_is_saved_as_the_effective_config(tiny, tmp_path, capsys):
    train, _ = tiny
    folder = tmp_path / "cfg"
    folder.mkdir()
    os.symlink(train, folder / "mydata")
    (folder / "run.toml").write_text(
        'arch = "A"\nwidth = 0.03125\ndata = "mydata"\nscale = [224, 232]\nbatch_size = 8\nmicro_batch = 4\n'
        'lr = 0.05\nepochs = 3\nmax_steps = 1\nworkers = 0\ndevice = "cpu"\nmetrics_format = "csv"\n'
        "tensorboard = false\nprogress = false\n\n[lr_mult]\nfc8 = 10\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config-file",
                str(folder / "run.toml"),
                "--lr",
                "0.002",
                "--out",
                str(out),
                "--weight-decay",
                "0",
            ]
        )
        == 0
    )
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["lr"] == 0.002 and saved["weight_decay"] == 0  # flags win
    assert saved["batch_size"] == 8 and saved["micro_batch"] == 4 and saved["scale"] == [224, 232]  # from the file
    assert saved["lr_mult"] == {"fc8": 10.0} and saved["epochs"] == 3
    assert saved["data"] == str((folder / "mydata").resolve())  # relative to the config file, made absolute
    assert saved["momentum"] == 0.9 and saved["dropout"] == 0.5 and saved["max_lr_drops"] == 3  # the recipe
    assert saved["out"] == str(out.resolve())
    assert (out / "metrics.csv").exists() and not (out / "metrics.jsonl").exists()
    # The saved file is a config file: it reproduces the run's options.
    again = prepare_config(out / "config.toml", {"out": str(tmp_path / "again")}).to_dict()
    assert {k: v for k, v in again.items() if v is not None and k != "out"} == {
        k: v for k, v in saved.items() if k != "out"
    }
    # --init FROM is a path like data (relative to the file); a scheme name is not.
    (folder / "init.toml").write_text('init = "nets/A.safetensors"\n')
    assert prepare_config(folder / "init.toml").init == str(folder.resolve() / "nets" / "A.safetensors")
    (folder / "init.toml").write_text('init = "normal"\n')
    assert prepare_config(folder / "init.toml").init == "normal"
    # Mistakes name the option.
    (folder / "bad.toml").write_text("batch_sise = 8\n")
    assert main(["train", "--config-file", str(folder / "bad.toml")]) == 1
    assert "batch_size" in capsys.readouterr().err
    assert main(args(train, tmp_path / "c", "--crop", "160")) == 1
    assert "crop" in capsys.readouterr().err


def test_scale_jitter_crop_flip_and_colour_shift():
    from verydeep.data.augment import IMAGENET_EIGVAL, TrainTransform

    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    t = TrainTransform((256, 512), 224, True, 0.1, seed=0)
    picks = [t.apply(image, 0, i)[2] for i in range(400)]
    sizes = [p["S"] for p in picks]
    assert min(sizes) >= 256 and max(sizes) <= 512 and max(sizes) - min(sizes) > 200  # S drawn per image
    assert 150 < sum(p["flip"] for p in picks) < 250
    crop, shift, _ = t.apply(image, 0, 0)
    assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
    # PCA lighting: alpha ~ N(0, 0.1) per component; the largest eigenvalue's shift dominates.
    alphas = np.array([p["alpha"] for p in picks])
    assert abs(alphas.std() - 0.1) < 0.01
    assert np.abs(shift.numpy()).max() < 6 * 0.1 * IMAGENET_EIGVAL[0] * 255
    # The same (seed, epoch, index) gives the same crop; another epoch another one.
    assert torch.equal(t(image, 3, 5)[0], t(image, 3, 5)[0])
    assert not torch.equal(t(image, 3, 5)[0], t(image, 4, 5)[0])


def test_a_run_leaves_torch_flags_as_it_found_them(tiny, tmp_path):
    train, _ = tiny
    assert not torch.are_deterministic_algorithms_enabled()
    assert main(args(train, tmp_path / "ok", "--max-steps", "1", "--deterministic")) == 0
    assert not torch.are_deterministic_algorithms_enabled()
    assert main(args(train, tmp_path / "bad", "--deterministic", "--num-classes", "7")) == 1  # fails while setting up
    assert not torch.are_deterministic_algorithms_enabled()


# -- 6. a run that cannot die silently -----------------------------------------------------------
def _strict_json(path: Path) -> dict:
    def refuse(name: str):
        raise AssertionError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("verydeep train: error:")]


def test_an_init_that_blows_the_inputs_up_stops_at_step_1_with_one_line(tiny, tmp_path, capsys):
    train, val = tiny
    out = tmp_path / "run"
    # N(0, 1) weights on Caffe-space pixels (+-130): the logits reach ~1e3 at width 1/32, the
    # loss ~1e3, far over 10 x ln(4) = 13.9.
    code = main(args(train, out, "--init", "normal", "--init-std", "1.0", "--epochs", "2", val=val))
    err = capsys.readouterr().err
    assert code == 1
    (line,) = _error_lines(err)
    assert "stopped at step 1 (epoch 0.333)" in line and "the first step's loss is" in line
    assert "try --init balanced (this run: normal)" in line and "no checkpoint was written before it" in line
    assert not (out / "model.safetensors").exists() and not list((out / "checkpoints").glob("*.pt"))
    summary = _strict_json(out / "summary.json")
    assert summary["stopped"] == line.removeprefix("verydeep train: error: ") and summary["weights"] is None
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["train", "stop"] and records[1]["reason"] == "start"
    assert records[0]["loss"] > 10 * np.log(4)  # the loss panel has its point
    assert (out / "curves.png").exists()


def test_a_nan_loss_stops_keeping_the_last_good_checkpoint(tiny, tmp_path, capsys):
    train, val = tiny
    out = tmp_path / "run"
    # LR 1e30: step 1 moves the weights to ~1e28, so step 2's activations overflow float32.
    extra = ["--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1", "--log-every", "1", "--epochs", "2"]
    code = main(args(train, out, *extra, val=val))
    err = capsys.readouterr().err
    assert code == 1
    (line,) = _error_lines(err)
    ckpt = out / "checkpoints" / "step-000000001.pt"
    assert "stopped at step 2" in line and "the loss became NaN or infinite" in line and "the first at step 2" in line
    assert f"the last good checkpoint is {ckpt}" in line and "try --lr 0.000313 (the rule for batch 8" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name]  # none of the NaN weights
    state = torch.load(ckpt, weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    summary = _strict_json(out / "summary.json")  # strict JSON: NaN nowhere
    assert summary["steps"] == 2 and summary["weights"] is None and summary["stopped"].startswith("stopped at step 2")
    records = read_jsonl(out / "metrics.jsonl")
    assert records[0]["kind"] == "train" and np.isfinite(records[0]["loss"])  # step 1 is plotted
    assert records[1]["kind"] == "train" and records[1]["nonfinite"] >= 1 and "loss" not in records[1]
    assert records[-1]["kind"] == "stop" and records[-1]["reason"] == "nonfinite"


def test_a_dead_net_stops_after_the_first_epochs_past_warm_up(tiny, tmp_path, capsys):
    train, val = tiny
    out = tmp_path / "run"
    # Weights of std 1e-6: the logits are ~0 for every image and the gradients vanish: the net
    # predicts the label frequencies (loss ln(4), top-1 of a guess). Batch 1: 24 steps an epoch.
    # Warm-up is epoch 1; the rule wants whole epochs at chance worth >= 150 steps: 7 epochs
    # (168 steps), so the run stops at the end of epoch 8, step 192, not after 20 epochs.
    extra = ["--init", "normal", "--init-std", "1e-6", "--epochs", "20", "--batch-size", "1", "--log-every", "24"]
    code = main(args(train, out, *extra))
    err = capsys.readouterr().err
    assert code == 1
    (line,) = _error_lines(err)
    assert "stopped at step 192 (epoch 8)" in line and "the net is dead: 7 whole epoch(s) (168 steps)" in line
    assert "ln(4)" in line and "--warmup 2 (this run: 1 epoch(s))" in line
    assert "the last good checkpoint is" in line and line.endswith("step-000000168.pt")
    summary = _strict_json(out / "summary.json")
    assert summary["epochs"] == 8 and summary["steps"] == 192 and summary["weights"] is None
    assert not (out / "checkpoints" / "step-000000192.pt").exists()  # nothing written after the stop
    # The same net with the checks off runs every epoch, and the plateau rule never drops the
    # LR of a net at chance (patience 1, and no epoch beats the first: it would drop each epoch).
    out2 = tmp_path / "unchecked"
    extra = ["--init", "normal", "--init-std", "1e-6", "--epochs", "4", "--no-divergence-checks"]
    extra += ["--plateau-patience", "1", "--plateau-threshold", "1.0", "--lr", "0.01"]
    assert main(args(train, out2, *extra, val=val)) == 0
    lrs = [r["lr"] for r in read_jsonl(out2 / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(0.01, rel=1e-12)


def test_gradient_clipping_and_the_logged_gradient_norm(tiny, tmp_path):
    """With ``--clip-grad-norm C`` the step is SGD's on g * min(1, C / ||g||); ``grad_norm`` is ||g||."""
    from verydeep.core.distributed import Context
    from verydeep.data.augment import TrainTransform, to_input
    from verydeep.data.training import LabelledImages, collate, micro_batches, scan_image_folder

    train, _ = tiny
    init = _initial_weights(train, tmp_path / "init")
    out = tmp_path / "run"
    extra = ("--max-steps", "1", "--dropout", "0", "--lr", "0.003", "--weight-decay", "0", "--warmup", "0")
    assert main(args(train, out, *extra, "--clip-grad-norm", "0.5", "--log-every", "1")) == 0
    folder = scan_image_folder(train)
    keys = micro_batches(len(folder), 8, 8, Context(), 0, 0)[0]
    batch = collate([LabelledImages(folder, TrainTransform((224, 224), 224, True, 0.1, 0))[k] for k in keys], 224)
    net = VGG("A", num_classes=4, width=TINY)
    net.load_state_dict(init)
    net.drop6.p = net.drop7.p = 0.0
    torch.nn.functional.cross_entropy(net(to_input(batch.crops, batch.shifts)), batch.labels).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters())).item()
    assert norm > 0.5  # the clip is active
    (record,) = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-4)
    got = weights(out / "model.safetensors")
    for name, p in net.named_parameters():
        expected = init[name] - 0.003 * p.grad * (0.5 / norm)
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_bad_options_leave_no_run_folder_and_output_flags(tiny, tmp_path, capsys):
    train, _ = tiny
    for bad in (["--freeze-through", "conv9_9"], ["--lr-mult", "fc9=2"], ["--num-classes", "7"], ["--warmup", "-1"]):
        out = tmp_path / "bad"
        assert main(args(train, out, *bad)) == 1
        assert len(_error_lines(capsys.readouterr().err)) == 1
        assert not out.exists(), f"{bad} left {sorted(p.name for p in out.iterdir())}"
    # -o and --output name the run folder; --out still works (not in --help).
    for flag in ("-o", "--output"):
        cmd = args(train, tmp_path / flag.strip("-"), "--max-steps", "1")
        cmd[cmd.index("--out")] = flag
        assert main(cmd) == 0
        assert (tmp_path / flag.strip("-") / "model.safetensors").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "-o RUN_DIR, --output RUN_DIR" in help_text and "--out " not in help_text
    # plot: -o into a folder that does not exist is one line, not a traceback.
    assert main(["plot", str(tmp_path / "o"), "-o", str(tmp_path / "missing" / "curves.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["plot", str(tmp_path / "o"), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_plateau_rule_holds_during_warm_up_and_at_chance():
    from verydeep.train import Plateau

    p = Plateau(factor=0.1, patience=3, max_drops=3)
    # Held validations may set a new best but never count: 0.30 is a best, 0.20 x 5 held.
    assert not any(p.step(t, hold=True) for t in [0.30, 0.20, 0.20, 0.20, 0.20, 0.20])
    assert p.best == 0.30 and p.drops == 0
    # Counted ones drop after patience 3 epochs without a new best.
    assert [p.step(t) for t in [0.25, 0.25, 0.25]] == [False, False, True]


def test_chance_level_of_the_labels():
    from scipy.stats import entropy

    from verydeep.train import Watchdog, label_stats

    labels = [0] * 50 + [1] * 30 + [2] * 20
    stats = label_stats(labels, 3)
    assert stats.entropy == pytest.approx(entropy([0.5, 0.3, 0.2]), rel=1e-12) and stats.chance_top1 == 0.5
    dog = Watchdog(stats)
    # A constant guess of class 0 over 1,000 images: top-1 0.5, loss = the entropy: at chance.
    assert dog.at_chance(loss=stats.entropy, top1=0.5, images=1000)
    # 3 binomial standard deviations above 0.5 (3 x 0.0158) is learning; 1% off the loss too.
    assert not dog.at_chance(loss=stats.entropy, top1=0.55, images=1000)
    assert not dog.at_chance(loss=0.98 * stats.entropy, top1=0.5, images=1000)
