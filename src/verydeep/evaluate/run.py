"""One evaluation run: its fixed chunks, this rank's share of them, resuming, scoring, merging.

A run is a fixed list of *chunks* (``batch_size`` consecutive images). Ranks take contiguous
runs of chunks, and each chunk's result goes to the run's :class:`~verydeep.core.store.ChunkStore`
(``<scores>.parts/``) as soon as it is flushed, so a run can be killed, resumed, or split across
ranks and still compute every image in exactly the same batch as an uninterrupted
single-process run: the final scores are bit-identical on the same device. Images are decoded
and rescaled in DataLoader workers; crops and the BGR/mean conversion happen on the device.

:func:`evaluate` is three steps, each its own function: the run's state and stored chunks
(:func:`run_state`, :func:`read_chunks`), the loop over this rank's missing chunks
(:func:`score_chunks`), and the merge of every rank's chunks into one result (:func:`merge_chunks`).
A run with ``scores`` holds ``<scores>.lock`` throughout (:func:`verydeep.core.store.output_lock`):
a second run on the same scores file refuses at once. Stored chunks are checked to be this
run's (every image a row or a failure) before they are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from verydeep.core import distributed
from verydeep.core.defaults import default_workers
from verydeep.core.store import ChunkStore, check_same_run, model_fingerprint, output_lock
from verydeep.data.eval_set import EvalSet, check_labels, fit_classes
from verydeep.data.images import Failed, ImageDataset, collate_skipping, failed_from_json, failed_to_json
from verydeep.errors import VerydeepError
from verydeep.evaluate.protocols import Protocol
from verydeep.evaluate.results import EvalResult, load_scores, save_scores, topk_correct
from verydeep.evaluate.scoring import Forward, RescaleToScales, Scorer, forwards

#: Test hook: exit abruptly (no flush, no cleanup) after this many chunks, to test --resume.
EXIT_AFTER_ENV = "VERYDEEP_EVALUATE_EXIT_AFTER"
#: Keys of the run state that a resumed run may change: they do not change its numbers.
RECORDED_ONLY = ("device_type",)
#: The run state's keys as users know them (the flags that set them; see check_same_run).
OPTIONS = {"batch_size": "--batch-size", "max_batch": "--max-batch", "precision": "--precision"}


@dataclass(frozen=True)
class ChunkResult:
    """The outcome of one chunk: soft-max rows of its readable images, and its failures."""

    chunk: int
    indices: np.ndarray  # int64, positions in the set
    probs: np.ndarray  # float32, one row per index
    failed: tuple[Failed, ...]


# -- the run's state --------------------------------------------------------------------------------
def chunks_of(n: int, batch_size: int) -> list[list[int]]:
    """The fixed batches of a run: ``batch_size`` consecutive images each."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def run_state(
    model: nn.Module,
    data: EvalSet,
    protocol: Protocol,
    *,
    batch_size: int,
    max_batch: int,
    precision: str,
    device: str,
) -> dict[str, Any]:
    """What the run computes: a resumed run must match all of it but :data:`RECORDED_ONLY`."""
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
    return json.loads(json.dumps(state))  # as it reads back from the store (tuples -> lists)


def parts_store(scores: str | os.PathLike[str]) -> ChunkStore:
    """Where a run writing ``scores`` keeps its partial results: ``<scores>.parts/``."""
    scores = Path(scores)
    return ChunkStore(
        scores.with_name(scores.name + ".parts"),
        manifest="state.json",
        prefix="chunks",
        name=str(scores),
        options=OPTIONS,
    )


def write_chunks(store: ChunkStore, results: Sequence[ChunkResult]) -> None:
    for r in results:
        store.write(
            r.chunk,
            {
                "indices": r.indices.astype(np.int64),
                "probs": r.probs.astype(np.float32),
                "failed": np.asarray(failed_to_json(r.failed)),
            },
        )


