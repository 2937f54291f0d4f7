"""The test protocols against independent references (float64, numpy crops, OpenCV, Pillow)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from helpers import photo, random_vgg
from PIL import Image

from verydeep.cli import main
from verydeep.core import distributed
from verydeep.data.eval_set import open_eval_set
from verydeep.data.preprocess import MEAN_BGR, rescale
from verydeep.errors import VerydeepError
from verydeep.evaluate.protocols import Protocol, crop_boxes, grid_offsets
from verydeep.evaluate.results import combine, load_scores, save_scores
from verydeep.evaluate.run import chunks_of, evaluate
from verydeep.evaluate.scoring import Scorer

CROP = 224


# -- references ------------------------------------------------------------------------------------
def caffe64(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> float64 3xHxW BGR minus the mean pixel (independent of preprocess.py)."""
    bgr = rgb[:, :, ::-1].astype(np.float64) - np.array(MEAN_BGR)
    return bgr.transpose(2, 0, 1)


def softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def net64(model):
    """A float64 copy: the reference computation."""
    return copy.deepcopy(model).double().eval()


def classic64(model64, crops: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model64(torch.from_numpy(np.stack(crops))).numpy()


def dense64(model64, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model64.dense()(torch.from_numpy(image[None].copy())).numpy()[0]


def chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def model():
    return random_vgg(num_classes=10)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 240x300 RGB image: at Q=240 the rescaling is the identity, so references need no resize."""
    return np.asarray(photo(240, 300, seed=3))


# -- geometry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (400, 400), (333, 1000), (224, 260)])
@pytest.mark.parametrize("q", [256, 384, 512])
def test_multicrop_grid_is_25_distinct_crops_covering_the_image(shape, q):
    h, w = rescale(torch.zeros(3, *shape, dtype=torch.uint8), q).shape[-2:]
    assert min(h, w) == q
    p = Protocol.make("multicrop", [q])
    boxes = crop_boxes(h, w, p)
    assert len(boxes) == 25 and len(set(boxes)) == 25
    for t, l in boxes:
        assert 0 <= t <= h - CROP and 0 <= l <= w - CROP
    corners = {(0, 0), (0, w - CROP), (h - CROP, 0), (h - CROP, w - CROP)}
    assert corners <= set(boxes)
    center = (int(round((h - CROP) / 2)), int(round((w - CROP) / 2)))
    assert center in boxes
    assert crop_boxes(h, w, Protocol.make("center", [q])) == [center]
    covered = np.zeros((h, w), dtype=bool)
    for t, l in boxes:
        covered[t : t + CROP, l : l + CROP] = True
    # Five 224 crops span at most 1120 pixels: a wider panorama keeps gaps between them.
    assert covered.all() == (max(h, w) <= 5 * CROP)
    # The other placement keeps every crop inside the image too.
    for t, l in crop_boxes(h, w, Protocol.make("multicrop", [q], grid="cells")):
        assert 0 <= t <= h - CROP and 0 <= l <= w - CROP


def test_center_offset_matches_torchvision_center_crop():
    from torchvision.transforms.v2 import functional as TF

    x = torch.arange(3 * 257 * 301, dtype=torch.int32).view(3, 257, 301)
    ((t, l),) = crop_boxes(257, 301, Protocol.make("center", [256]))
    assert torch.equal(TF.center_crop(x, [CROP, CROP]), x[:, t : t + CROP, l : l + CROP])


def test_grid_offsets_reject_too_small_sides():
    assert grid_offsets(224) == [0] * 5
    with pytest.raises(VerydeepError, match="does not fit"):
        grid_offsets(200)


def test_protocol_validation():
    assert Protocol.make("center").scales == (256,)
    assert Protocol.make("combined").scales == (256, 384, 512)
    with pytest.raises(VerydeepError, match="smaller than the 224x224 crop"):
        Protocol.make("dense", [192])
    with pytest.raises(VerydeepError, match="unknown protocol"):
        Protocol.make("tencrop")
    with pytest.raises(VerydeepError, match="unknown interpolation"):
        Protocol.make("dense", interpolation="area")


# -- the dense net ----------------------------------------------------------------------------------
def test_dense_equals_classic_at_224(model):
    m64 = net64(model)
    x = torch.randn(2, 3, CROP, CROP, dtype=torch.float64) * 50
    with torch.no_grad():
        dense = m64.dense()(x)
        classic = m64(x)
    assert dense.shape == (2, 10, 1, 1)
    np.testing.assert_allclose(dense[:, :, 0, 0].numpy(), classic.numpy(), rtol=0, atol=1e-10)


def caffe_map_side(n: int) -> int:
    """Score-map side for an input side n: five ceil-mode 2x2/2 pools, then fc6's 7x7 window."""
    for _ in range(5):
        n = math.ceil((n - 2) / 2) + 1
    return n - 7 + 1


@pytest.mark.parametrize("size", [(288, 320), (300, 419)])
def test_dense_map_positions_are_the_classic_net_on_stride_32_windows(size):
    """Each score-map position is the classic net on the 224x224 window at 32 x position.

    Exact only without border effects: a 3x3 conv sees outside its window (the classic net sees
    zero padding there), so every conv here keeps only its centre tap. What is checked is the
    fc6 -> 7x7 conv reshape (row-major C,H,W), the stride 32 and the pooling alignment.
    """
    m64 = net64(random_vgg(num_classes=6, seed=1))
    with torch.no_grad():
        for name, p in m64.named_parameters():
            if name.startswith("conv") and name.endswith(".weight"):
                centre = p[:, :, 1, 1].clone()
                p.zero_()
                p[:, :, 1, 1] = centre
    h, w = size
    x = torch.randn(1, 3, h, w, dtype=torch.float64) * 50
    with torch.no_grad():
        score_map = m64.dense()(x)[0]
        assert score_map.shape[1:] == (caffe_map_side(h), caffe_map_side(w))
        checked = 0
        for i in range(score_map.shape[1]):
            for j in range(score_map.shape[2]):
                if 32 * i + CROP > h or 32 * j + CROP > w:
                    continue  # a ceil-mode position past the last full window
                window = x[:, :, 32 * i : 32 * i + CROP, 32 * j : 32 * j + CROP]
                np.testing.assert_allclose(score_map[:, i, j].numpy(), m64(window)[0].numpy(), rtol=0, atol=1e-9)
                checked += 1
    assert checked >= 4


# -- protocols against references --------------------------------------------------------------------
def scorer(model, name, scales=(240,), **kw):
    p = Protocol.make(name, scales, **kw)
    return Scorer(p, model, model.dense(), "cpu", max_batch=64)


def test_center_protocol_reference(model, image):
    m64 = net64(model)
    x = caffe64(image)
    t, l = (240 - CROP) // 2, round((300 - CROP) / 2)
    crop = x[:, t : t + CROP, l : l + CROP]
    ref = softmax64(classic64(m64, [crop, crop[:, :, ::-1].copy()])).mean(axis=0)
    ours = scorer(model, "center")([(rescale(chw(image), 240),)])
    assert torch.equal(rescale(chw(image), 240), chw(image))  # Q = shorter side: no resampling
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=0, atol=2e-6)
    no_flip = scorer(model, "center", flip=False)([(chw(image),)])
    np.testing.assert_allclose(no_flip[0].numpy(), softmax64(classic64(m64, [crop]))[0], rtol=0, atol=2e-6)


def test_multicrop_protocol_reference(model, image):
    m32 = copy.deepcopy(model).eval()  # float32 reference: 50 crops in float64 are slow on CPU
    x = caffe64(image).astype(np.float32)
    tops = np.round(np.linspace(0, 240 - CROP, 5)).astype(int)
    lefts = np.round(np.linspace(0, 300 - CROP, 5)).astype(int)
    crops = [x[:, t : t + CROP, l : l + CROP] for t in tops for l in lefts]
    crops += [c[:, :, ::-1].copy() for c in crops]
    assert len(crops) == 50
    ref = softmax64(classic64(m32, crops).astype(np.float64)).mean(axis=0)
    ours = scorer(model, "multicrop")([(chw(image),)])
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("average", ["scores", "softmax"])
def test_dense_protocol_reference(model, image, average):
    m64 = net64(model)
    x = caffe64(image)
    maps = [dense64(m64, x), dense64(m64, x[:, :, ::-1].copy())]
    assert maps[0].shape[1:] == (caffe_map_side(240), caffe_map_side(300))
    if average == "scores":  # the paper: class scores sum-pooled, then the soft-max
        probs = [softmax64(m.mean(axis=(1, 2))) for m in maps]
    else:
        probs = [softmax64(m.transpose(1, 2, 0)).mean(axis=(0, 1)) for m in maps]
    ref = (probs[0] + probs[1]) / 2
    ours = scorer(model, "dense", dense_average=average)([(chw(image),)])
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=0, atol=2e-6)


