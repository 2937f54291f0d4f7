"""The class model visualisation of Simonyan, Vedaldi & Zisserman (arXiv:1312.6034, section 2).

The image that a class's unnormalised score likes best under an L2 penalty,

    arg max_I  S_c(I) - lambda * ||I||^2,

found by gradient ascent from the zero image in the mean-subtracted (Caffe) input space; the
mean pixel is added back to show it. Each step is ``I += eta * grad(objective)`` with one
learning rate per image, set so that the first step changes the zero image by ``step`` pixel
levels (root mean square over its values) -- one setting then suits nets whose gradients differ
by orders of magnitude (a random net, a narrow test net, VGG-16) -- and capped at
``1 / (2 lambda)``, beyond which the penalty alone would overshoot. Later steps shrink with the
gradient as the ascent converges. A step that would lower an image's objective is not taken
and that image's rate is halved, so the objective never falls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from verydeep.configs import CROP
from verydeep.data.preprocess import from_caffe
from verydeep.errors import VerydeepError
from verydeep.explain.methods import Target, class_index, class_name
from verydeep.explain.nets import Net, as_net

#: lambda of the L2 penalty, per squared Caffe-space pixel value (0..255 scale).
L2 = 1e-5
#: Root-mean-square change of the zero image in the first step, in pixel levels (0..255 scale).
STEP = 1.0
#: Gradient steps (one forward and backward pass each).
STEPS = 200


@dataclass(frozen=True)
class ClassModel:
    """Class model images and how the ascent went.

    ``images``: N x H x W x 3 uint8 RGB (mean pixel added back, clipped to 0..255); ``inputs``:
    the optimised N x 3 x H x W Caffe-space images; ``scores``, ``objectives``, ``norms``:
    N x (steps + 1) float64 histories of S_c, S_c - l2 ||I||^2 and ||I|| at the image after each
    step (the first column is the zero image); ``probabilities``: the final image's soft-max
    probability of its class, ``class_probabilities`` of every class (N x classes, float64).
    """

    classes: tuple[int, ...]
    names: tuple[str, ...]
    images: np.ndarray
    inputs: Tensor
    scores: Tensor
    objectives: Tensor
    norms: Tensor
    probabilities: tuple[float, ...]
    class_probabilities: Tensor
    l2: float
    step: float
    steps: int

    def __len__(self) -> int:
        return len(self.classes)


def class_model(
    model: nn.Module,
    target: Target | Sequence[Target],
    *,
    size: int | tuple[int, int] = CROP,
    l2: float = L2,
    step: float = STEP,
    steps: int = STEPS,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ClassModel:
    """Class model visualisations of ``target`` (a class index or name, or one per image) at
    ``size`` pixels, on the model's device; see the module docstring for the ascent."""
    net = as_net(model)
    targets = [target] if isinstance(target, (int, str)) else list(target)
    if any(t == "top" for t in targets) or not targets:
        raise VerydeepError("class model: give class indices or names ('top' needs an image; this starts from zero)")
    if l2 < 0 or step <= 0 or steps < 0:
        raise VerydeepError(f"class model: expected l2 >= 0, step > 0, steps >= 0; found {l2}, {step}, {steps}")
    classes = [class_index(t, net) for t in targets]
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.zeros(len(classes), 3, h, w, dtype=dtype, device=net.device())
    state = _evaluate(net, x, classes, l2)
    history = [(state.score, state.objective, state.norm)]  # not the gradients: they are image-sized
    # The learning rate that moves the zero image by `step` levels (RMS), capped at 1 / (2 l2).
    rms = state.grad.pow(2).mean(dim=(1, 2, 3)).sqrt().clamp_min(torch.finfo(dtype).tiny)
    eta = (step / rms).clamp_max(1 / (2 * l2)) if l2 > 0 else step / rms
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="class model", unit="step", disable=not progress):
        candidate = x + eta.view(-1, 1, 1, 1) * state.grad
        new = _evaluate(net, candidate, classes, l2)
        better = new.objective > state.objective
        x = torch.where(better.view(-1, 1, 1, 1), candidate, x)
        state = _State(*(torch.where(better.view(-1, *[1] * (a.dim() - 1)), b, a) for a, b in zip(state, new)))
        eta = torch.where(better, eta, eta / 2)
        history.append((state.score, state.objective, state.norm))
    with torch.no_grad():
        probs = torch.softmax(net.run(x).scores.double(), dim=1).cpu()
    rows = torch.arange(len(classes))
    rgb = from_caffe(x.detach()).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    scores, objectives, norms = (torch.stack([s[i] for s in history], dim=1).double().cpu() for i in range(3))
    return ClassModel(
        classes=tuple(classes),
        names=tuple(class_name(c, net) for c in classes),
        images=rgb,
        inputs=x.detach(),
        scores=scores,
        objectives=objectives,
        norms=norms,
        probabilities=tuple(probs[rows, classes].tolist()),
        class_probabilities=probs,
        l2=float(l2),
        step=float(step),
        steps=int(steps),
    )


class _State(NamedTuple):
    """Per image at one iterate: S_c, S_c - l2 ||x||^2, ||x||, the objective's gradient."""

    score: Tensor
    objective: Tensor
    norm: Tensor
    grad: Tensor


def _evaluate(net: Net, x: Tensor, classes: list[int], l2: float) -> _State:
    """One forward and backward pass at ``x``."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        scores = net.run(x).scores
        score = scores[torch.arange(len(classes), device=x.device), classes]
        squared = x.pow(2).sum(dim=(1, 2, 3))
        objective = score - l2 * squared
        (grad,) = torch.autograd.grad(objective.sum(), [x])
    return _State(score.detach(), objective.detach(), squared.detach().sqrt(), grad.detach())
