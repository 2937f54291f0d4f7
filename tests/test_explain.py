"""verydeep.explain and ``verydeep explain``: saliency, Grad-CAM, guided backprop, score maps, class models.

References: captum and pytorch-grad-cam on torchvision's own VGG module holding the same weights
(Caffe input space, so the inputs match), and float64 finite differences. The known-answer net is
built by hand: a red and a blue disc detector whose class scores depend on nothing but the disc
(the background noise and the white and green squares stay below its threshold).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_vgg, rel, run_cli
from PIL import Image
from torch import nn

from verydeep import VGG, VerydeepError
from verydeep.cli import main
from verydeep.configs import MEAN_BGR
from verydeep.explain import (
    class_model,
    gradcam,
    guided_backprop,
    guided_gradcam,
    saliency,
    score_map,
)
from verydeep.formats.caffe import CaffeGraph
from verydeep.formats.caffe.prototxt import vgg_net
from verydeep.formats.torchvision import to_torchvision_state, torchvision_model

#: Positions of relu5_3 / conv5_3 in torchvision's vgg16 `features` (what users look up by hand).
TV_RELU5_3, TV_CONV5_3 = 29, 28
CLASSES = ("background", "red", "blue")
#: Disc colours in Caffe space (B, G, R offsets from the mean pixel).
DISC = {"red": (-80.0, -80.0, 110.0), "blue": (110.0, -80.0, -80.0)}


@pytest.fixture(scope="module")
def vgg16_and_torchvision():
    """A narrow VGG-16 (random weights, non-zero biases) and torchvision's vgg16 module with its
    weights taking Caffe input; the torchvision twin has torchvision's in-place ReLUs."""
    model = random_vgg("D", num_classes=5)
    tv = torchvision_model("D", model.width, model.num_classes).eval()
    tv.load_state_dict(to_torchvision_state(model, space="caffe"))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 60
    with torch.no_grad():
        assert rel(tv(x), model(x)) <= 1e-5
    return model, tv, x


