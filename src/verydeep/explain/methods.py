"""Where in an image the net's decision comes from: saliency, Grad-CAM, guided backpropagation,
guided Grad-CAM and the dense score map.

Every method takes a model (a VGG, or a CaffeGraph where the method applies) and a batch of
Caffe-space images (N x 3 x H x W; BGR, 0..255, mean pixel subtracted), on the model's device,
and a target class per image: ``"top"`` (the net's best class), an index, or a name from
``model.class_names``. The result is an :class:`Explanation`. Gradients are taken with
:func:`torch.autograd.grad` on the input or the tapped layer only, so the model's parameter
gradients are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verydeep.errors import VerydeepError
from verydeep.explain.nets import Net, as_net

#: A target class: ``"top"``, an index, or a class name (a digit string is an index).
Target = int | str
#: One target for every image, or one per image.
Targets = Target | Sequence[Target]
#: SmoothGrad's noise (Smilkov et al., arXiv:1706.03825): standard deviation as a fraction of
#: each image's value range; 10-20% is the range that paper recommends.
SMOOTHGRAD_NOISE = 0.15


@dataclass(frozen=True)
class Explanation:
    """Maps for a batch of images and the class each explains.

    ``maps``: N x H x W at the input's resolution (saliency, gradcam, score-map), or
    N x 3 x H x W for the guided methods (a gradient in the input's BGR channel order).
    ``coarse``: the map before upsampling (Grad-CAM at its layer; the score map's per-position
    class probabilities), else None. ``probabilities``: each image's soft-max probability of its
    class (of the spatially averaged scores when the image is larger than the net's crop);
    ``class_probabilities``: every class's, N x classes (float64, on the CPU).
    """

    method: str
    maps: Tensor
    classes: tuple[int, ...]
    names: tuple[str, ...]
    probabilities: tuple[float, ...]
    class_probabilities: Tensor
    layer: str | None = None
    coarse: Tensor | None = None

    def __len__(self) -> int:
        return len(self.classes)


def class_indices(target: Targets, scores: Tensor, net: Net) -> list[int]:
    """Each image's target class index; ``scores`` (N x classes) decide ``"top"``."""
    n = scores.shape[0]
    targets = [target] * n if isinstance(target, (int, str)) else list(target)
    if len(targets) != n:
        raise VerydeepError(f"targets: expected one class or {n} (one per image), found {len(targets)}")
    top = scores.argmax(dim=1).tolist()
    return [top[i] if t == "top" else class_index(t, net) for i, t in enumerate(targets)]


def class_index(target: Target, net: Net) -> int:
    """A class index from an index or a name (exact, else the one case-insensitive match)."""
    names = net.class_names
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        if names is None:
            raise VerydeepError(f"class {target!r}: the model has no class names; give an index")
        if target in names:
            return names.index(target)
        folded = [i for i, name in enumerate(names) if name.lower() == target.lower()]
        if len(folded) == 1:
            return folded[0]
        close = [name for name in names if target.lower() in name.lower()][:5]
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise VerydeepError(f"class {target!r}: no such class name among the model's {len(names)}{hint}")
    index = int(target)
    if not 0 <= index < net.num_classes:
        raise VerydeepError(f"class {index}: expected an index in 0..{net.num_classes - 1}")
    return index


def class_name(index: int, net: Net) -> str:
    names = net.class_names
    return names[index] if names and index < len(names) else str(index)


def checked_input(x: Tensor, net: Net) -> Tensor:
    """``x`` as the methods take it: N x 3 x H x W floating point, on the model's device."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        found = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise VerydeepError(f"input: expected an N x 3 x H x W floating-point Caffe-space batch, found {found}")
    device = net.device()
    if x.device != device:
        raise VerydeepError(f"input is on {x.device}, the model on {device}: move one of them (model.to(x.device))")
    return x


@dataclass(frozen=True)
class _Grads:
    classes: list[int]
    probabilities: Tensor  # N x classes
    grad: Tensor  # of the picked scores, with respect to the input or the tapped layer
    tapped: Tensor | None


def _gradients(net: Net, x: Tensor, target: Targets, *, guided: bool = False, tap: str | None = None) -> _Grads:
    """One forward and backward pass: the gradient of each image's target-class score."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # also when tapping: frozen parameters
        out = net.run(x, guided=guided, tap=tap)
        scores = out.scores
        classes = class_indices(target, scores.detach(), net)
        rows = torch.arange(len(classes), device=scores.device)
        picked = scores[rows, torch.tensor(classes, device=scores.device)]
        wrt = x if tap is None else out.tapped
        if wrt is None:
            raise AssertionError(f"layer {tap} was not reached")
        (grad,) = torch.autograd.grad(picked.sum(), [wrt])
        probs = torch.softmax(scores.detach().double(), dim=1).cpu()
    tapped = None if out.tapped is None else out.tapped.detach()
    return _Grads(classes, probs, grad.detach(), tapped)


def _explanation(
    method: str,
    net: Net,
    classes: list[int],
    probs: Tensor,
    maps: Tensor,
    *,
    layer: str | None = None,
    coarse: Tensor | None = None,
) -> Explanation:
    names = tuple(class_name(c, net) for c in classes)
    picked = tuple(probs[torch.arange(len(classes)), classes].tolist())
    return Explanation(method, maps, tuple(classes), names, picked, probs, layer=layer, coarse=coarse)


def saliency(
    model: nn.Module,
    x: Tensor,
    target: Targets = "top",
    *,
    samples: int = 0,
    noise: float = SMOOTHGRAD_NOISE,
    seed: int = 0,
) -> Explanation:
    """The image-specific class saliency map of Simonyan, Vedaldi & Zisserman (arXiv:1312.6034):
    ``max over colour channels of |d S_c / d x|``, S_c the class's unnormalised score.

    ``samples > 0`` averages the map over that many copies of the image with Gaussian noise
    (SmoothGrad; standard deviation ``noise`` times each image's value range, drawn from a CPU
    generator seeded with ``seed``, in the order sample, image); the class is the clean image's.
    """
    net = as_net(model)
    x = checked_input(x, net)
    g = _gradients(net, x, target)
    maps = g.grad.abs().amax(dim=1)
    if samples > 0:
        span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        total = torch.zeros_like(maps)
        for _ in range(samples):
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            total += _gradients(net, x + eps * (noise * span), g.classes).grad.abs().amax(dim=1)
        maps = total / samples
    return _explanation("saliency" if samples <= 0 else "smoothgrad", net, g.classes, g.probabilities, maps)


def gradcam(model: nn.Module, x: Tensor, target: Targets = "top", *, layer: str | None = None) -> Explanation:
    """Grad-CAM (Selvaraju et al., arXiv:1610.02391) at ``layer`` (a Caffe name: ``relu5_3``,
    ``conv4_2``, ``pool4``, ...; default the last convolution's ReLU, ``relu5_3`` in VGG-16):
    ``ReLU(sum_k a_k A_k)`` with ``a_k`` the spatial mean of ``d S_c / d A_k``; ``coarse`` at the
    layer's resolution, ``maps`` bilinearly upsampled to the input's."""
    net = as_net(model)
    x = checked_input(x, net)
    name = net.check_layer(layer or net.default_layer)
    g = _gradients(net, x, target, tap=name)
    if g.tapped is None or g.tapped.dim() != 4:
        raise VerydeepError(f"layer {name!r}: Grad-CAM needs an N x C x h x w output")
    weights = g.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * g.tapped).sum(dim=1))
    maps = F.interpolate(cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return _explanation("gradcam", net, g.classes, g.probabilities, maps, layer=name, coarse=cam)


def guided_backprop(model: nn.Module, x: Tensor, target: Targets = "top") -> Explanation:
    """Guided backpropagation (Springenberg et al., arXiv:1412.6806): the class score's gradient
    with every ReLU passing back only positive gradients; N x 3 x H x W, BGR like the input."""
    net = as_net(model)
    x = checked_input(x, net)
    g = _gradients(net, x, target, guided=True)
    return _explanation("guided-backprop", net, g.classes, g.probabilities, g.grad)


def guided_gradcam(model: nn.Module, x: Tensor, target: Targets = "top", *, layer: str | None = None) -> Explanation:
    """Guided Grad-CAM (Selvaraju et al.): guided backpropagation times the upsampled Grad-CAM
    map, channel by channel; N x 3 x H x W, BGR like the input; ``coarse`` is the Grad-CAM map."""
    cam = gradcam(model, x, target, layer=layer)
    guided = guided_backprop(model, x, list(cam.classes))
    return Explanation(
        "guided-gradcam",
        guided.maps * cam.maps[:, None],
        cam.classes,
        cam.names,
        cam.probabilities,
        cam.class_probabilities,
        layer=cam.layer,
        coarse=cam.coarse,
    )


def score_map(
    model: nn.Module,
    x: Tensor,
    target: Targets = "top",
    *,
    precision: str = "fp32",
    fast: nn.Module | None = None,
) -> Explanation:
    """The dense view's map of the class at the image's own resolution (the paper's fully
    convolutional evaluation, read as a localisation map): per position the soft-max
    probability of the class (``coarse``, N x h x w), upsampled to N x H x W with each position
    at the centre of the window it sees. Runs on the fast path (no gradients needed) in
    ``precision`` (fp32 stays within 1e-5 of the exact net; ``fast``: that path from
    :func:`~verydeep.explain.nets.fast_dense`, built once for many batches); an image of the
    crop size (224) has a single position."""
    net = as_net(model)
    x = checked_input(x, net)
    smap = net.dense_scores(x, precision=precision, fast=fast).float()
    scores = smap.mean(dim=(2, 3))
    classes = class_indices(target, scores, net)
    rows = torch.arange(len(classes), device=smap.device)
    coarse = torch.softmax(smap, dim=1)[rows, torch.tensor(classes, device=smap.device)]
    maps = upsample_windows(coarse, (x.shape[-2], x.shape[-1]), net.dense_geometry)
    probs = torch.softmax(scores.double(), dim=1).cpu()
    return _explanation("score-map", net, classes, probs, maps, coarse=coarse)


def upsample_windows(coarse: Tensor, size: tuple[int, int], geometry: tuple[int, int] | None) -> Tensor:
    """N x h x w per-window values -> N x H x W, linear between window centres (a window of
    ``geometry = (stride, window)`` at position i covers pixels ``stride*i .. stride*i + window - 1``)
    and constant beyond the outer ones; plain bilinear resizing when the geometry is unknown."""
    if geometry is None:
        return F.interpolate(coarse[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    stride, window = geometry
    axes = []
    for length, cells in zip(size, coarse.shape[-2:]):
        u = (torch.arange(length, dtype=torch.float32, device=coarse.device) - (window - 1) / 2) / stride
        axes.append(2 * u / (cells - 1) - 1 if cells > 1 else torch.zeros_like(u))
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(coarse.shape[0], -1, -1, -1).to(coarse.dtype)
    out = F.grid_sample(coarse[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, 0]


#: Method names (as the command line spells them) -> function; class-model is in :mod:`.class_model`.
METHODS: dict[str, Callable[..., Explanation]] = {
    "saliency": saliency,
    "gradcam": gradcam,
    "guided-backprop": guided_backprop,
    "guided-gradcam": guided_gradcam,
    "score-map": score_map,
}