def read_chunks(
    store: ChunkStore, wanted: set[int], chunks: Sequence[Sequence[int]], num_classes: int = 0
) -> dict[int, ChunkResult]:
    """The stored chunks among ``wanted``, each checked to be what this run writes for its
    images ``chunks[c]``: every image a row (``num_classes`` finite probabilities, when known)
    or a failure."""
    out = {}
    for c in sorted(wanted & store.done()):
        z = store.read(c, ("indices", "probs", "failed"))
        indices, probs = z["indices"], z["probs"]
        try:
            failed = tuple(failed_from_json(str(z["failed"])))
        except (ValueError, TypeError, RecursionError) as e:
            raise store.refuse(c, f"its list of unreadable images is not JSON records ({type(e).__name__})") from None
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise store.refuse(c, f"its index is {indices.dtype} of shape {indices.shape}, not image numbers")
        if sorted([*indices.tolist(), *(f.index for f in failed)]) != list(chunks[c]):
            raise store.refuse(c, f"its rows and failures are not images {chunks[c][0]}..{chunks[c][-1]}")
        width = probs.shape[-1] if probs.ndim == 2 else -1
        if len(indices) and (
            probs.dtype.kind != "f"
            or probs.shape != (len(indices), width)
            or (num_classes and width != num_classes)
            or not np.isfinite(probs).all()
        ):
            raise store.refuse(
                c, f"its probabilities are {probs.dtype} of shape {probs.shape}, not one finite row per image"
            )
        out[c] = ChunkResult(c, indices, probs, failed)
    return out


# -- the loop -------------------------------------------------------------------------------------------
def score_chunks(
    scorer: Scorer,
    data: EvalSet,
    wanted: Sequence[tuple[int, list[int]]],
    *,
    store: ChunkStore | None,
    workers: int,
    checkpoint_every: float,
    progress: bool,
) -> tuple[list[ChunkResult], int]:
    """Score the chunks ``wanted`` (chunk number, image indices), flushing them to ``store`` every
    ``checkpoint_every`` seconds; returns their results and how many images were computed."""
    protocol = scorer.protocol
    loader = DataLoader(
        ImageDataset(data.paths, RescaleToScales(protocol.scales, protocol.interpolation)),
        batch_sampler=[images for _, images in wanted],
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=scorer.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    labels = np.asarray(data.labels, dtype=np.int64) if data.labels is not None else None
    bar = _Progress(sum(len(images) for _, images in wanted), progress, protocol.describe(), labels)
    scorer.on_progress = bar.advance
    pending: list[ChunkResult] = []
    fresh: list[ChunkResult] = []
    last_flush = time.monotonic()
    try:
        for n_chunk, ((c, images), (indices, items, failed)) in enumerate(zip(wanted, loader), start=1):
            probs = scorer(items).numpy() if indices else np.zeros((0, 0), dtype=np.float32)
            result = ChunkResult(c, np.asarray(indices, dtype=np.int64), probs.astype(np.float32), tuple(failed))
            pending.append(result)
            fresh.append(result)
            if store is not None and time.monotonic() - last_flush >= checkpoint_every:
                write_chunks(store, pending)
                pending, last_flush = [], time.monotonic()
            bar.update(len(images), result)
            if exit_after and n_chunk >= exit_after:
                os._exit(75)  # test hook: a kill without flushing or cleanup
        if store is not None:
            write_chunks(store, pending)
    finally:
        bar.close()
    return fresh, sum(len(r.indices) for r in fresh)


class _Progress:
    """The progress bar, with the running top-1/top-5 error of the images computed so far."""

    def __init__(self, total: int, enabled: bool, desc: str, labels: np.ndarray | None) -> None:
        self.bar: Any = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.05)
        self.labels = labels
        self.hits = np.zeros(3, dtype=np.int64)  # images, top-1, top-5
        self.partial = 0.0  # images' worth of the current chunk already shown

    def advance(self, images: float) -> None:
        """Show work inside a chunk as it is done (the rate is visible from the first pass)."""
        if self.bar is not None:
            self.partial += images
            self.bar.update(images)

    def update(self, images: int, result: ChunkResult) -> None:
        """A chunk is done: its images count whole (unreadable ones too), and the errors update."""
        if self.bar is None:
            return
        images_left, self.partial = images - self.partial, 0.0
        if self.labels is not None and len(result.indices):
            truth = self.labels[result.indices]
            self.hits += [
                len(result.indices),
                topk_correct(result.probs, truth, 1).sum(),
                topk_correct(result.probs, truth, 5).sum(),
            ]
        self.bar.update(images_left)
        if self.hits[0]:
            n, top1, top5 = self.hits
            self.bar.set_postfix(
                top1_err=f"{100 - 100 * top1 / n:.2f}%", top5_err=f"{100 - 100 * top5 / n:.2f}%", refresh=False
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the job ----------------------------------------------------------------------------------------------
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
    scores: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: float = 60.0,
    progress: bool = True,
    ctx: distributed.Context | None = None,
    run_info: dict[str, Any] | None = None,
    calibration: torch.Tensor | None = None,
) -> EvalResult | None:
    """Evaluate ``model`` on ``data`` under ``protocol``; see the module docstring.

    ``precision="int8"`` needs ``calibration`` (Caffe-space images, see ``model.optimized``).

    ``scores``: write per-image soft-max outputs there (.npz), flushing partial results to
    ``<scores>.parts/`` every ``checkpoint_every`` seconds so ``resume=True`` can continue a
    killed run. A finished scores file is reported by ``resume=True`` when it was computed by the
    same run, replaced with ``overwrite=True``, and otherwise left alone (an error). Under
    torchrun, ranks share the chunks and rank 0 returns (and writes) the merged result; other
    ranks return None.
    """
    started = time.perf_counter()
    protocol = Protocol.make(protocol) if isinstance(protocol, str) else protocol
    ctx = ctx if ctx is not None else distributed.init(device)
    device = distributed.device_for(ctx, device)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes:
        data = fit_classes(data, num_classes)
        check_labels(data, num_classes)
    if resume and scores is None:
        raise VerydeepError("--resume needs --scores OUT.npz (where the partial results are kept)")
    if batch_size < 1:
        raise VerydeepError(f"batch size must be positive, found {batch_size}")

    chunks = chunks_of(len(data), batch_size)
    mine = list(distributed.shard(len(chunks), ctx))
    state = run_state(
        model, data, protocol, batch_size=batch_size, max_batch=max_batch, precision=precision, device=device
    )
    # One run per scores file: a second run on it refuses at once (its parts are this run's).
    with output_lock(scores, ctx) if scores is not None else contextlib.nullcontext():
        store = parts_store(scores) if scores is not None else None
        done: dict[int, ChunkResult] = {}
        if store is not None and scores is not None:
            if Path(scores).exists() and not store.exists() and not overwrite:  # a finished run
                if not resume:
                    raise VerydeepError(
                        f"{scores}: exists (a finished run); pass --resume to report it, or --overwrite to recompute it"
                    )
                distributed.barrier(ctx)
                return _finished(Path(scores), state, ctx)
            store.begin(state, resume=resume, overwrite=overwrite, ctx=ctx, adopt=RECORDED_ONLY)
            done = read_chunks(store, set(mine), chunks, num_classes)

        model = model.to(device).eval()
        fwd, dense_fwd = forwards(
            model, protocol, precision=precision, forward=forward, dense_forward=dense_forward, device=device,
            calibration=calibration,
        )  # fmt: skip
        fresh, computed = score_chunks(
            Scorer(protocol, fwd, dense_fwd, device, max_batch=max_batch),
            data,
            [(c, chunks[c]) for c in mine if c not in done],
            store=store,
            workers=default_workers(workers),
            checkpoint_every=checkpoint_every,
            progress=progress and ctx.is_main,
        )

        gathered = distributed.gather_objects(([done[c] for c in mine if c in done] + fresh, computed), ctx)
        if gathered is None:  # not rank 0
            return None
        run = {**(run_info or {}), "layout": data.layout, "root": str(data.root), "set_images": len(data)}
        run.setdefault("precision", precision)  # the caller's report of what was computed wins
        run.update(protocol_text=protocol.describe(), state=state)
        result = merge_chunks(
            [r for results, _ in gathered for r in results], chunks, data, protocol, num_classes=num_classes, run=run
        )
        result.wall_s = time.perf_counter() - started
        result.computed = sum(n for _, n in gathered)
        if store is not None and scores is not None:
            save_scores(result, scores)
            store.remove()
        return result


