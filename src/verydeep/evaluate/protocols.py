"""The paper's test protocols (Sec. 3.2, 4.1-4.3): center crop, multi-crop, dense, combined.

Every protocol works at one or several test scales Q: the image is rescaled isotropically so
its shorter side is Q, and the soft-max outputs of the scales are averaged.

- ``center``: the central 224x224 crop (and its horizontal flip), run through the classic net.
- ``multicrop``: a regular 5x5 grid of 224x224 crops spanning the rescaled image, and their
  flips: 50 crops per scale; soft-max averaged over the crops.
- ``dense``: the fully convolutional net over the whole rescaled image; the class score map
  is averaged spatially, then soft-maxed; image and flip soft-max averaged.
- ``combined``: the mean of the dense and multi-crop soft-max outputs.

A run is a fixed list of *chunks* (``batch_size`` consecutive images). Ranks take contiguous
runs of chunks, and each chunk's result is written as soon as it is flushed, so a run can be
killed, resumed, or split across ranks and still compute every image in exactly the same
batch as an uninterrupted single-process run: the final scores are bit-identical on the same
device. Images are decoded and rescaled in DataLoader workers; crops and the BGR/mean
conversion happen on the device.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from verydeep.configs import CROP
from verydeep.core import distributed
from verydeep.data.eval_set import EvalSet, check_labels
from verydeep.data.images import Failed, ImageDataset, collate_skipping
from verydeep.data.preprocess import to_caffe
from verydeep.errors import VerydeepError
from verydeep.models.vgg import spatial_average

PROTOCOLS = ("center", "multicrop", "dense", "combined")
#: The paper's best settings for the released nets (trained with S jittered in [256, 512]):
#: Q = {256, 384, 512}; ``center`` keeps the seed's single 256 scale.
DEFAULT_SCALES: dict[str, tuple[int, ...]] = {
    "center": (256,),
    "multicrop": (256, 384, 512),
    "dense": (256, 384, 512),
    "combined": (256, 384, 512),
}
#: Rescaling: name -> (torchvision mode, antialias). "bilinear" is Pillow's / Matlab imresize's
#: antialiased shrink; "bilinear-opencv" is cv2.resize(INTER_LINEAR), what Caffe's data layers use.
INTERPOLATIONS: dict[str, tuple[v2.InterpolationMode, bool]] = {
    "bilinear": (v2.InterpolationMode.BILINEAR, True),
    "bicubic": (v2.InterpolationMode.BICUBIC, True),
    "bilinear-opencv": (v2.InterpolationMode.BILINEAR, False),
    "nearest": (v2.InterpolationMode.NEAREST, False),
}
#: Where the multi-crop grid's crops sit: "span" puts the outer crops at the image's corners and
#: spaces the rest evenly (the crops cover the image; the middle one is the center crop);
#: "cells" centres one crop on each cell of a 5x5 partition, shifted inside the image.
GRIDS = ("span", "cells")
#: Dense evaluation: average the class score map over positions before the soft-max ("scores",
#: the paper's sum-pooling of class scores) or average the per-position soft-max ("softmax").
DENSE_AVERAGES = ("scores", "softmax")

#: Test hook: exit abruptly (no flush, no cleanup) after this many chunks, to test --resume.
EXIT_AFTER_ENV = "VERYDEEP_EVALUATE_EXIT_AFTER"
SCORES_FORMAT = "verydeep-scores-1"

Forward = Callable[[torch.Tensor], torch.Tensor]


# -- the protocol ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """What is computed for each image; every choice the paper leaves open is a field."""

    name: str = "dense"
    scales: tuple[int, ...] = DEFAULT_SCALES["dense"]
    flip: bool = True
    interpolation: str = "bilinear"
    grid: str = "span"
    grid_size: int = 5
    dense_average: str = "scores"

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise VerydeepError(f"unknown protocol {self.name!r}; expected one of {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "scales", tuple(int(q) for q in self.scales))
        if not self.scales:
            raise VerydeepError("at least one test scale Q is needed")
        if min(self.scales) < CROP:
            raise VerydeepError(f"test scale Q={min(self.scales)} is smaller than the {CROP}x{CROP} crop")
        if len(set(self.scales)) != len(self.scales):
            raise VerydeepError(f"test scales repeat: {list(self.scales)}")
        for value, choices, what in (
            (self.interpolation, INTERPOLATIONS, "interpolation"),
            (self.grid, GRIDS, "grid"),
            (self.dense_average, DENSE_AVERAGES, "dense average"),
        ):
            if value not in choices:
                raise VerydeepError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
        if self.grid_size < 1:
            raise VerydeepError(f"grid size must be positive, found {self.grid_size}")

    @classmethod
    def make(cls, name: str = "dense", scales: Sequence[int] | None = None, **kw: Any) -> Protocol:
        """A protocol with the paper's default scales for ``name`` unless ``scales`` are given."""
        if name not in PROTOCOLS:
            raise VerydeepError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
        return cls(name, tuple(scales) if scales else DEFAULT_SCALES[name], **kw)

    @property
    def uses_crops(self) -> str | None:
        """Which crop set the classic net sees: "center", "multicrop" or None."""
        return {"center": "center", "multicrop": "multicrop", "combined": "multicrop"}.get(self.name)

    @property
    def uses_dense(self) -> bool:
        return self.name in ("dense", "combined")

    def crops_per_scale(self) -> int:
        n = 1 if self.name == "center" else self.grid_size**2
        return n * (2 if self.flip else 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (as they read back from a scores file)."""
        return {**asdict(self), "scales": list(self.scales)}

    def describe(self) -> str:
        return f"{self.name} Q={','.join(map(str, self.scales))}{'' if self.flip else ' no-flip'}"


# -- geometry -------------------------------------------------------------------------------------
def center_offset(length: int, crop: int = CROP) -> int:
    """Offset of a centred crop (rounded as torchvision's center_crop rounds)."""
    return int(round((length - crop) / 2.0))


def grid_offsets(length: int, crop: int = CROP, n: int = 5, placement: str = "span") -> list[int]:
    """Start offsets of ``n`` crops along one side of length ``length`` (all inside it)."""
    if length < crop:
        raise VerydeepError(f"a {crop}-pixel crop does not fit in {length} pixels")
    room = length - crop
    if n == 1:
        return [center_offset(length, crop)]
    if placement == "span":  # first at 0, last at room, the middle one is the centre crop's
        return [int(round(room * i / (n - 1))) for i in range(n)]
    if placement == "cells":  # centred on each of n equal cells, shifted inside the image
        return [min(room, max(0, int(round((i + 0.5) * length / n - crop / 2)))) for i in range(n)]
    raise VerydeepError(f"unknown grid placement {placement!r}; expected one of {', '.join(GRIDS)}")


def crop_boxes(height: int, width: int, protocol: Protocol) -> list[tuple[int, int]]:
    """(top, left) of the 224x224 crops of a rescaled image, before flips."""
    if protocol.uses_crops == "center":
        return [(center_offset(height), center_offset(width))]
    rows = grid_offsets(height, CROP, protocol.grid_size, protocol.grid)
    cols = grid_offsets(width, CROP, protocol.grid_size, protocol.grid)
    return [(t, l) for t in rows for l in cols]


# -- decoding (runs in DataLoader workers) ---------------------------------------------------------
class RescaleToScales:
    """uint8 3xHxW RGB -> one uint8 image per test scale Q, shorter side Q (picklable)."""

    def __init__(self, scales: Sequence[int], interpolation: str = "bilinear") -> None:
        self.scales = tuple(scales)
        self.interpolation = interpolation

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mode, antialias = INTERPOLATIONS[self.interpolation]
        return tuple(TF.resize(image, [q], interpolation=mode, antialias=antialias) for q in self.scales)


def rescale(image: torch.Tensor, q: int, interpolation: str = "bilinear") -> torch.Tensor:
    """One image with its shorter side rescaled to ``q``."""
    return RescaleToScales((q,), interpolation)(image)[0]


# -- scoring (runs on the device) -------------------------------------------------------------------
class Scorer:
    """Soft-max outputs of a batch of images under a protocol.

    ``forward`` maps N x 3 x 224 x 224 Caffe input to N x C scores; ``dense_forward`` maps
    N x 3 x H x W to an N x C x h x w score map. ``max_batch`` bounds the crops of one forward
    pass (the dense net gets the same number of pixels); one image's crops stay together
    unless they alone exceed it.
    """

    def __init__(
        self,
        protocol: Protocol,
        forward: Forward | None,
        dense_forward: Forward | None,
        device: str | torch.device = "cpu",
        max_batch: int = 128,
    ) -> None:
        self.protocol = protocol
        self.forward = forward
        self.dense_forward = dense_forward
        self.device = torch.device(device)
        self.max_batch = max(1, int(max_batch))

    @torch.inference_mode()
    def __call__(self, items: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``items[n][s]``: image n rescaled to scale s (uint8 3xHxW). Returns N x C float32."""
        p = self.protocol
        if p.name in ("center", "multicrop"):
            return self.crop_probs(items)
        if p.name == "dense":
            return self.dense_probs(items)
        return (self.dense_probs(items) + self.crop_probs(items)) / 2

    def _caffe(self, image: torch.Tensor) -> torch.Tensor:
        return to_caffe(image.to(self.device, non_blocking=True))

    def _crops_of(self, scaled: Sequence[torch.Tensor]) -> torch.Tensor:
        """All crops of one image, scale by scale: S*k x 3 x 224 x 224 (flips after originals)."""
        out = []
        for image in scaled:
            x = self._caffe(image)
            boxes = crop_boxes(x.shape[-2], x.shape[-1], self.protocol)
            crops = torch.stack([x[:, t : t + CROP, l : l + CROP] for t, l in boxes])
            out += [crops, crops.flip(-1)] if self.protocol.flip else [crops]
        return torch.cat(out)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.float(), dim=1)

    def crop_probs(self, items: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        if self.forward is None:
            raise VerydeepError(f"protocol {self.protocol.name} needs the classic net's forward")
        s, k = len(self.protocol.scales), self.protocol.crops_per_scale()
        results: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []

        def run() -> None:
            if not pending:
                return
            x = torch.cat(pending)
            pending.clear()
            for i in range(0, x.shape[0], self.max_batch):
                results.append(self._softmax(self.forward(x[i : i + self.max_batch])))

        for scaled in items:
            crops = self._crops_of(scaled)
            if pending and sum(c.shape[0] for c in pending) + crops.shape[0] > self.max_batch:
                run()
            pending.append(crops)
        run()
        if not results:
            return torch.zeros(0, 0)
        probs = torch.cat(results).view(len(items), s, k, -1)
        return probs.mean(dim=2).mean(dim=1).cpu()

    def dense_probs(self, items: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        if self.dense_forward is None:
            raise VerydeepError("the dense protocol needs the fully convolutional net (model.dense())")
        n, scales = len(items), self.protocol.scales
        per_scale: list[torch.Tensor | None] = [None] * len(scales)
        budget = self.max_batch * CROP * CROP
        views = 2 if self.protocol.flip else 1
        for s in range(len(scales)):
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # images of equal size batch together
            for i, scaled in enumerate(items):
                groups[tuple(scaled[s].shape[-2:])].append(i)
            for (h, w), members in groups.items():
                per = max(1, budget // (h * w * views))
                for j in range(0, len(members), per):
                    idx = members[j : j + per]
                    x = self._caffe(torch.stack([items[i][s] for i in idx]))
                    if self.protocol.flip:
                        x = torch.cat([x, x.flip(-1)])
                    score_map = self.dense_forward(x).float()
                    if self.protocol.dense_average == "scores":
                        probs = self._softmax(spatial_average(score_map))
                    else:
                        probs = self._softmax(score_map).mean(dim=(2, 3))
                    if self.protocol.flip:
                        probs = (probs[: len(idx)] + probs[len(idx) :]) / 2
                    if per_scale[s] is None:
                        per_scale[s] = torch.zeros(n, probs.shape[1])
                    per_scale[s][idx] = probs.cpu()
        if n == 0:
            return torch.zeros(0, 0)
        return torch.stack(per_scale).mean(dim=0)  # type: ignore[arg-type]


def forwards(
    model: nn.Module,
    protocol: Protocol,
    precision: str = "fp32",
    forward: Forward | None = None,
    dense_forward: Forward | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Forward | None, Forward | None]:
    """The classic and dense callables for ``model`` at ``precision``.

    fp32 uses the model as is. Otherwise ``model.optimized(precision)`` (:mod:`verydeep.runtime`) when it
    exists, else autocast. Callers may pass their own ``forward``/``dense_forward``.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise VerydeepError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
    fast: Any = None
    if precision != "fp32" and (forward is None or (dense_forward is None and protocol.uses_dense)):
        try:
            fast = model.optimized(precision=precision)  # type: ignore[operator]
        except (ImportError, AttributeError, NotImplementedError):
            fast = None
    if forward is None and protocol.uses_crops:
        forward = fast if fast is not None else _autocast(model, precision, device)
    if dense_forward is None and protocol.uses_dense:
        if fast is not None and callable(getattr(fast, "dense", None)):
            dense_forward = fast.dense()
        else:
            dense = getattr(model, "dense", None)
            if not callable(dense):
                raise VerydeepError(f"{type(model).__name__} has no dense() view; use --protocol center or multicrop")
            dense_forward = _autocast(dense(), precision, device)
    return forward, dense_forward


def _autocast(module: Forward, precision: str, device: str | torch.device) -> Forward:
    if precision == "fp32":
        return module
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device_type = torch.device(device).type

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return module(x)

    return run


# -- results ------------------------------------------------------------------------------------------
def topk_correct(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each label is among the ``k`` highest scores (ties broken by class index)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


@dataclass
class EvalResult:
    """Per-image soft-max outputs and the summary of one run (or of fused runs)."""

    protocol: dict[str, Any]
    ids: list[str]
    probs: np.ndarray  # N x C float32, images in the set's order
    labels: np.ndarray | None  # N int64, or None when unlabeled
    failed: list[dict[str, str]] = field(default_factory=list)  # {"id", "path", "reason"}
    wall_s: float = 0.0
    computed: int = 0  # images computed in this session (resumed runs compute fewer)
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.ids)

    @property
    def skipped(self) -> int:
        return len(self.failed)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.wall_s if self.wall_s > 0 else 0.0

    def metrics(self) -> dict[str, float] | None:
        """Top-1/top-5 error and accuracy in percent over the evaluated labelled images."""
        if self.labels is None or self.images == 0:
            return None
        top1 = float(topk_correct(self.probs, self.labels, 1).mean()) * 100
        top5 = float(topk_correct(self.probs, self.labels, 5).mean()) * 100
        return {
            "top1_error_pct": 100 - top1,
            "top5_error_pct": 100 - top5,
            "top1_accuracy_pct": top1,
            "top5_accuracy_pct": top5,
        }

    def predictions(self, k: int = 5, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Top-``k`` classes of each image."""
        k = min(k, self.probs.shape[1]) if self.probs.size else 0
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        out = []
        for n, image_id in enumerate(self.ids):
            top = [int(c) for c in order[n]]
            entry: dict[str, Any] = {
                "id": image_id,
                "top": top,
                "probabilities": [float(self.probs[n, c]) for c in top],
            }
            if class_names:
                entry["names"] = [class_names[c] for c in top]
            if self.labels is not None:
                entry["label"] = int(self.labels[n])
            out.append(entry)
        return out

    def summary(self) -> dict[str, Any]:
        """What the table and ``--json`` show."""
        return {
            "protocol": self.protocol,
            "images": self.images,
            "skipped": self.skipped,
            "metrics": self.metrics(),
            "wall_s": round(self.wall_s, 3),
            "images_computed": self.computed,
            "images_per_s": round(self.images_per_s, 3),
            "failed": self.failed,
            "run": self.run,
        }


def save_scores(result: EvalResult, path: str | os.PathLike) -> Path:
    """Write ``result`` as an .npz (probs, labels, ids, failed, meta JSON), atomically.

    Timing stays out of the file, so a resumed run writes the same file as an uninterrupted one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": SCORES_FORMAT, "protocol": result.protocol, "run": result.run, "metrics": result.metrics()}
    labels = result.labels if result.labels is not None else np.full(result.images, -1, dtype=np.int64)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            probs=result.probs.astype(np.float32, copy=False),
            labels=labels.astype(np.int64, copy=False),
            ids=np.array(result.ids, dtype=str),
            failed_ids=np.array([x["id"] for x in result.failed], dtype=str),
            failed_paths=np.array([x["path"] for x in result.failed], dtype=str),
            failed_reasons=np.array([x["reason"] for x in result.failed], dtype=str),
            meta=np.array(json.dumps(meta)),
        )
    os.replace(tmp, path)
    return path


def load_scores(path: str | os.PathLike) -> EvalResult:
    """Read a scores file written by :func:`save_scores`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            labels = z["labels"].astype(np.int64)
            failed = [
                {"id": str(i), "path": str(p), "reason": str(r)}
                for i, p, r in zip(z["failed_ids"], z["failed_paths"], z["failed_reasons"])
            ]
            result = EvalResult(
                protocol=meta["protocol"],
                ids=[str(i) for i in z["ids"]],
                probs=z["probs"].astype(np.float32),
                labels=None if labels.size and (labels < 0).all() else labels,
                failed=failed,
                run=meta.get("run", {}),
            )
    except FileNotFoundError:
        raise VerydeepError(f"{path}: no such scores file") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise VerydeepError(f"{path}: not a verydeep scores file ({type(e).__name__}: {e})") from None
    if meta.get("format") != SCORES_FORMAT:
        raise VerydeepError(f"{path}: expected format {SCORES_FORMAT}, found {meta.get('format')!r}")
    return result


def combine(paths: Sequence[str | os.PathLike]) -> EvalResult:
    """Average the soft-max outputs of saved runs (protocols, nets), as the paper fuses them.

    Images are matched by id; an image missing from (or skipped by) any run is skipped.
    """
    if len(paths) < 2:
        raise VerydeepError("--combine needs at least two scores files")
    runs = [load_scores(p) for p in paths]
    classes = {r.probs.shape[1] for r in runs if r.images}
    if len(classes) > 1:
        raise VerydeepError(f"scores files have different numbers of classes: {sorted(classes)}")
    common = set(runs[0].ids)
    for r in runs[1:]:
        common &= set(r.ids)
    ids = [i for i in runs[0].ids if i in common]
    probs = np.zeros((len(ids), classes.pop() if classes else 0), dtype=np.float64)
    labels = None
    for path, r in zip(paths, runs):
        where = {image_id: n for n, image_id in enumerate(r.ids)}
        rows = [where[i] for i in ids]
        probs += r.probs[rows]
        if r.labels is not None:
            these = r.labels[rows]
            if labels is not None and not np.array_equal(labels, these):
                bad = ids[int(np.flatnonzero(labels != these)[0])]
                raise VerydeepError(f"{path}: image {bad} has a different label than in {paths[0]}")
            labels = these
    failed: dict[str, dict[str, str]] = {}
    for path, r in zip(paths, runs):
        for x in r.failed:
            failed.setdefault(x["id"], x)
        for image_id in r.ids:
            if image_id not in common and image_id not in failed:
                failed[image_id] = {"id": image_id, "path": "", "reason": f"not in every scores file (has: {path})"}
    return EvalResult(
        protocol={"name": "fusion", "inputs": [str(p) for p in paths], "parts": [r.protocol for r in runs]},
        ids=ids,
        probs=(probs / len(runs)).astype(np.float32),
        labels=labels,
        failed=sorted(failed.values(), key=lambda x: x["id"]),
        run={"combined": [r.run for r in runs]},
    )


def write_predictions(
    result: EvalResult, path: str | os.PathLike, class_names: Sequence[str] | None = None, k: int = 5
) -> Path:
    """A CSV with each image's top-``k`` classes and probabilities (and label when known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "top", "probabilities", "top1_name"])
        for p in result.predictions(k, class_names):
            w.writerow(
                [
                    p["id"],
                    p.get("label", ""),
                    " ".join(map(str, p["top"])),
                    " ".join(f"{v:.6g}" for v in p["probabilities"]),
                    p["names"][0] if p.get("names") else "",
                ]
            )
    return path


# -- resumable storage ------------------------------------------------------------------------------
@dataclass
class ChunkResult:
    """The outcome of one chunk: soft-max rows of its readable images, and its failures."""

    chunk: int
    indices: np.ndarray  # int64, positions in the set
    probs: np.ndarray  # float32
    failed: list[Failed]


class PartStore:
    """``OUT.npz.parts/``: ``state.json`` (what the run computes) and one .npz per flush, named
    by its chunks, written atomically so a kill at any moment loses at most unflushed chunks."""

    def __init__(self, final: Path) -> None:
        self.dir = final.with_name(final.name + ".parts")
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def check_state(self, state: dict[str, Any]) -> None:
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VerydeepError(f"{self.state_path}: unreadable ({e}); delete {self.dir} to start over") from None
        check_same_run(saved, state, str(self.state_path))

    def create(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".state.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.state_path)

    def write(self, results: Sequence[ChunkResult]) -> None:
        if not results:
            return
        first, last = results[0].chunk, results[-1].chunk
        name = f"chunks-{first:07d}-{last:07d}.npz"
        failed = [(r.chunk, f) for r in results for f in r.failed]
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                chunks=np.array([r.chunk for r in results], dtype=np.int64),
                chunk_of=np.concatenate([np.full(len(r.indices), r.chunk, dtype=np.int64) for r in results]),
                indices=np.concatenate([r.indices for r in results]).astype(np.int64),
                probs=np.concatenate([r.probs.reshape(len(r.indices), -1) for r in results]).astype(np.float32),
                failed_chunk=np.array([c for c, _ in failed], dtype=np.int64),
                failed_index=np.array([x.index for _, x in failed], dtype=np.int64),
                failed_path=np.array([x.path for _, x in failed], dtype=str),
                failed_reason=np.array([x.reason for _, x in failed], dtype=str),
            )
        os.replace(tmp, self.dir / name)

    def load(self, wanted: set[int]) -> dict[int, ChunkResult]:
        """The flushed chunks among ``wanted``."""
        out: dict[int, ChunkResult] = {}
        for part in sorted(self.dir.glob("chunks-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as z:
                    chunks, chunk_of = z["chunks"], z["chunk_of"]
                    for c in chunks.tolist():
                        if c not in wanted:
                            continue
                        rows = chunk_of == c
                        frows = z["failed_chunk"] == c
                        out[c] = ChunkResult(
                            c,
                            z["indices"][rows],
                            z["probs"][rows],
                            [
                                Failed(int(i), str(p), str(r))
                                for i, p, r in zip(
                                    z["failed_index"][frows], z["failed_path"][frows], z["failed_reason"][frows]
                                )
                            ],
                        )
            except (OSError, ValueError, KeyError) as e:
                raise VerydeepError(
                    f"{part}: unreadable part of an earlier run ({e}); delete it to recompute its chunks"
                ) from None
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


#: Keys of the run state that must match for a resumed run to give the same numbers.
_STRICT = ("protocol", "images", "ids_sha1", "labels_sha1", "batch_size", "max_batch", "model", "precision")


def check_same_run(saved: dict[str, Any], state: dict[str, Any], where: str) -> None:
    for key in _STRICT:
        if saved.get(key) != state.get(key):
            raise VerydeepError(
                f"{where}: cannot resume: {key} was {json.dumps(saved.get(key))}, now {json.dumps(state.get(key))}; "
                "run with the same options, or delete the partial results to start over"
            )


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the parameters (shapes and a sample of values)."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:256].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _sha1(values: Sequence[Any]) -> str:
    return hashlib.sha1("\n".join(map(str, values)).encode()).hexdigest()


# -- the run -------------------------------------------------------------------------------------------
def chunks_of(n: int, batch_size: int) -> list[list[int]]:
    """The fixed batches of a run: ``batch_size`` consecutive images each."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def evaluate(
    model: nn.Module,
    data: EvalSet,
    protocol: Protocol | str = "dense",
    *,
    device: str | None = None,
    precision: str = "fp32",
    forward: Forward | None = None,
    dense_forward: Forward | None = None,
    batch_size: int = 32,
    max_batch: int = 128,
    workers: int | None = None,
    scores: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: float = 60.0,
    progress: bool = True,
    ctx: distributed.Context | None = None,
    run_info: dict[str, Any] | None = None,
) -> EvalResult | None:
    """Evaluate ``model`` on ``data`` under ``protocol``; see the module docstring.

    ``scores``: write per-image soft-max outputs there (.npz), flushing partial results to
    ``<scores>.parts/`` every ``checkpoint_every`` seconds so ``resume=True`` can continue a
    killed run. Under torchrun, ranks share the chunks and rank 0 returns (and writes) the
    merged result; other ranks return None.
    """
    started = time.perf_counter()
    protocol = Protocol.make(protocol) if isinstance(protocol, str) else protocol
    ctx = ctx if ctx is not None else distributed.init(device)
    device = distributed.device_for(ctx, device)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes:
        check_labels(data, num_classes)
    if resume and scores is None:
        raise VerydeepError("--resume needs --scores OUT.npz (where the partial results are kept)")
    if batch_size < 1:
        raise VerydeepError(f"batch size must be positive, found {batch_size}")

    chunks = chunks_of(len(data), batch_size)
    mine = list(distributed.shard(len(chunks), ctx))
    state = {
        "protocol": protocol.to_dict(),
        "images": len(data),
        "ids_sha1": _sha1(data.ids),
        "labels_sha1": _sha1(data.labels) if data.labels is not None else None,
        "batch_size": batch_size,
        "max_batch": max_batch,
        "model": model_fingerprint(model),
        "precision": precision,
        "device_type": torch.device(device).type,
    }
    state = json.loads(json.dumps(state))  # as it reads back from state.json (tuples -> lists)
    run = dict(run_info or {})
    run.update({"layout": data.layout, "root": str(data.root), "set_images": len(data), "precision": precision})
    run["protocol_text"] = protocol.describe()

    # Partial results: decide (identically on every rank) before anyone writes.
    store = PartStore(Path(scores)) if scores is not None else None
    done: dict[int, ChunkResult] = {}
    if store is not None:
        had_parts = store.exists()
        if had_parts and not resume:
            raise VerydeepError(
                f"{store.dir}: partial results of an earlier run; pass --resume to continue it, or delete it"
            )
        if resume and not had_parts and Path(scores).exists():  # already complete: report it
            distributed.barrier(ctx)
            return _finished(Path(scores), state, ctx)
        if had_parts:
            store.check_state(state)
        distributed.barrier(ctx)
        if ctx.is_main and not had_parts:
            store.create(state)
        distributed.barrier(ctx)
        done = store.load(set(mine)) if had_parts else {}

    model = model.to(device).eval()
    fwd, dense_fwd = forwards(model, protocol, precision, forward, dense_forward, device)
    scorer = Scorer(protocol, fwd, dense_fwd, device, max_batch)
    todo = [c for c in mine if c not in done]
    dataset = ImageDataset(data.paths, RescaleToScales(protocol.scales, protocol.interpolation))
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    dl = DataLoader(
        dataset,
        batch_sampler=[chunks[c] for c in todo],
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    labels = np.asarray(data.labels, dtype=np.int64) if data.labels is not None else None
    bar = _progress_bar(sum(len(chunks[c]) for c in todo), progress and ctx.is_main, protocol)
    pending: list[ChunkResult] = []
    new: list[ChunkResult] = []
    last_flush = time.monotonic()
    hits = np.zeros(3, dtype=np.int64)  # images, top-1, top-5 (this rank, this session)
    computed = 0
    try:
        for n_chunk, (c, (indices, items, failed)) in enumerate(zip(todo, dl), start=1):
            probs = scorer(items).numpy() if indices else np.zeros((0, num_classes), dtype=np.float32)
            result = ChunkResult(c, np.asarray(indices, dtype=np.int64), probs.astype(np.float32), list(failed))
            pending.append(result)
            new.append(result)
            computed += len(indices)
            if labels is not None and len(indices):
                hits += [
                    len(indices),
                    topk_correct(probs, labels[indices], 1).sum(),
                    topk_correct(probs, labels[indices], 5).sum(),
                ]
            if store is not None and time.monotonic() - last_flush >= checkpoint_every:
                store.write(pending)
                pending, last_flush = [], time.monotonic()
            if bar is not None:
                bar.update(len(chunks[c]))
                if hits[0]:
                    bar.set_postfix(
                        top1_err=f"{100 - 100 * hits[1] / hits[0]:.2f}%",
                        top5_err=f"{100 - 100 * hits[2] / hits[0]:.2f}%",
                        refresh=False,
                    )
            if exit_after and n_chunk >= exit_after:
                os._exit(75)  # test hook: a kill without flushing or cleanup
        if store is not None:
            store.write(pending)
    finally:
        if bar is not None:
            bar.close()

    mine_results = [done[c] for c in mine if c in done] + new
    gathered = distributed.gather_objects((mine_results, computed), ctx)
    if not ctx.is_main:
        return None
    by_chunk = {r.chunk: r for results, _ in gathered or [] for r in results}
    missing = [c for c in range(len(chunks)) if c not in by_chunk]
    if missing:
        first = chunks[missing[0]]
        raise VerydeepError(
            f"results of chunk {missing[0]} (images {first[0]}..{first[-1]}) are missing; "
            "with several hosts, --scores must be on a filesystem they all share"
        )
    result = _merge([by_chunk[c] for c in range(len(chunks))], data, protocol, num_classes, run)
    result.wall_s = time.perf_counter() - started
    result.computed = sum(n for _, n in gathered or [])
    if store is not None:
        save_scores(result, scores)  # type: ignore[arg-type]
        store.remove()
    return result


def _merge(
    ordered: list[ChunkResult], data: EvalSet, protocol: Protocol, num_classes: int, run: dict[str, Any]
) -> EvalResult:
    """Chunk results in chunk order -> one result in the set's order."""
    indices = np.concatenate([r.indices for r in ordered] or [np.zeros(0, np.int64)]).astype(np.int64)
    width = next((r.probs.shape[1] for r in ordered if len(r.indices)), num_classes)
    probs = np.concatenate(
        [r.probs.reshape(len(r.indices), width) for r in ordered] or [np.zeros((0, width), np.float32)]
    )
    labels = np.asarray(data.labels, dtype=np.int64)[indices] if data.labels is not None else None
    return EvalResult(
        protocol=protocol.to_dict(),
        ids=[data.ids[i] for i in indices],
        probs=probs.astype(np.float32),
        labels=labels,
        failed=[{"id": data.ids[f.index], "path": f.path, "reason": f.reason} for r in ordered for f in r.failed],
        run=run,
    )


def _finished(path: Path, state: dict[str, Any], ctx: distributed.Context) -> EvalResult | None:
    """``--resume`` of a run whose scores file is complete: report it without recomputing."""
    if not ctx.is_main:
        return None
    result = load_scores(path)
    saved_protocol = json.loads(json.dumps(result.protocol))
    if saved_protocol != state["protocol"]:
        raise VerydeepError(
            f"{path}: cannot resume: it holds protocol {json.dumps(saved_protocol)}, now {json.dumps(state['protocol'])}"
        )
    return result


def _progress_bar(total: int, enabled: bool, protocol: Protocol) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=protocol.describe(), dynamic_ncols=True, smoothing=0.05)
