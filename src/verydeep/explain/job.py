"""``verydeep explain``'s job: explain many image files into a folder of pictures and arrays.

Per image, ``OUT/<stem>.<method>.png`` (the map over the photo, the class and its probability
drawn in) and ``OUT/<stem>.<method>.npy`` (the raw map, float32); for the run,
``OUT/index.<method>.html`` and ``OUT/contact-sheet.<method>.png``, so runs of several methods
can share a folder. Images are decoded in loader workers
that report an unreadable file instead of failing (:mod:`verydeep.data.images`); it is skipped,
listed in the result, and the other images are explained.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from verydeep.configs import CROP
from verydeep.core.atomic import atomic_path, make_dirs
from verydeep.data.images import Failed, ImageDataset, loader
from verydeep.data.preprocess import RESIZE, center_crop, rescale, to_caffe
from verydeep.errors import VerydeepError
from verydeep.explain.class_model import L2, STEP, STEPS, class_model
from verydeep.explain.methods import METHODS, Explanation, Target
from verydeep.explain.nets import fast_dense
from verydeep.explain.render import SHEET_MAX, Panel, save_index, save_overlay, save_picture, save_sheet

#: The input each method sees by default: (shorter side, central crop; 0 = the whole image).
#: The score map needs an image larger than the net's crop to have more than one position.
INPUTS: dict[str, tuple[int, int]] = {
    "saliency": (RESIZE, CROP),
    "gradcam": (RESIZE, CROP),
    "guided-backprop": (RESIZE, CROP),
    "guided-gradcam": (RESIZE, CROP),
    "score-map": (448, 0),
}
#: Options that only some methods take (beyond the image and the class).
OPTIONS: dict[str, tuple[str, ...]] = {
    "saliency": ("samples",),
    "gradcam": ("layer",),
    "guided-gradcam": ("layer",),
    "score-map": ("precision", "fast"),
}
#: Those options as the command line spells them, for messages.
FLAGS = {"layer": "--layer", "samples": "--smooth (samples)", "precision": "--precision"}
#: Classes listed per image in the result.
TOP = 5


@dataclass(frozen=True)
class Explained:
    """One picture the run wrote: its source image (None for a class model), its files, the
    class it explains and the net's top classes (index, name, probability)."""

    source: str | None
    png: str
    npy: str
    index: int
    name: str
    probability: float
    top: tuple[tuple[int, str, float], ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.source,
            "png": self.png,
            "npy": self.npy,
            "class": {"index": self.index, "label": self.name, "probability": self.probability},
            "top": [{"index": i, "label": n, "probability": p} for i, n, p in self.top],
        }