def test_scales_average_and_combined_is_the_mean_of_dense_and_multicrop(model, image):
    small = np.asarray(photo(230, 250, seed=4))
    items = [(rescale(chw(image), 240), rescale(chw(image), 272)), (rescale(chw(small), 240), rescale(chw(small), 272))]
    kw = dict(grid_size=2)  # a 2x2 grid keeps this fast; the 5x5 one is checked above
    for name in ("center", "multicrop", "dense"):
        both = scorer(model, name, (240, 272), **kw)(items)
        each = [scorer(model, name, (q,), **kw)([(it[k],) for it in items]) for k, q in enumerate((240, 272))]
        torch.testing.assert_close(both, (each[0] + each[1]) / 2, rtol=0, atol=1e-6)
    combined = scorer(model, "combined", (240, 272), **kw)(items)
    parts = scorer(model, "dense", (240, 272), **kw)(items) + scorer(model, "multicrop", (240, 272), **kw)(items)
    torch.testing.assert_close(combined, parts / 2, rtol=0, atol=1e-6)
    assert torch.allclose(combined.sum(dim=1), torch.ones(2), atol=1e-5)


def test_crops_of_one_image_share_a_forward_pass(model, image):
    sizes = []

    def forward(x):
        sizes.append(x.shape[0])
        return model(x)

    p = Protocol.make("multicrop", [240], grid_size=3)  # 18 crops per image
    Scorer(p, forward, None, "cpu", max_batch=40)([(chw(image),)] * 5)
    assert sizes == [36, 36, 18]  # two whole images per pass, never an image split


