"""What a run produces: per-image soft-max outputs, their errors, the scores file, fusion, CSV.

Scores files are .npz (``verydeep-scores-1``): soft-max rows, labels, image ids, the skipped
images and a JSON ``meta`` (protocol, run, metrics), so runs can be fused later
(:func:`combine`, the paper's multi-crop & dense and multi-net results) without the images.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError

SCORES_FORMAT = "verydeep-scores-1"


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
    meta = {"format": SCORES_FORMAT, "protocol": result.protocol, "run": result.run, "metrics": result.metrics()}
    labels = result.labels if result.labels is not None else np.full(result.images, -1, dtype=np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
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
    return Path(path)


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
    result: EvalResult, path: str | os.PathLike, class_names: Sequence[str] | None = None, *, k: int = 5
) -> Path:
    """A CSV with each image's top-``k`` classes and probabilities (and label when known)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
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
    return Path(path)
