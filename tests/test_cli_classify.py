"""`verydeep classify`, `info`, `weights`: output, JSON shape, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from helpers import cli_error_line
from PIL import Image

import verydeep
from verydeep.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verydeep", *args], capture_output=True, text=True, timeout=300)


def test_classify_json_matches_the_model(narrow_weights, image_files, capsys):
    assert (
        main(["classify", *image_files, "--weights", narrow_weights, "--top", "3", "--json", "--batch-size", "2"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    model = verydeep.load(narrow_weights)
    with torch.no_grad():
        probs = torch.softmax(model(model.preprocess([Image.open(p) for p in image_files])), 1)
    assert [r["image"] for r in out] == image_files
    for r, p in zip(out, probs):
        preds = r["predictions"]
        assert len(preds) == 3
        ref = torch.topk(p, 3)
        assert [x["index"] for x in preds] == ref.indices.tolist()
        assert np.allclose([x["probability"] for x in preds], ref.values.numpy(), atol=1e-5)
        assert preds[0]["label"] == f"class{preds[0]['index']}"
        assert preds[0]["probability"] >= preds[1]["probability"] >= preds[2]["probability"]


def test_classify_table_and_bad_image_gives_one_line_error(narrow_weights, image_files, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = run_cli("classify", image_files[0], str(bad), "--weights", narrow_weights)
    assert r.returncode == 1
    assert "probability" in r.stdout and image_files[0] in r.stdout  # the good image is still classified
    assert "broken.jpg" in cli_error_line(r.stderr)


def test_missing_weights_file_is_one_line(image_files, tmp_path):
    r = run_cli("classify", image_files[0], "--weights", str(tmp_path / "missing.caffemodel"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "missing.caffemodel: no such file" in r.stderr


def test_info_reports_parameters_and_flops(narrow_weights, capsys):
    assert main(["info", narrow_weights, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = verydeep.load(narrow_weights)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["config"] == "D"
    names = [l["name"] for l in info["layers"]]
    assert names[:3] == ["conv1_1", "relu1_1", "conv1_2"] and "fc8" in names
    pool5 = next(l for l in info["layers"] if l["name"] == "pool5")
    assert pool5["output"] == [1, 32, 7, 7]
    # FLOPs from the Table 1 spec: 2 x multiply-adds.
    assert info["flops_224"] == 2 * verydeep.configs.multiply_adds("D", width=1 / 16, num_classes=10)


def test_weights_list_and_bad_name(capsys):
    assert main(["weights", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"vgg16", "vgg19"}
    assert next(r for r in rows if r["name"] == "vgg16")["size"] == 553_432_081
    assert main(["weights", "path", "vgg17"]) == 1