def out_of_place(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return module


def normalise(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / cam.amax(dim=(-2, -1), keepdim=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # captum: "setting backward hooks on ReLU activations"
def test_maps_equal_captum_and_pytorch_grad_cam(vgg16_and_torchvision):
    from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, tv, x = vgg16_and_torchvision
    targets = [1, "top", 4]
    errors, found = {}, {}

    e = saliency(model, x, targets)
    assert e.classes[0] == 1 and e.classes[2] == 4 and e.maps.shape == (3, 224, 224)
    with torch.no_grad():
        assert e.classes[1] == int(tv(x[1:2]).argmax())
    classes = list(e.classes)
    errors["saliency / captum Saliency"] = rel(e.maps, Saliency(tv).attribute(x, target=classes, abs=True).amax(1))

    gb = guided_backprop(model, x, targets)
    errors["guided backprop / captum"] = rel(gb.maps, GuidedBackprop(tv).attribute(x, target=classes))
    pgc_gb = GuidedBackpropReLUModel(copy.deepcopy(tv), device="cpu")
    reference = np.stack([pgc_gb(x[i : i + 1], target_category=c).transpose(2, 0, 1) for i, c in enumerate(classes)])
    errors["guided backprop / pytorch-grad-cam"] = rel(gb.maps, reference)

    for layer, index in (("relu5_3", TV_RELU5_3), ("conv5_3", TV_CONV5_3)):
        cam = gradcam(model, x, targets, layer=layer)
        assert cam.layer == layer and cam.coarse is not None and cam.coarse.shape == (3, 14, 14)
        coarse = LayerGradCam(tv, tv.features[index]).attribute(x, target=classes, relu_attributions=True)
        errors[f"Grad-CAM {layer} / captum LayerGradCam"] = rel(cam.coarse, coarse[:, 0])
        up = LayerAttribution.interpolate(coarse, (224, 224), interpolate_mode="bilinear")
        errors[f"Grad-CAM {layer} upsampled / captum"] = rel(cam.maps, up[:, 0])
        # pytorch-grad-cam keeps a reference to the layer's output, which torchvision's in-place ReLU
        # overwrites after conv5_3; on a twin with out-of-place ReLUs it sees the true activations.
        twins = {"out-of-place": out_of_place(copy.deepcopy(tv))} | ({"in-place": tv} if layer == "conv5_3" else {})
        for name, twin in twins.items():
            with GradCAM(twin, [twin.features[index]]) as pgc:
                found[name] = pgc(x, [ClassifierOutputTarget(c) for c in classes])
        ours = normalise(F.interpolate(normalise(cam.coarse)[:, None], size=(224, 224), mode="bilinear")[:, 0])
        errors[f"Grad-CAM {layer} / pytorch-grad-cam (min-max scaled)"] = rel(ours, found["out-of-place"])
        if "in-place" in twins:
            print(f"pytorch-grad-cam at {layer} of the in-place net: {rel(ours, found['in-place']):.2e} relative")

    ggc = guided_gradcam(model, x, targets)
    reference = GuidedGradCam(tv, tv.features[TV_RELU5_3]).attribute(x, target=classes, interpolate_mode="bilinear")
    errors["guided Grad-CAM / captum"] = rel(ggc.maps, reference)

    # SmoothGrad: the mean of captum's saliency over the same noisy copies (noise drawn as documented).
    smooth = saliency(model, x, targets, samples=2, noise=0.1, seed=7)
    generator = torch.Generator().manual_seed(7)
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    noisy = [x + torch.randn(x.shape, generator=generator) * (0.1 * span) for _ in range(2)]
    reference = torch.stack([Saliency(tv).attribute(n, target=classes, abs=True).amax(1) for n in noisy]).mean(0)
    errors["SmoothGrad / captum Saliency on the same noise"] = rel(smooth.maps, reference)
    for what, error in errors.items():
        print(f"{what}: {error:.2e} relative")
    assert max(errors.values()) <= 1e-5, errors


def test_saliency_equals_finite_differences():
    model = random_vgg("A", num_classes=4).double()
    x = torch.randn(2, 3, 193, 193, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 60
    e = saliency(model, x, [2, 0])
    eps, pixels = 1e-4, np.random.default_rng(0).integers(0, 193, (2, 8, 2))
    steps = [(n, ch, y, z) for n in range(2) for y, z in pixels[n] for ch in range(3)]
    probes = x[[n for n, *_ in steps]].repeat(2, 1, 1, 1)  # +eps copies, then -eps copies
    for k, (_, ch, y, z) in enumerate(steps):
        probes[k, ch, y, z] += eps
        probes[len(steps) + k, ch, y, z] -= eps
    with torch.no_grad():
        scores = torch.cat([model(chunk) for chunk in probes.split(24)])
    rows = torch.tensor([e.classes[n] for n, *_ in steps])
    k = torch.arange(len(steps))
    grads = ((scores[k, rows] - scores[len(steps) + k, rows]) / (2 * eps)).view(-1, 3)
    expected = grads.abs().amax(dim=1).numpy()
    found = np.array([float(e.maps[n, y, z]) for n, y, z in ((s[0], s[2], s[3]) for s in steps[::3])])
    error = rel(np.array(found), np.array(expected))
    print(f"saliency vs central differences (float64, 16 pixels x 3 channels): {error:.2e} relative")
    assert error <= 1e-6


def disc_detector(threshold: float = 40.0) -> VGG:
    """A narrow VGG-A that detects red and blue discs: conv1_1's channel 0 (1) responds to red (blue)
    above ``threshold``, which the background never reaches; the later convolutions pass each channel
    on, blurred; fc6 averages pool5; class scores are 2x the averages, against a background bias of 8."""
    model = VGG("A", num_classes=3, width=1 / 16, class_names=list(CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        conv1 = model.conv("conv1_1")
        for ch, weights in enumerate(((-0.5, -0.5, 1.0), (1.0, -0.5, -0.5))):  # BGR
            conv1.weight[ch] = torch.tensor(weights).view(3, 1, 1) / 9
            conv1.bias[ch] = -threshold
        blur = torch.full((3, 3), 1 / 16)
        blur[1, 1] = 0.5
        for spec in model.specs[1:]:
            if spec.kind == "conv":
                for ch in (0, 1):
                    model.conv(spec.name).weight[ch, ch] = blur
        fc6, fc7, fc8 = model.linear("fc6"), model.linear("fc7"), model.linear("fc8")
        for ch in (0, 1):
            fc6.weight[ch, ch * 49 : (ch + 1) * 49] = 1 / 49
            fc7.weight[ch, ch] = 1.0
            fc8.weight[ch + 1, ch] = 2.0
        fc8.bias[0] = 8.0
    return model.eval()


def scene(size: int, colour: str, seed: int, centre: tuple[int, int] = (56, 56), radius: int = 24) -> torch.Tensor:
    """Caffe-space 3 x size x size: noise, a white and a green square far from ``centre``, a disc there."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 12, (3, size, size)).astype(np.float32)
    x[:, size - 90 : size - 30, size - 90 : size - 30] += 100.0
    x[:, size - 90 : size - 40, 30:80] += np.array([-50.0, 100.0, -50.0], np.float32)[:, None, None]
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    x[:, disc] += np.array(DISC[colour], np.float32)[:, None]
    return torch.from_numpy(x)


def mass_in(maps: torch.Tensor, box: slice) -> list[float]:
    """Share of each map's mass (|values|, largest channel) inside the square ``box`` x ``box``."""
    m = maps.abs().amax(dim=1) if maps.dim() == 4 else maps.abs()
    return (m[:, box, box].sum(dim=(1, 2)) / m.sum(dim=(1, 2))).tolist()


def test_maps_land_on_the_region_the_decision_depends_on():
    model = disc_detector()
    x = torch.stack([scene(224, "red", 0), scene(224, "blue", 1)])
    quadrant = slice(0, 112)  # the disc (radius 24 at 56, 56) and its surroundings
    masses = {}
    for method in (saliency, gradcam, guided_backprop, guided_gradcam):
        e = method(model, x)
        assert e.names == ("red", "blue") and min(e.probabilities) > 0.99
        masses[e.method] = mass_in(e.maps, quadrant)
    # The dense net on a 448x448 image with the disc in its top-left quadrant: an 8x8 score map.
    big = torch.stack([scene(448, "red", 2), scene(448, "blue", 3)])
    e = score_map(model, big, ["red", "blue"])
    assert e.coarse is not None and e.coarse.shape == (2, 8, 8) and e.maps.shape == (2, 448, 448)
    assert e.coarse[:, 0, 0].min() > 0.99 and e.coarse[:, -1, -1].max() < 1e-3
    masses["score-map"] = mass_in(e.maps, slice(0, 224))
    for method, values in masses.items():
        print(f"{method}: {', '.join(f'{v:.4f}' for v in values)} of the mass in the disc's quadrant")
    assert min(min(v) for v in masses.values()) >= 0.9
    with pytest.raises(VerydeepError, match="'green'"):
        saliency(model, x, "green")


def test_inplace_relus_and_caffe_graph_give_the_same_maps():
    model = random_vgg("A", num_classes=5)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)) * 60
    assert model.layer("relu5_2").inplace  # the modules VGG builds

    def maps(net):
        return [
            saliency(net, x).maps,
            gradcam(net, x, layer="conv5_2").maps,
            gradcam(net, x, layer="pool4").maps,
            guided_backprop(net, x).maps,
            guided_gradcam(net, x).maps,
        ]

    inplace = maps(model)
    with torch.inference_mode():  # an inference-mode input, and no autograd around the call
        x = x * 1
        assert torch.equal(saliency(model, x).maps, inplace[0])
    with torch.no_grad():
        assert torch.equal(guided_backprop(model, x).maps, inplace[3])
    assert all(p.grad is None for p in model.parameters())  # gradients only of the input or the layer
    plain = maps(out_of_place(model))
    assert all(torch.equal(a, b) for a, b in zip(inplace, plain))

    graph = CaffeGraph(vgg_net("A", model.width, 5))
    graph.load_state_dict(model.state_dict())
    errors = [rel(a, b) for a, b in zip(maps(graph), inplace)]
    print(f"CaffeGraph vs VGG maps: {max(errors):.2e} relative")
    assert max(errors) <= 1e-5

    big = torch.randn(1, 3, 288, 320, generator=torch.Generator().manual_seed(6)) * 60
    dense = CaffeGraph(vgg_net("A", model.width, 5, dense=True, size=288), input_shape=(1, 3, 288, 320))
    dense.load_blobs({n: [p.detach().numpy() for p in getattr(model, n).parameters()] for n in dense.param_layers})
    ours, theirs = score_map(model, big, 3), score_map(dense, big, 3)
    assert ours.coarse is not None and theirs.coarse is not None and ours.coarse.shape == (1, 3, 4)
    assert rel(ours.coarse, theirs.coarse) <= 1e-5
    with pytest.raises(VerydeepError, match="fully convolutional"):
        score_map(graph, x)
    with pytest.raises(VerydeepError, match="'fc7'"):
        gradcam(model, x, layer="fc7")


def test_class_model_ascends_and_respects_the_penalty():
    model = disc_detector(threshold=-5.0)  # active at the zero image, so the ascent has a gradient there
    runs = {l2: class_model(model, ["red", "blue"], size=193, l2=l2, steps=12) for l2 in (1e-4, 1e-3)}
    for l2, r in runs.items():
        rises = r.scores.diff(dim=1)
        print(
            f"class model, l2 {l2:g}: score {r.scores[0, 0]:.3f} -> {r.scores[0, -1]:.3f} (red), "
            f"{r.scores[1, 0]:.3f} -> {r.scores[1, -1]:.3f} (blue), |I| {r.norms[:, -1].tolist()}, "
            f"smallest score change per step {rises.min():.2e}"
        )
        assert (r.objectives.diff(dim=1) >= 0).all() and (r.objectives[:, -1] > r.objectives[:, 0]).all()
        assert (rises >= 0).all() and (r.scores[:, -1] > r.scores[:, 0]).all()
        assert torch.equal(r.norms[:, 0], torch.zeros(2, dtype=torch.float64))  # the zero image
        with torch.no_grad():  # the record's numbers are the model's, and the penalty is l2 |I|^2
            score = model(r.inputs)[[0, 1], [1, 2]].double()
        squared = r.inputs.double().pow(2).sum(dim=(1, 2, 3))
        assert rel(score, r.scores[:, -1]) <= 1e-5 and rel(score - l2 * squared, r.objectives[:, -1]) <= 1e-5
        rgb = np.clip(np.round(r.inputs.numpy()[:, ::-1] + np.array(MEAN_BGR[::-1]).reshape(3, 1, 1)), 0, 255)
        assert r.images.dtype == np.uint8 and np.array_equal(r.images, rgb.transpose(0, 2, 3, 1).astype(np.uint8))
        # The known answer: the red class's image is redder than the mean pixel, the blue one bluer.
        blue, _, red = r.inputs.mean(dim=(2, 3)).T  # Caffe space: BGR, mean pixel subtracted
        assert red[0] > 0 > blue[0] and blue[1] > 0 > red[1], r.inputs.mean(dim=(2, 3))
    assert (runs[1e-3].norms[:, -1] < runs[1e-4].norms[:, -1]).all()
    with pytest.raises(VerydeepError, match="top"):
        class_model(model, "top")


def to_rgb_file(x: torch.Tensor, path) -> None:
    rgb = np.clip(np.round(x.numpy()[::-1] + np.array(MEAN_BGR[::-1]).reshape(3, 1, 1)), 0, 255)
    Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8)).save(path)


@pytest.fixture
def detector_folder(tmp_path):
    from verydeep.formats.safetensors import save_safetensors

    weights = save_safetensors(disc_detector(), tmp_path / "discs.safetensors")
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    to_rgb_file(scene(224, "red", 0), folder / "red.png")
    to_rgb_file(scene(224, "blue", 1), folder / "more" / "blue.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return str(weights), folder


@pytest.mark.slow
def test_cli_writes_pictures_arrays_and_an_index_and_skips_a_corrupt_image(detector_folder, tmp_path):
    weights, folder = detector_folder
    out = tmp_path / "maps"
    args = ["explain", str(folder), "--weights", weights, "-o", str(out), "--device", "cpu", "--json"]
    proc = run_cli([*args, "--no-progress"])
    result = json.loads(proc.stdout)
    assert result["method"] == "gradcam" and result["layer"] == "relu5_2"
    assert [i["class"]["label"] for i in result["images"]] == ["blue", "red"]  # sorted paths: more/blue.png first
    assert [i["top"][0]["label"] for i in result["images"]] == ["blue", "red"]
    assert [s["image"] for s in result["skipped"]] == [str(folder / "broken.jpg")]
    assert "broken.jpg" in proc.stderr and "skipped 1 unreadable" in proc.stderr
    for item in result["images"]:
        assert Image.open(item["png"]).size[0] > 400  # two panels
        assert np.load(item["npy"]).shape == (224, 224)
    assert Image.open(result["contact_sheet"]).format == "PNG"
    assert (
        result["index"] == str(out / "index.gradcam.html")
        and "red.gradcam.png" in (out / "index.gradcam.html").read_text()
    )

    # One method after another into the same folder, in process (each image's own file names).
    for method, shape in (("guided-gradcam", (3, 224, 224)), ("score-map", (448, 448)), ("saliency", (224, 224))):
        extra = ["--smooth", "2"] if method == "saliency" else []
        assert main([*args[:-1], "--method", method, "--class", "red", "--no-progress", *extra]) == 0
        assert np.load(out / f"red.{method}.npy").shape == shape
        assert Image.open(out / f"blue.{method}.png").format == "PNG"
    assert (
        main(
            ["explain", "--method", "class-model", "--class", "red", "--class", "2", "--steps", "3"]
            + ["--weights", weights, "-o", str(out), "--no-progress", "--device", "cpu"]
        )
        == 0
    )
    assert np.load(out / "class-model-1-red.npy").shape == (3, 224, 224)
    assert (out / "class-model-2-blue.png").is_file()


def test_cli_refuses_wrong_options_in_one_line(detector_folder, tmp_path, capsys):
    weights, folder = detector_folder
    base = ["explain", str(folder / "red.png"), "--weights", weights, "-o", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--layer", "fc7"], "'fc7'"),
        (["--method", "saliency", "--layer", "relu5_2"], "--layer applies to gradcam, guided-gradcam"),
        (["--class", "purple"], "'purple'"),
        (["--method", "class-model"], "zero image"),
        (["--steps", "5"], "class-model only"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and err[-1].startswith("verydeep explain: error:"), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_follows_the_input_and_matches_the_cpu():
    model = random_vgg("D", num_classes=5)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8)) * 60
    big = torch.randn(1, 3, 320, 352, generator=torch.Generator().manual_seed(9)) * 60
    cpu = [gradcam(model, x, [1, 3]).coarse, score_map(model, big, 2).coarse]
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 arithmetic
    try:
        model.cuda()
        with pytest.raises(VerydeepError, match="move one"):
            saliency(model, x)
        found = [gradcam(model, x.cuda(), [1, 3]), score_map(model, big.cuda(), 2)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert all(e.maps.device.type == "cuda" for e in found)
    errors = [rel(e.coarse, c) for e, c in zip(found, cpu)]
    print(f"CUDA vs CPU: Grad-CAM {errors[0]:.2e}, score map {errors[1]:.2e} relative")
    assert errors[0] <= 1e-3 and errors[1] <= 1e-4