@dataclass(frozen=True)
class ExplainRun:
    """What a run wrote, and the images it could not read."""

    method: str
    layer: str | None
    output_dir: str
    items: tuple[Explained, ...]
    skipped: tuple[Failed, ...]
    index: str | None
    contact_sheet: str | None

    def as_dict(self) -> dict[str, Any]:
        """The run as JSON: its scalar fields, then ``images`` and ``skipped``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("items", "skipped")}
        out["images"] = [item.as_dict() for item in self.items]
        out["skipped"] = [{"image": f.path, "reason": f.reason} for f in self.skipped]
        return out


class Prepare:
    """uint8 3 x H x W RGB -> shorter side ``size``, central ``crop`` (0: none); picklable for
    loader workers."""

    def __init__(self, size: int, crop: int) -> None:
        self.size, self.crop = size, crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = rescale(image, self.size)
        return center_crop(image, self.crop) if self.crop else image


class _Names:
    """``<stem>.<method>`` file names, unique within the run (``-2``, ``-3`` on a repeated stem)."""

    def __init__(self, method: str) -> None:
        self.method, self.seen = method, set[str]()

    def __call__(self, stem: str) -> str:
        base = re.sub(r"[^\w.-]+", "_", stem) or "image"
        name, k = base, 1
        while name in self.seen:
            k += 1
            name = f"{base}-{k}"
        self.seen.add(name)
        return f"{name}.{self.method}"


def _top(probs: torch.Tensor, names: Sequence[str] | None) -> tuple[tuple[int, str, float], ...]:
    values, indices = probs.topk(min(TOP, probs.numel()))
    return tuple(
        (i, names[i] if names and i < len(names) else str(i), v) for v, i in zip(values.tolist(), indices.tolist())
    )


def _save_npy(array: np.ndarray, out: Path) -> None:
    with atomic_path(out) as tmp:
        np.save(tmp, np.ascontiguousarray(array, dtype=np.float32))


def _caption(e: Explanation, k: int) -> str:
    return f"{e.names[k]} ({e.classes[k]}): p = {e.probabilities[k]:.3f}"


def check_crop(size: int | None, crop: int | None) -> None:
    """Refuse a ``crop`` larger than ``size`` when both are given: the crop would be mostly padding."""
    if size and crop and crop > size:
        raise VerydeepError(
            f"--crop {crop} is larger than --size {size}: the crop would be mostly padding; use --size {crop} or more"
        )


def explain_files(
    model: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    method: str = "gradcam",
    target: Target = "top",
    layer: str | None = None,
    samples: int = 0,
    size: int | None = None,
    crop: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    workers: int | None = None,
    progress: bool = True,
) -> ExplainRun:
    """Explain ``paths`` with ``method`` (a name of :data:`~verydeep.explain.methods.METHODS`)
    into ``out_dir``; the model is moved to ``device``. ``size``/``crop`` default per method
    (:data:`INPUTS`); ``crop=0`` keeps the whole rescaled image. Gradient methods run in fp32;
    ``precision`` is the score map's."""
    if method not in METHODS:
        raise VerydeepError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}, class-model")
    given = {"layer": layer is not None, "samples": samples > 0, "precision": precision != "fp32"}
    wrong = [name for name, on in given.items() if on and name not in OPTIONS.get(method, ())]
    if wrong:
        takers = [m for m, opts in OPTIONS.items() if wrong[0] in opts]
        raise VerydeepError(f"{FLAGS[wrong[0]]} applies to {', '.join(takers)}, not to {method}")
    if batch_size < 1:
        raise VerydeepError(f"batch size must be at least 1, found {batch_size}")
    check_crop(size, crop)
    default_size, default_crop = INPUTS[method]
    size, crop = size or default_size, default_crop if crop is None else crop
    model = model.to(device).eval()
    names = getattr(model, "class_names", None)
    options: dict[str, Any] = {"layer": layer, "samples": samples, "precision": precision}
    if method == "score-map":
        options["fast"] = fast_dense(model, precision, device)
    options = {k: v for k, v in options.items() if k in OPTIONS.get(method, ())}
    run = METHODS[method]
    out = make_dirs(out_dir)
    stems = _Names(method)
    items: list[Explained] = []
    panels: list[Panel] = []
    captions: list[str] = []
    skipped: list[Failed] = []
    used_layer: str | None = None
    from tqdm.auto import tqdm

    dataset = ImageDataset([str(p) for p in paths], Prepare(size, crop))
    if workers is None and len(dataset) <= batch_size:
        workers = 0  # one batch: worker processes would cost more to start than they save
    with tqdm(total=len(dataset), unit="img", desc=f"explain {method}", disable=not progress) as bar:
        for indices, batch, failed in loader(dataset, batch_size, workers):
            skipped += failed
            groups = (
                [(indices, batch)]
                if isinstance(batch, torch.Tensor)
                else [([i], b[None]) for i, b in zip(indices, batch)]
            )
            for group, rgb in groups:
                e = run(model, to_caffe(rgb.to(device)), target, **options)
                used_layer = e.layer
                for k, i in enumerate(group):
                    source = dataset.paths[i]
                    stem = stems(Path(source).stem)
                    raw = e.maps[k].detach().float().cpu().numpy()
                    panel = Panel(rgb[k].permute(1, 2, 0).numpy(), raw, method, _caption(e, k))
                    png, npy = out / f"{stem}.png", out / f"{stem}.npy"
                    save_overlay(panel, png)
                    _save_npy(raw, npy)
                    captions.append(panel.caption)
                    if len(panels) < SHEET_MAX:  # the contact sheet's; the others are on disk
                        panels.append(panel)
                    top = _top(e.class_probabilities[k], names)
                    items.append(
                        Explained(source, str(png), str(npy), e.classes[k], e.names[k], e.probabilities[k], top)
                    )
            bar.update(len(indices) + len(failed))
    return _finish(method, used_layer, out, items, captions, panels, sorted(skipped, key=lambda f: f.index))


def class_model_files(
    model: nn.Module,
    targets: Sequence[Target],
    out_dir: str | os.PathLike[str],
    *,
    size: int = CROP,
    l2: float = L2,
    step: float = STEP,
    steps: int = STEPS,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ExplainRun:
    """Class model images of ``targets`` into ``out_dir``: ``class-model-<index>-<name>.png``
    (the image, and contrast-stretched) and ``.npy`` (the Caffe-space input, 3 x H x W)."""
    model = model.to(device).eval()
    result = class_model(model, list(targets), size=size, l2=l2, step=step, steps=steps, progress=progress)
    names = getattr(model, "class_names", None)
    out = Path(out_dir)
    items, panels, captions = [], [], []
    for k, (index, name) in enumerate(zip(result.classes, result.names)):
        stem = f"class-model-{index}-" + re.sub(r"[^\w.-]+", "_", name)
        caption = (
            f"class model: {name} ({index}), p = {result.probabilities[k]:.3f}, score {float(result.scores[k, -1]):.2f}"
        )
        png, npy = out / f"{stem}.png", out / f"{stem}.npy"
        save_picture(result.images[k], png, caption)
        _save_npy(result.inputs[k].float().cpu().numpy(), npy)
        panels.append(Panel(result.images[k], None, "class-model", caption))
        captions.append(caption)
        top = _top(result.class_probabilities[k], names)
        items.append(Explained(None, str(png), str(npy), index, name, result.probabilities[k], top))
    return _finish("class-model", None, out, items, captions, panels[:SHEET_MAX], [])


def _finish(
    method: str,
    layer: str | None,
    out: Path,
    items: list[Explained],
    captions: list[str],
    panels: list[Panel],
    skipped: list[Failed],
) -> ExplainRun:
    """The run's index page (every item) and contact sheet (``panels``: the first items')."""
    index = sheet = None
    if items:
        title = f"verydeep explain --method {method}" + (f" --layer {layer}" if layer else "")
        rows = [{"png": Path(i.png).name, "caption": c, "source": i.source or ""} for i, c in zip(items, captions)]
        index = str(save_index(rows, out / f"index.{method}.html", title))
        sheet = str(save_sheet(panels, out / f"contact-sheet.{method}.png", title, total=len(items)))
    return ExplainRun(method, layer, str(out), tuple(items), tuple(skipped), index, sheet)