# -- merging ---------------------------------------------------------------------------------------------
def merge_chunks(
    results: Sequence[ChunkResult],
    chunks: Sequence[Sequence[int]],
    data: EvalSet,
    protocol: Protocol,
    *,
    num_classes: int,
    run: dict[str, Any],
) -> EvalResult:
    """Every rank's chunk results -> one result in the set's order (every chunk is needed)."""
    by_chunk = {r.chunk: r for r in results}
    missing = [c for c in range(len(chunks)) if c not in by_chunk]
    if missing:
        first = chunks[missing[0]]
        raise VerydeepError(
            f"results of chunk {missing[0]} (images {first[0]}..{first[-1]}) are missing; "
            "with several hosts, --scores must be on a filesystem they all share"
        )
    ordered = [by_chunk[c] for c in range(len(chunks))]
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
    saved = result.run.get("state")
    if not isinstance(saved, dict):
        raise VerydeepError(f"{path}: holds no record of the run that wrote it; pass --overwrite to recompute it")
    check_same_run(
        saved, state, where=str(path), adopt=RECORDED_ONLY, remedy="pass --overwrite to recompute it", options=OPTIONS
    )
    return result


def _sha1(values: Sequence[Any]) -> str:
    return hashlib.sha1("\n".join(map(str, values)).encode()).hexdigest()