def test_rescale_matches_opencv_and_pillow():
    import cv2

    rgb = np.asarray(photo(300, 400, seed=5))
    ours = rescale(chw(rgb), 256, "bilinear-opencv").permute(1, 2, 0).numpy()
    assert ours.shape == (256, 341, 3)
    ref = cv2.resize(rgb, (341, 256), interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours.astype(int) - ref).max() <= 1
    ours = rescale(chw(rgb), 256, "bilinear").permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(rgb).resize((341, 256), Image.BILINEAR))
    assert np.abs(ours.astype(int) - ref).max() <= 1


# -- whole runs ------------------------------------------------------------------------------------
@pytest.fixture
def val(tmp_path):
    """An ImageFolder of 7 images in 3 of its 10 classes, one of them a corrupt JPEG."""
    root = tmp_path / "val"
    for n in range(3, 10):
        (root / f"n0000000{n}").mkdir(parents=True)  # empty classes still take an index
    sizes = [(230, 260), (260, 230), (240, 240), (224, 300), (250, 250), (300, 228)]
    for n, (h, w) in enumerate(sizes):
        d = root / f"n0000000{n % 3}"
        d.mkdir(parents=True, exist_ok=True)
        photo(h, w, seed=n).save(d / f"img{n}.JPEG", quality=90)
    good = (root / "n00000001" / "img1.JPEG").read_bytes()
    (root / "n00000001" / "broken.JPEG").write_bytes(good[: len(good) // 3])  # truncated
    return root


def test_evaluate_skips_a_corrupt_jpeg_and_reports_it(model, val):
    ds = open_eval_set(val)
    assert len(ds) == 7
    r = evaluate(
        model, ds, Protocol.make("center", [232], flip=False), device="cpu", workers=0, progress=False, batch_size=3
    )
    assert r.images == 6 and r.skipped == 1
    assert r.failed[0]["id"] == "n00000001/broken.JPEG" and "truncated" in r.failed[0]["reason"]
    assert "n00000001/broken.JPEG" not in r.ids
    # Independent reference: per image, numpy crop of a Pillow-rescaled image.
    m64 = net64(model)
    for n, image_id in enumerate(r.ids):
        rgb = np.asarray(Image.open(val / image_id).convert("RGB"))
        small = rescale(chw(rgb), 232).permute(1, 2, 0).numpy()
        x = caffe64(small)
        t, l = round((x.shape[1] - CROP) / 2), round((x.shape[2] - CROP) / 2)
        ref = softmax64(classic64(m64, [x[:, t : t + CROP, l : l + CROP]]))[0]
        np.testing.assert_allclose(r.probs[n], ref, rtol=0, atol=2e-6)
    m = r.metrics()
    top1 = (r.probs.argmax(1) == r.labels).mean() * 100
    assert m["top1_error_pct"] == pytest.approx(100 - top1)


def test_workers_give_the_same_scores(model, val):
    ds = open_eval_set(val)
    p = Protocol.make("dense", [224, 240])
    a = evaluate(model, ds, p, device="cpu", workers=0, progress=False, batch_size=4)
    b = evaluate(model, ds, p, device="cpu", workers=2, progress=False, batch_size=4)
    assert a.ids == b.ids and a.failed == b.failed
    np.testing.assert_array_equal(a.probs, b.probs)


def test_chunks_are_shared_exactly_across_ranks():
    for n in (0, 1, 7, 50):
        chunks = chunks_of(n, 3)
        for world in (1, 2, 3, 5, 8):
            seen = []
            for rank in range(world):
                ctx = distributed.Context(rank, world, rank)
                for c in distributed.shard(len(chunks), ctx):
                    seen += chunks[c]
            assert seen == list(range(n))  # each image once, in order, none padded


def test_interrupted_run_resumes_to_identical_scores(model, val, tmp_path):
    """In-process version of the kill test (the subprocess one is in test_evaluate_resume.py)."""
    ds = open_eval_set(val)
    p = Protocol.make("center", [232])
    kw = dict(device="cpu", workers=0, progress=False, batch_size=2, checkpoint_every=0)
    evaluate(model, ds, p, scores=tmp_path / "full.npz", **kw)
    calls = {"n": 0}

    def dying(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return model(x)

    out = tmp_path / "part.npz"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, p, scores=out, forward=dying, **kw)
    assert not out.exists() and len(list((tmp_path / "part.npz.parts").glob("chunks-*.npz"))) == 2
    with pytest.raises(VerydeepError, match="pass --resume"):
        evaluate(model, ds, p, scores=out, **kw)
    with pytest.raises(VerydeepError, match="cannot resume: protocol"):
        evaluate(model, ds, Protocol.make("center", [240]), scores=out, resume=True, **kw)
    resumed = evaluate(model, ds, p, scores=out, resume=True, **kw)
    # Chunks of 2 in ImageFolder order: [img0 img3] [broken img1] [img4 img2] [img5]; the third
    # forward call died, so chunks 0 and 1 were flushed and three images are left.
    assert resumed.computed == 3
    assert not (tmp_path / "part.npz.parts").exists()
    a, b = load_scores(tmp_path / "full.npz"), load_scores(out)
    assert a.ids == b.ids and a.failed == b.failed
    np.testing.assert_array_equal(a.probs, b.probs)
    again = evaluate(model, ds, p, scores=out, resume=True, **kw)  # complete: reported, not recomputed
    np.testing.assert_array_equal(again.probs, a.probs)


def test_scores_roundtrip_and_combine(model, val, tmp_path):
    ds = open_eval_set(val)
    kw = dict(device="cpu", workers=0, progress=False)
    d = evaluate(model, ds, Protocol.make("dense", [232]), **kw)
    c = evaluate(model, ds, Protocol.make("center", [232]), **kw)
    save_scores(d, tmp_path / "d.npz")
    save_scores(c, tmp_path / "c.npz")
    back = load_scores(tmp_path / "d.npz")
    assert back.ids == d.ids and back.failed == d.failed and back.protocol == d.protocol
    np.testing.assert_array_equal(back.probs, d.probs)
    np.testing.assert_array_equal(back.labels, d.labels)
    fused = combine([tmp_path / "d.npz", tmp_path / "c.npz"])
    np.testing.assert_allclose(fused.probs, (d.probs + c.probs) / 2, rtol=0, atol=1e-7)
    assert fused.skipped == 1 and fused.images == 6
    # An image missing from one file is skipped, not mismatched.
    short = load_scores(tmp_path / "c.npz")
    short.ids, short.probs, short.labels = short.ids[1:], short.probs[1:], short.labels[1:]
    save_scores(short, tmp_path / "short.npz")
    fused = combine([tmp_path / "d.npz", tmp_path / "short.npz"])
    assert fused.images == 5 and d.ids[0] in {x["id"] for x in fused.failed}


def test_precision_falls_back_to_autocast(model, val):
    ds = open_eval_set(val, limit=2)
    p = Protocol.make("dense", [224])
    a = evaluate(model, ds, p, device="cpu", workers=0, progress=False)
    b = evaluate(model, ds, p, device="cpu", workers=0, progress=False, precision="bf16")
    np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=0.02)  # bf16 keeps ~3 digits


# -- the command ------------------------------------------------------------------------------------
def test_cli_json_and_scores(narrow_weights, val, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = [
        "evaluate",
        str(val),
        "--weights",
        narrow_weights,
        "--protocol",
        "center",
        "--scales",
        "232",
        "--device",
        "cpu",
    ]
    assert (
        main(argv + ["--workers", "0", "--json", "--scores", str(out), "--predictions", str(tmp_path / "p.csv")]) == 0
    )
    s = json.loads(capsys.readouterr().out)
    assert s["images"] == 6 and s["skipped"] == 1 and s["failed"][0]["id"] == "n00000001/broken.JPEG"
    assert s["protocol"]["name"] == "center" and s["protocol"]["scales"] == [232]
    assert set(s["metrics"]) == {"top1_error_pct", "top5_error_pct", "top1_accuracy_pct", "top5_accuracy_pct"}
    assert load_scores(out).images == 6
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 7
    assert main(["evaluate", "--combine", str(out), str(out), "--json"]) == 0
    fused = json.loads(capsys.readouterr().out)
    assert fused["metrics"] == s["metrics"]
    assert main(argv + ["--workers", "0", "--limit", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "top-5 err %" in text and "images/s" in text


def test_cli_unlabeled_folder_writes_predictions(narrow_weights, tmp_path, capsys):
    for n in range(2):
        photo(230, 240, seed=n).save(tmp_path / f"{n}.jpg")
    argv = ["evaluate", str(tmp_path), "--weights", narrow_weights, "--protocol", "dense", "--scales", "224"]
    assert main(argv + ["--device", "cpu", "--workers", "0", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["metrics"] is None and s["images"] == 2
    assert [p["id"] for p in s["predictions"]] == ["0.jpg", "1.jpg"]
    assert s["predictions"][0]["names"][0].startswith("class")


def test_cli_errors(narrow_weights, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--weights", narrow_weights, "--resume"]) == 1
    assert "error" in capsys.readouterr().err
    assert main(["evaluate", "--combine", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]) == 1
    assert "no such scores file" in capsys.readouterr().err
