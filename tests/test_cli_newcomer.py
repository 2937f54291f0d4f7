"""The first hour of a new user: quick help, one spelling per flag, honest precision, no stale
results, no tracebacks, and clear words for inputs that look wrong."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import photo, random_vgg

import verydeep
from verydeep.cli import build_parser, main
from verydeep.data.eval_set import EvalSet, fit_classes, ilsvrc2012_wnids
from verydeep.errors import VerydeepError
from verydeep.formats.safetensors import save_safetensors
from verydeep.models.vgg import InputSpaceWarning

#: Runs the CLI in a fresh interpreter and reports, on its last stderr line, whether torch got imported.
PROBE = (
    "import sys\nfrom verydeep.cli import main\ntry:\n    code = main(sys.argv[1:])\nfinally:\n"
    "    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(code)"
)


def probe(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, input=stdin
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["classify", "--help"], ["weights", "list"], ["weights", "path", "vgg16"], ["bench", "--nope"]]
)
def test_help_registry_and_argument_errors_do_not_import_torch(args):
    r = probe(*args)
    assert r.stderr.strip().splitlines()[-1] == "torch imported: False", r.stderr[-2000:]


def test_weights_path_says_when_the_file_is_not_there():
    r = probe("weights", "path", "vgg16")
    assert r.returncode == 0 and r.stdout.strip().endswith("vgg16.safetensors")
    assert "not there yet" in r.stderr and "verydeep weights download vgg16" in r.stderr


def test_info_of_a_registry_name_needs_no_download(capsys):
    assert main(["info", "vgg16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == "D" and info["parameters"] == 138_357_544
    assert "not downloaded" in info["format"]


# -- one spelling per flag ---------------------------------------------------------------------------
def test_old_spellings_still_parse_but_are_not_listed():
    parser = build_parser()
    assert parser.parse_args(["bench", "--batch", "4", "8"]).batch == [4, 8]
    assert parser.parse_args(["bench", "--batch-size", "2"]).batch == [2]
    help_text = parser._subparsers._group_actions[0].choices["bench"].format_help()  # type: ignore[union-attr]
    assert "--batch-size" in help_text and "--batch " not in help_text


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_and_after_the_subcommand(where, tmp_path):
    missing = str(tmp_path / "missing.caffemodel")
    args = ["--debug", "info", missing] if where == "before" else ["info", missing, "--debug"]
    with pytest.raises(VerydeepError):
        main(args)
    assert main(["info", missing]) == 1  # without --debug: the one-line error


def test_offline_hint_names_no_flag_the_command_lacks():
    from verydeep.hub.cache import fetch

    os.environ["VERYDEEP_MIRROR"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    try:
        with pytest.raises(VerydeepError) as e:
            fetch("vgg16", progress=False)
    finally:
        del os.environ["VERYDEEP_MIRROR"]
    assert "--weights" not in str(e.value) and "/path/to/VGG_ILSVRC_16_layers.caffemodel" in str(e.value)


# -- one line instead of a traceback -----------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(narrow_weights, image_files):
    r = probe("classify", image_files[0], "--weights", narrow_weights, "--device", "cuda")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("verydeep classify: error: --device cuda: no CUDA GPU") and "--device cpu" in lines[0]


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "verydeep", "info", "vgg16", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head` that has exited before the JSON is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # the shell's code for a closed pipe, not a crash
    assert "Traceback" not in err and "BrokenPipe" not in err


# -- destructive defaults --------------------------------------------------------------------------
def test_export_refuses_to_overwrite_its_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = random_vgg("A", num_classes=3, width=1 / 32)
    save_safetensors(model, tmp_path / "net.safetensors", note="kept")
    before = (tmp_path / "net.safetensors").read_bytes()
    assert main(["export", "net.safetensors", "--format", "safetensors"]) == 1
    assert "is the input file" in capsys.readouterr().err
    assert (tmp_path / "net.safetensors").read_bytes() == before


def test_weights_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_safetensors(random_vgg("A", num_classes=3, width=1 / 32), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# -- inputs that look wrong ------------------------------------------------------------------------
def test_unbatched_input_is_a_one_line_error_with_the_fix():
    model = random_vgg("A", num_classes=3, width=1 / 32)
    with pytest.raises(VerydeepError, match=r"found shape \(3, 224, 224\); add the batch dimension"):
        model(torch.zeros(3, 224, 224))


@pytest.mark.parametrize("space", ["rgb01", "torchvision"])
def test_rgb_inputs_in_the_wrong_space_warn(space):
    model = random_vgg("A", num_classes=3, width=1 / 32)
    x = torch.rand(1, 3, 224, 224)
    if space == "torchvision":
        x = (x - 0.45) / 0.226
    with pytest.warns(InputSpaceWarning, match="Caffe space"):
        model(x)
    caffe = random_vgg("A", num_classes=3, width=1 / 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caffe(model.preprocess([photo()]))  # real Caffe input: no warning


def test_a_resnet_state_dict_is_not_called_a_batch_norm_vgg(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(VerydeepError) as e:
        verydeep.load(str(path))
    assert "batch-norm" not in str(e.value) and "not a torchvision VGG state dict" in str(e.value)


def test_a_pickled_whole_model_gets_a_clean_message(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(random_vgg("A", num_classes=3, width=1 / 32), path)
    with pytest.raises(VerydeepError) as e:
        verydeep.load(str(path))
    message = str(e.value)
    assert "\x1b[" not in message and "\n" not in message
    assert "a pickled object" in message and "torch.save(model.state_dict(), path)" in message


# -- registry and ImageNet subsets -----------------------------------------------------------------
def test_the_shipped_wordnet_ids_are_the_sorted_ilsvrc2012_list():
    wnids = ilsvrc2012_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # tench ... toilet tissue


def test_an_imagenet_subset_maps_onto_the_1000_outputs(tmp_path):
    subset = ("n01440764", "n02123045", "n15075141")  # tench, tabby cat, toilet tissue
    ds = EvalSet(tmp_path, (tmp_path / "a.jpg",) * 3, ("a", "b", "c"), (0, 1, 2), subset, "imagefolder")
    fitted = fit_classes(ds, 1000)
    assert fitted.labels == (0, 281, 999)  # their indices in the models' output order
    assert fit_classes(ds, 3) is ds  # a 3-class net keeps the folder order


# -- stale results ---------------------------------------------------------------------------------
@pytest.fixture
def two_nets(tmp_path):
    a = save_safetensors(random_vgg("A", num_classes=4, width=1 / 32, seed=1), tmp_path / "a.safetensors")
    b = save_safetensors(random_vgg("A", num_classes=4, width=1 / 32, seed=2), tmp_path / "b.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        photo(64, 80, seed=i).save(images / f"{i}.jpg")
    return str(a), str(b), images


def test_extract_resume_of_a_finished_file_checks_it_is_the_same_run(two_nets, tmp_path, capsys):
    a, b, images = two_nets
    out = str(tmp_path / "fc7.npz")
    common = ["extract", str(images), "--layer", "fc7", "-o", out, "--no-progress"]
    assert main([*common, "--weights", a]) == 0
    first = np.load(out)["fc7"]
    assert main([*common, "--weights", a, "--resume"]) == 0  # the same run: reported, not recomputed
    capsys.readouterr()
    assert main([*common, "--weights", b, "--resume"]) == 1  # another net: refused, file kept
    err = capsys.readouterr().err
    assert "cannot resume: weights was" in err and "--overwrite" in err
    assert np.array_equal(np.load(out)["fc7"], first)
    assert main([*common, "--weights", b, "--overwrite"]) == 0
    assert not np.array_equal(np.load(out)["fc7"], first)


def test_evaluate_scores_follow_the_same_rule(two_nets, tmp_path, capsys):
    a, b, images = two_nets
    scores = str(tmp_path / "run.npz")
    common = ["evaluate", str(images), "--protocol", "center", "--scales", "224", "--no-progress", "--scores", scores]
    assert main([*common, "--weights", a]) == 0
    first = Path(scores).read_bytes()
    capsys.readouterr()
    assert main([*common, "--weights", a]) == 1  # finished: neither --resume nor --overwrite
    assert "exists (a finished run)" in capsys.readouterr().err
    assert main([*common, "--weights", b, "--resume"]) == 1
    assert "cannot resume: model was" in capsys.readouterr().err
    assert Path(scores).read_bytes() == first
    assert main([*common, "--weights", a, "--resume"]) == 0
    assert main([*common, "--weights", b, "--overwrite"]) == 0
    assert Path(scores).read_bytes() != first


# -- precision said honestly, folders for classify ---------------------------------------------------
def cpu_has_bf16() -> bool:
    """Read from /proc/cpuinfo, independently of the runtime's own capability check."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(flag in text.split() for flag in ("amx_bf16", "avx512_bf16"))


def test_classify_reports_the_precision_it_computed_in(narrow_weights, tmp_path, capsys):
    for i in range(2):
        photo(seed=i).save(tmp_path / f"{i}.jpg")
    assert main(["classify", str(tmp_path), "--weights", narrow_weights, "--precision", "bf16", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert len(out) == 2  # the folder's images
    report = out[0]["precision"]
    assert report["requested"] == "bf16"
    if not cpu_has_bf16():  # computed in fp32 on this CPU: said in the JSON and on stderr
        assert report["computed"] == "fp32"
        assert "not native" in report["note"] and report["note"] in captured.err
    else:
        assert report["computed"] == "bf16" and report["note"] == ""
