"""Hostile inputs to the data side: images, label/list files, Kaggle CSV, the train TOML, scores files.

Every file here is written by the test itself (Pillow, zipfile, numpy, plain bytes): the minimal
input of each defect class of issue 12, and the assertion that it is one ``VerydeepError`` line
naming the file (a skipped-and-reported image for the long jobs), never a raw exception.
"""

from __future__ import annotations

import io
import json
import math
import struct
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_error_line, make_image_folder, one_line, photo, random_vgg
from PIL import Image, ImageFile, features

from verydeep.cli import main
from verydeep.data.eval_set import open_eval_set, read_caffe_list, read_kaggle, read_synsets
from verydeep.data.images import MAX_PATH_BYTES, ImageDataset, read_path_list, read_text
from verydeep.data.preprocess import MAX_ASPECT, MAX_PIXELS, open_image, to_rgb, to_uint8_chw
from verydeep.errors import ImageError, VerydeepError
from verydeep.evaluate.protocols import Protocol
from verydeep.evaluate.results import EvalResult, combine, load_scores, save_scores
from verydeep.evaluate.run import evaluate
from verydeep.train import config as tc


# -- images -----------------------------------------------------------------------------------
def bad_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block says "rotate" and holds an XResolution retyped from RATIONAL to
    ASCII: Pillow reads it, then fails to write the block back while applying the rotation."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    exif[0x011A] = 72.0  # XResolution (RATIONAL)
    block = bytearray(exif.tobytes())
    at = block.index(b"\x01\x1a", 16)  # the XResolution entry (big-endian tag 0x011A)
    block[at + 2 : at + 4] = struct.pack(">H", 2)  # its type: ASCII
    photo(40, 48).save(path, "JPEG", exif=bytes(block))
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels, with an empty IDAT (~69 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tiff_header(width: int, height: int) -> bytes:
    """A baseline TIFF (one strip, no pixel data) claiming ``width`` x ``height``: ~120 bytes."""
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    tags += [(273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 0)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded (the size must be refused from the header)."""

    def load(self):
        raise AssertionError("decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_jpeg_with_a_corrupt_exif_block_is_an_image_error(tmp_path):
    bad = bad_exif_jpeg(tmp_path / "exif.jpg")
    with Image.open(bad) as im:  # the block itself is readable: the failure is in the rotation
        im.load()
    with pytest.raises(ImageError) as e:
        open_image(bad)
    one_line(e, bad, "not a readable image")
    with pytest.raises(ImageError) as e:
        to_uint8_chw(bad)
    with Image.open(bad) as im, pytest.raises(ImageError) as e:  # a PIL image handed in: the same error
        to_rgb(im)
    one_line(e, bad)


@pytest.fixture
def folder_with_bad_exif(tmp_path) -> Path:
    root = tmp_path / "val"
    for n in range(3):
        (root / f"n0000000{n}").mkdir(parents=True)
        photo(230, 250, seed=n).save(root / f"n0000000{n}" / f"img{n}.JPEG", quality=90)
    bad_exif_jpeg(root / "n00000001" / "exif.JPEG")
    return root


def test_evaluate_skips_and_reports_a_jpeg_with_a_corrupt_exif_block(folder_with_bad_exif):
    result = evaluate(
        random_vgg(num_classes=3),
        open_eval_set(folder_with_bad_exif),
        Protocol.make("center", [224], flip=False),
        device="cpu",
        workers=0,
        progress=False,
        batch_size=2,
    )
    assert result.images == 3 and result.skipped == 1
    (failed,) = result.failed
    assert failed["id"] == "n00000001/exif.JPEG" and "not a readable image" in failed["reason"]
    assert "\n" not in failed["reason"]


def test_extract_skips_and_reports_a_jpeg_with_a_corrupt_exif_block(folder_with_bad_exif, tmp_path):
    from verydeep.extract.job import extract

    paths = sorted(folder_with_bad_exif.rglob("*.JPEG"))
    out = tmp_path / "feats.npz"
    result = extract(random_vgg(), paths, ["pool5"], out, batch_size=2, workers=0, progress=False)
    assert result.rows == 3 and [f.path for f in result.failed] == [str(folder_with_bad_exif / "n00000001/exif.JPEG")]
    with np.load(out) as z:
        assert len(z["pool5"]) == 3


def test_train_skips_and_reports_a_jpeg_with_a_corrupt_exif_block(tmp_path, capsys):
    train = make_image_folder(tmp_path / "train", 2, seed=3)
    bad = bad_exif_jpeg(train / "red" / "exif.jpg")
    out = tmp_path / "run"
    fast = ["--scale", "224", "--batch-size", "9", "--epochs", "1", "--workers", "0", "--device", "cpu"]
    fast += ["--no-progress", "--no-tensorboard"]  # 9 images, batch 9: one step draws every image
    code = main(["train", "--data", str(train), "--out", str(out), "--arch", "A", "--width", str(1 / 32)] + fast)
    assert code == 0, capsys.readouterr().err
    assert f"skipped unreadable image {bad}" in capsys.readouterr().err
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(bad)]


def test_classify_reports_a_jpeg_with_a_corrupt_exif_block_and_classifies_the_rest(
    narrow_weights, image_files, tmp_path, capsys
):
    bad = bad_exif_jpeg(tmp_path / "exif.jpg")
    assert main(["classify", image_files[0], str(bad), "--weights", narrow_weights]) == 1
    captured = capsys.readouterr()
    assert image_files[0] in captured.out
    one_line(cli_error_line(captured.err), bad)


def test_png_claiming_1x100m_pixels_is_refused_from_its_header(tmp_path, no_decoding):
    path = tmp_path / "strip.png"
    path.write_bytes(png_header(1, 100_000_000))
    assert path.stat().st_size < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape either
        with pytest.raises(ImageError) as e:
            open_image(path)
    one_line(e, path, "100,000,000 pixels", f"{MAX_PIXELS:,}")


def test_tiff_claiming_terapixels_is_refused_from_its_header(tmp_path, no_decoding):
    path = tmp_path / "huge.tif"
    path.write_bytes(tiff_header(200_000, 200_000))
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line(e, path, "40,000,000,000 pixels")


@pytest.mark.parametrize("side", [9000, 10_000])  # below Pillow's warning (89M), and between warning and error
def test_images_beyond_the_pixel_budget_are_refused_where_pillow_would_only_warn(tmp_path, no_decoding, side):
    path = tmp_path / "big.png"
    path.write_bytes(png_header(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as e:
            open_image(path)
    one_line(e, path, f"{side * side:,} pixels")


def test_a_thin_strip_within_the_pixel_budget_is_refused_by_its_aspect_ratio(tmp_path, no_decoding):
    path = tmp_path / "strip.png"
    path.write_bytes(png_header(1, 30_000_000))  # 30M pixels fit the budget; rescaled to Q=512: 15 G pixels
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line(e, path, "1x30000000", f"{MAX_ASPECT} times")


def test_panorama_at_the_aspect_limit_is_read(tmp_path):
    Image.new("RGB", (10 * MAX_ASPECT, 10), (1, 2, 3)).save(tmp_path / "ok.png")
    assert open_image(tmp_path / "ok.png").size == (10 * MAX_ASPECT, 10)
    Image.new("RGB", (10 * MAX_ASPECT + 1, 10)).save(tmp_path / "wide.png")
    with pytest.raises(ImageError):
        open_image(tmp_path / "wide.png")


@pytest.mark.parametrize(
    "fmt, suffix",
    [("JPEG", "jpg"), ("PNG", "png"), ("TIFF", "tif"), ("GIF", "gif"), ("BMP", "bmp"), ("PPM", "ppm")]
    + ([("WEBP", "webp")] if features.check("webp") else []),
)
def test_every_format_of_the_scanned_suffixes_decodes(tmp_path, fmt, suffix):
    path = tmp_path / f"im.{suffix}"
    photo(32, 40).save(path, fmt)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (40, 32)


def test_formats_verydeep_does_not_read_are_refused_unopened(tmp_path):
    eps = tmp_path / "figure.jpg"  # an EPS would run Ghostscript; its suffix is no excuse
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError) as e:
        open_image(eps)
    one_line(e, eps, "not an image in a format verydeep reads")


@pytest.mark.parametrize(
    "error", [OSError("boom"), ValueError("boom"), SyntaxError("boom"), MemoryError(), struct.error("boom"),
              IndexError("boom"), ZeroDivisionError("boom"), EOFError(), KeyError("boom"), TypeError("boom")],
    ids=lambda e: type(e).__name__,
)  # fmt: skip
def test_every_failure_inside_a_decoder_is_an_image_error(tmp_path, monkeypatch, error):
    path = tmp_path / "im.png"
    photo(16, 16).save(path)

    def load(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line(e, path, type(error).__name__)
    index, item = ImageDataset([path])[0]  # what the jobs see: a Failed record, not an exception
    assert index == 0 and type(error).__name__ in item.reason


def test_truncated_and_unidentified_files_are_image_errors(tmp_path):
    good = tmp_path / "good.jpg"
    photo(64, 64).save(good, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:300])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 40)
    for path in (cut, junk, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ImageError) as e:
            open_image(path)
        one_line(e, path)


# -- label and list files ---------------------------------------------------------------------
WNIDS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture
def flat(tmp_path) -> Path:
    """``flat/`` with the three images the label files below name."""
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(1, 4):
        photo(32, 32, seed=i).save(root / f"ILSVRC2012_val_{i:08d}.JPEG")
    return root


def write_kaggle(folder: Path, rows: list[str]) -> Path:
    (folder / "LOC_synset_mapping.txt").write_text("".join(f"{w} words\n" for w in WNIDS))
    path = folder / "LOC_val_solution.csv"
    path.write_text("ImageId,PredictionString\n" + "".join(r + "\n" for r in rows))
    return path


LATIN1 = "caf\xe9".encode("latin-1")  # what a non-UTF-8 editor writes


@pytest.mark.parametrize("which", ["synsets", "caffe", "devkit-detect", "kaggle", "path-list"])
def test_label_and_list_files_that_are_not_utf8_name_file_and_line(tmp_path, flat, which):
    if which == "synsets":
        path = tmp_path / "synset_words.txt"
        path.write_bytes(b"n01440764 tench\n# " + LATIN1 + b"\n")
        call = lambda: read_synsets(path)  # noqa: E731
    elif which == "caffe":
        path = tmp_path / "val.txt"
        path.write_bytes(b"ILSVRC2012_val_00000001.JPEG 0\n" + LATIN1 + b".JPEG 1\n")
        call = lambda: read_caffe_list(path, flat)  # noqa: E731
    elif which == "devkit-detect":
        path = tmp_path / "ground_truth.txt"
        path.write_bytes(b"\n" + LATIN1 + b"\n")
        call = lambda: open_eval_set(flat, path)  # noqa: E731
    elif which == "kaggle":
        path = write_kaggle(tmp_path, [])
        path.write_bytes(b"ImageId,PredictionString\n" + LATIN1 + b",n01440764 1 2 3 4\n")
        call = lambda: read_kaggle(path, flat)  # noqa: E731
    else:
        path = tmp_path / "list.txt"
        path.write_bytes(b"a.jpg\n" + LATIN1 + b".jpg\n")
        call = lambda: read_path_list(path)  # noqa: E731
    with pytest.raises(VerydeepError) as e:
        call()
    one_line(e, path, "line 2", "not UTF-8")


def test_paths_on_stdin_that_are_not_utf8_name_the_line(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a.jpg\nb.jpg\n" + LATIN1 + b"\n")))
    with pytest.raises(VerydeepError) as e:
        read_path_list("-")
    one_line(e, "stdin", "line 3", "byte 0xe9")


def test_kaggle_csv_with_only_its_header_is_an_error_not_an_empty_run(tmp_path, flat):
    path = write_kaggle(tmp_path, [])
    with pytest.raises(VerydeepError) as e:
        open_eval_set(flat, path)
    one_line(e, path, "no rows after the header")


def test_kaggle_field_beyond_the_csv_field_limit_names_the_line(tmp_path, flat):
    path = write_kaggle(tmp_path, ["ILSVRC2012_val_00000001,n01440764 1 2 3 4", '"' + "x" * 200_000 + '",n01440764'])
    with pytest.raises(VerydeepError) as e:
        read_kaggle(path, flat)
    one_line(e, path, "line 3", "field larger than field limit")


def test_kaggle_rows_name_their_problems(tmp_path, flat):
    path = write_kaggle(tmp_path, ["ILSVRC2012_val_00000001,n01440764 1 2 3 4", "ILSVRC2012_val_00000001,n01443537"])
    with pytest.raises(VerydeepError) as e:
        read_kaggle(path, flat)
    one_line(e, path, "line 3", "listed twice (first on line 2)")
    path.write_text("Id,Prediction\n" + "x" * 10_000 + "\n")
    with pytest.raises(VerydeepError) as e:
        read_kaggle(path, flat)
    assert len(one_line(e, path, "line 1")) < 400  # a megabyte header is not echoed whole


def test_overlong_and_nul_paths_in_list_files_name_the_line(tmp_path, flat):
    listing = tmp_path / "list.txt"
    for bad in ("x" * (MAX_PATH_BYTES + 1), "a/" + "n" * 256 + ".jpg", "a\0b.jpg"):
        listing.write_text("ok.jpg\n\n# a comment\n" + bad + "\n")
        with pytest.raises(VerydeepError) as e:
            read_path_list(listing)
        assert len(one_line(e, listing, "line 4")) < 400
        caffe = tmp_path / "val.txt"
        caffe.write_text("ILSVRC2012_val_00000001.JPEG 0\n" + bad + " 1\n")
        with pytest.raises(VerydeepError) as e:
            read_caffe_list(caffe, flat)
        one_line(e, caffe, "line 2")


def test_empty_label_and_list_files_are_errors(tmp_path, flat):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    for call in (
        lambda: read_path_list(empty),
        lambda: read_caffe_list(empty, flat),
        lambda: read_synsets(empty),
        lambda: open_eval_set(flat, empty),
        lambda: open_eval_set(flat, empty, layout="devkit", meta=empty),
    ):
        with pytest.raises(VerydeepError) as e:
            call()
        one_line(e, empty)
    csv = tmp_path / "LOC_val_solution.csv"
    write_kaggle(tmp_path, [])
    csv.write_bytes(b"")
    with pytest.raises(VerydeepError) as e:
        read_kaggle(csv, flat)
    one_line(e, csv, "found nothing")


def test_duplicate_entries_name_both_lines(tmp_path, flat):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n\nb.jpg\na.jpg\n")
    with pytest.raises(VerydeepError) as e:
        read_path_list(listing)
    one_line(e, listing, "line 4", "first on line 1")
    caffe = tmp_path / "val.txt"
    caffe.write_text("ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000001.JPEG 1\n")
    with pytest.raises(VerydeepError) as e:
        read_caffe_list(caffe, flat)
    one_line(e, caffe, "line 2", "first on line 1")
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n01440764 tench\n# c\nn01440764 again\n")
    with pytest.raises(VerydeepError) as e:
        read_synsets(synsets)
    one_line(e, synsets, "line 3", "first on line 1")


def test_line_numbers_are_the_editors_with_blank_and_comment_lines(tmp_path, flat):
    caffe = tmp_path / "val.txt"
    caffe.write_text("# header\n\nILSVRC2012_val_00000001.JPEG 0\nnot-a-label-line\n")
    with pytest.raises(VerydeepError) as e:
        read_caffe_list(caffe, flat)
    one_line(e, caffe, "line 4")
    caffe.write_text("ILSVRC2012_val_00000001.JPEG " + "9" * 5000 + "\n")  # beyond int()'s 4,300 digits
    with pytest.raises(VerydeepError) as e:
        open_eval_set(flat, caffe)
    one_line(e, caffe, "line 1")


def test_text_files_that_are_folders_or_nul_paths_or_missing_are_one_line(tmp_path):
    for source, expected in ((tmp_path, "is a folder"), ("a\0b", "NUL"), (tmp_path / "nope.txt", "no such")):
        with pytest.raises(VerydeepError) as e:
            read_text(source)
        one_line(e, expected)


def test_a_list_file_of_paths_with_spaces_is_read_relative_to_the_list(tmp_path):
    (tmp_path / "my photo.jpg").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("my photo.jpg\nother.jpg 3\n")
    assert read_path_list(listing) == [tmp_path / "my photo.jpg", tmp_path / "other.jpg"]


# -- the train TOML ---------------------------------------------------------------------------
#: One value per option that no run can use (bools: a wrong type), as TOML.
BAD_VALUES = {
    "data": '"a\\u0000b"',
    "val": '""',
    "scale": "[256, 300, 400]",
    "val_scale": "100000",
    "crop": "100",
    "flip": '"yes"',
    "lighting_std": "-0.1",
    "workers": "-1",
    "arch": '"Z"',
    "width": "-1",
    "num_classes": "-4",
    "weights": '"w\\u0000"',
    "prototxt": '""',
    "init": '""',
    "init_std": "0",
    "init_layers": '["fc9"]',
    "freeze_through": '"pool9"',
    "lr_mult": "{fc8 = nan}",
    "dropout": "1.5",
    "epochs": "0",
    "batch_size": "-8",
    "micro_batch": "0",
    "lr": "inf",
    "warmup": "-1",
    "clip_grad_norm": "-inf",
    "divergence_checks": "1",
    "momentum": "nan",
    "weight_decay": "-5e-4",
    "lr_factor": "0",
    "max_lr_drops": "-1",
    "plateau_patience": "0",
    "plateau_threshold": "1.5",
    "max_steps": "0",
    "out": '""',
    "checkpoint_every": "-1",
    "keep_checkpoints": "0",
    "seed": "-1",
    "deterministic": '"no"',
    "device": '"gpu please"',
    "precision": '"fp8"',
    "channels_last": '"maybe"',
    "compile": "0",
    "log_every": "0",
    "metrics_format": '"xml"',
    "tensorboard": "[]",
    "progress": "{}",
}


def test_every_option_has_a_rule_and_a_bad_value_here():
    assert set(tc.SCHEMA) == set(tc.FIELDS) == set(BAD_VALUES)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_value_no_run_can_use_fails_at_load_naming_file_line_option(tmp_path, name):
    path = tmp_path / "run.toml"
    path.write_text(f"# recipe\n\n{name} = {BAD_VALUES[name]}\n")
    with pytest.raises(VerydeepError) as e:
        tc.load(path)
    one_line(e, path, "line 3", f"option {name}", "expected")


def test_the_issues_examples_say_expected_and_found(tmp_path):
    path = tmp_path / "run.toml"
    for text, found in (
        ("momentum = nan", "found nan"),
        ("width = -1", "found -1"),
        ("num_classes = -4", "found -4"),
        ("[lr_mult]\nfc8 = nan", "found nan"),
        ('arch = "Z"', "found 'Z'"),
    ):
        path.write_text(text + "\n")
        with pytest.raises(VerydeepError) as e:
            tc.load(path)
        one_line(e, path, "expected", found)


def test_values_set_in_code_are_checked_by_validate_too():
    with pytest.raises(VerydeepError, match="momentum: expected a finite number in"):
        tc.TrainConfig(momentum=math.nan).validate()
    with pytest.raises(VerydeepError, match="width: expected float, found str"):
        tc.TrainConfig(width="wide").validate()  # type: ignore[arg-type]


def test_bad_toml_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("epochs = 2\nlr = = 0.1\n")
    with pytest.raises(VerydeepError) as e:
        tc.load(path)
    one_line(e, path, "line 2", "not valid TOML")
    path.write_bytes(b"epochs = 2\n# " + LATIN1 + b"\n")
    with pytest.raises(VerydeepError) as e:
        tc.load(path)
    one_line(e, path, "line 2", "not UTF-8")
    path.write_text("scale = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(VerydeepError) as e:
        tc.load(path)
    one_line(e, path, "nested")
    path.write_text("# " + "x" * tc.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(VerydeepError) as e:
        tc.load(path)
    one_line(e, path, "bytes")
    for where, expected in ((tmp_path, "is a folder"), ("run\0.toml", "NUL"), (tmp_path / "no.toml", "no such")):
        with pytest.raises(VerydeepError) as e:
            tc.load(where)
        one_line(e, expected)


def test_bad_config_files_are_one_line_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("momentum = nan\n")
    assert main(["train", "--config-file", str(path)]) == 1
    one_line(cli_error_line(capsys.readouterr().err), path, "momentum")


def test_the_saved_config_of_every_option_reads_back(tmp_path):
    config = tc.TrainConfig(
        data=str(tmp_path / "d"), scale=[256, 512], lr_mult={"fc8": 10.0, "fc8.bias": 20.0}, init_layers=["fc8"],
        freeze_through="pool5", micro_batch=8, lr=0.02, clip_grad_norm=5.0, max_steps=3, device="cuda:1",
        workers=4, num_classes=4, val_scale=384, seed=2**32 - 1,
    )  # fmt: skip
    tc.save_toml(config, tmp_path / "config.toml")
    assert tc.load(tmp_path / "config.toml") == config


# -- scores files for evaluate --combine ------------------------------------------------------
@pytest.fixture
def scores(tmp_path) -> Path:
    """A scores file written by save_scores: 3 images, 4 classes, one skipped image."""
    probs = np.full((3, 4), 0.25, np.float32)
    result = EvalResult({"name": "center"}, ["a", "b", "c"], probs, np.array([0, 3, 1]))
    result.failed = [{"id": "d", "path": "/x/d.jpg", "reason": "truncated"}]
    return save_scores(result, tmp_path / "good.npz")


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def npy(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy header declaring ``shape`` / ``descr`` and no data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_scores_file_written_by_save_scores_reads_back(scores):
    back = load_scores(scores)
    assert back.ids == ["a", "b", "c"] and back.labels.tolist() == [0, 3, 1] and back.skipped == 1
    assert back.probs.flags.writeable


def test_a_2kb_npz_claiming_3_6_tib_is_refused_before_allocating(tmp_path, scores):
    members = members_of(scores)
    members["probs.npy"] = npy((1_000_000, 1_000_000)) + b"\0" * 1024  # 4 TB of float32 declared
    path = write_zip(tmp_path / "claim.npz", members)
    assert path.stat().st_size < 4096
    with pytest.raises(VerydeepError) as e:
        load_scores(path)
    one_line(e, path, "probs", "4,000,000,000,000 bytes")


def test_a_zip_directory_claiming_terabytes_is_refused(tmp_path, scores):
    data = bytearray(scores.read_bytes())
    directory = data.rindex(b"PK\x01\x02")  # the last central-directory entry; its uncompressed size at +24
    data[directory + 24 : directory + 28] = struct.pack("<I", 0xFFFFFFF0)
    path = tmp_path / "claim.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(VerydeepError) as e:
        load_scores(path)
    one_line(e, path)


def test_a_deflate_bomb_is_refused_from_the_zip_directory(tmp_path, scores):
    members = members_of(scores)
    zeros = np.zeros((1000, 10_000), np.float32)  # 40 MB that deflate packs into ~40 KB
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, zeros)
    members["probs.npy"] = buffer.getvalue()
    path = write_zip(tmp_path / "bomb.npz", members, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 200_000
    with pytest.raises(VerydeepError) as e:
        load_scores(path)
    one_line(e, path, "probs", "decompression bomb")


def test_a_broken_deflate_stream_is_one_line(tmp_path, scores):
    """Found by fuzz_scores: zlib.error ("invalid distance too far back") escaped the reader."""
    path = write_zip(tmp_path / "broken.npz", members_of(scores), zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("probs.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the local header's fixed 30 bytes
    data[start : start + info.compress_size] = b"\xff" * info.compress_size  # deflate block type 3: invalid
    path.write_bytes(bytes(data))
    with pytest.raises(VerydeepError) as e:
        load_scores(path)
    one_line(e, path, "not a verydeep scores file")


def test_overlapping_members_are_refused(tmp_path, scores):
    data = bytearray(scores.read_bytes())
    with zipfile.ZipFile(scores) as z:
        probs = z.getinfo("probs.npy").header_offset
    # labels' central-directory entry (46 fixed bytes, then the name) is made to point at probs' data.
    entry = data.index(b"labels.npy", data.index(b"PK\x01\x02")) - 46
    assert data[entry : entry + 4] == b"PK\x01\x02"
    data[entry + 42 : entry + 46] = struct.pack("<I", probs)
    path = tmp_path / "overlap.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(VerydeepError) as e:
        load_scores(path)
    one_line(e, path, "overlap")


def test_object_arrays_are_refused_as_pickles(tmp_path, scores):
    arrays = dict(np.load(scores))
    arrays["ids"] = np.array(["a", "b", "c"], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(VerydeepError) as e:
        load_scores(tmp_path / "pickled.npz")
    one_line(e, "pickled.npz", "ids", "Python objects")


@pytest.mark.parametrize(
    "content, found",
    [(b"id,label\na,1\n", "found text"), (b"", "found an empty file"), (b"\x93NUMPY\x01\x00", "found a single .npy")],
)
def test_files_that_are_not_npz_say_what_they_are(tmp_path, content, found):
    path = tmp_path / "scores.npz"
    path.write_bytes(content)
    with pytest.raises(VerydeepError) as e:
        load_scores(path)
    one_line(e, path, f"not an .npz score file ({found}")


def test_a_text_file_passed_to_combine_is_one_line_on_the_command_line(tmp_path, scores, capsys):
    text = tmp_path / "notes.npz"
    text.write_text("these are my notes, not scores\n")
    assert main(["evaluate", "--combine", str(scores), str(text)]) == 1
    err = capsys.readouterr().err
    one_line(cli_error_line(err), f"{text}: not an .npz score file (found text)")
    assert "pickled" not in err


def test_scores_whose_arrays_disagree_are_refused(tmp_path, scores):
    arrays = dict(np.load(scores))
    cases = {
        "labels": np.array([0, 1]),  # 2 labels for 3 rows
        "probs": np.full((3, 4), np.nan, np.float32),
        "ids": np.array(["a", "a", "c"]),
        "failed_paths": np.array([], dtype=str),
        "meta": np.array(json.dumps(["not", "a", "dict"])),
    }
    for name, value in cases.items():
        np.savez(tmp_path / "bad.npz", **{**arrays, name: value})
        with pytest.raises(VerydeepError) as e:
            load_scores(tmp_path / "bad.npz")
        one_line(e, "bad.npz")
    np.savez(tmp_path / "bad.npz", **{**arrays, "labels": np.array([0, 9, 1])})
    with pytest.raises(VerydeepError) as e:
        load_scores(tmp_path / "bad.npz")
    one_line(e, "labels", "9")


def test_combine_still_fuses_two_good_files(tmp_path, scores):
    fused = combine([scores, save_scores(load_scores(scores), tmp_path / "again.npz")])
    assert fused.images == 3 and np.allclose(fused.probs, 0.25)
