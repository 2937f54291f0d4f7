"""``verydeep train``: the paper's training recipe as one job, on a CPU, a GPU or many hosts.

One optimiser step consumes one global batch (256 by default) however it is split: over
``torchrun`` ranks (DDP) and, within a rank, over micro-batches whose gradients accumulate.
Each micro-batch's summed loss is scaled by ranks / global batch, so the step's gradient is
the mean over the global batch for any split (see :mod:`verydeep.data.training` for why the
images of a step do not depend on the split either).

A run lives in one folder (RUN_DIR): ``config.toml`` (effective options), ``checkpoints/``,
``metrics.jsonl`` (or ``.csv``), ``tensorboard/``, ``init.txt`` (where each layer's
parameters came from), ``skipped.txt`` (unreadable images), ``model.safetensors`` (the final
weights with the class names), ``summary.json`` and ``curves.png``. The folder is created only
once every option has been checked, so a mistake leaves nothing behind; ``config.toml`` is its
first file, and ``--resume`` of a run killed before it (or whose config.toml is gone: the newest
checkpoint records the configuration too) still works. ``RUN_DIR.lock`` beside the folder keeps
a second run out of it while one runs.

A run cannot die silently: a non-finite loss, a loss far above where it started, or whole
epochs after warm-up at chance level (training top-1 of a constant guess, loss at the entropy
of the labels, ln(C) for balanced classes; at least 150 steps of them) stops it with one line
saying what happened and what to try (:class:`TrainingStopped`); the checkpoints written
before stay, none is written after, and summary.json says why.

``resume=True`` continues from the newest
checkpoint to the same final weights as an uninterrupted run: the shuffle order is a
function of (seed, epoch), each image's augmentation of (seed, epoch, index), and dropout's
random numbers are re-seeded from (seed, epoch, step, rank) at every step.

:class:`Trainer` orchestrates; its methods are grouped by the job they do (set-up, the
model's first parameters, the epoch loop, one step, metrics, validation, checkpoints, the
end of the run), each section under its banner.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from verydeep.configs import LRN_DEFAULTS
from verydeep.core import distributed
from verydeep.core.atomic import file_in_the_way, make_dirs, remove_stale, write_json, write_text
from verydeep.core.defaults import PRECISIONS, default_workers, dtype_of
from verydeep.core.store import output_lock
from verydeep.data.augment import TrainTransform, ValTransform, to_input
from verydeep.data.images import Failed
from verydeep.data.training import (
    Batch,
    ImageFolder,
    LabelledImages,
    accumulation,
    make_loader,
    micro_batches,
    scan_image_folder,
    steps_per_epoch,
    val_batches,
)
from verydeep.errors import VerydeepError
from verydeep.models.vgg import VGG
from verydeep.train import checkpoint
from verydeep.train import config as tc
from verydeep.train.config import TrainConfig
from verydeep.train.finetune import fine_tune_model, freeze, frozen_layers, param_groups
from verydeep.train.initialization import DEFAULT_SCHEME, InitRow, format_rows, init_from, initialize, table_rows
from verydeep.train.run_log import MetricsLog
from verydeep.train.schedule import Plateau, apply_lr
from verydeep.train.watchdog import Stop, Watchdog, advice, label_stats

#: The autocast dtype of each precision; None (fp32) runs without autocast.
PRECISION: dict[str, torch.dtype | None] = {name: None if name == "fp32" else dtype_of(name) for name in PRECISIONS}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.toml"
#: Test hook: ``VERYDEEP_TRAIN_KILL_AT_STEP=N`` makes every rank SIGKILL itself right after
#: optimiser step N (and the mid-epoch checkpoint that step may write), so a test can kill a
#: run at a known point inside an epoch. Unset, it costs nothing.
KILL_AT_ENV = "VERYDEEP_TRAIN_KILL_AT_STEP"
#: The initialisation schemes that draw random weights (any other ``init`` is a weights file).
RANDOM_INITS = tc.INIT_SCHEMES
#: Where NHWC (channels_last) is the faster layout for training. Measured on a 2-core Ice Lake
#: CPU: VGG-A width 1/8, batch 32, 2 threads, 21 -> 145 images/s; full width 1.0 -> 1.7.
CHANNELS_LAST_AUTO = {"cpu": True, "cuda": True}
#: The slots of the per-window (and per-epoch) sums on the device: the loss of the micro-batches
#: whose loss is finite and their images, correct top-1, all images, non-finite losses or
#: gradients, the finite gradient norms and their steps.
LOSS, LOSS_IMAGES, CORRECT, IMAGES, NONFINITE, GRAD_NORM, STEPS = range(7)


@dataclass(frozen=True)
class TrainResult:
    """What a run produced (also written to RUN_DIR/summary.json)."""

    run_dir: str
    weights: str | None  # None when the run stopped early (diverged): no final weights
    epochs: int  # completed epochs
    steps: int  # optimiser steps
    images: int  # training images consumed (all ranks)
    val: dict[str, float] | None  # last validation: loss, top1, top5
    best_val_top1: float | None
    images_per_s: float  # training throughput over the run (excl. validation)
    elapsed_s: float
    skipped: list[str] = field(default_factory=list)
    curves: str | None = None
    resumed_from: str | None = None
    lr: float | None = None  # the LR after warm-up, before any plateau drop
    stopped: str | None = None  # why the run stopped early (divergence), else None


class TrainingStopped(VerydeepError):
    """The run stopped because it diverged or died; ``result`` is what it wrote (no weights)."""

    def __init__(self, message: str, result: TrainResult) -> None:
        super().__init__(message)
        self.result = result


def prepare_config(
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    resume: bool = False,
) -> TrainConfig:
    """The effective configuration: defaults < config file < ``overrides``; with ``resume``,
    the run's saved configuration, where only options in ``RESUMABLE`` may change."""
    overrides = dict(overrides or {})
    if not resume:
        return tc.load(config_file, overrides)
    requested = {**(tc.read_toml(config_file) if config_file else {}), **overrides}
    out = requested.get("out")
    if not out:
        raise VerydeepError("--resume needs -o RUN_DIR (the run to continue)")
    saved_file = Path(out) / CONFIG_FILE
    origin = saved_file if saved_file.exists() else f"the newest checkpoint in {Path(out) / 'checkpoints'}"
    saved = saved_config(Path(out))
    if saved is None:  # stopped before its first write: nothing to continue, so start it as asked
        return tc.load(config_file, overrides)
    changed = tc.changed_on_resume(saved, requested)
    if changed:
        name = changed[0]
        value = getattr(saved, name)
        shown = "unset (its default)" if value is None else repr(value)
        raise VerydeepError(
            f"--resume: option {name} is {shown} in {origin}, found {requested[name]!r}; "
            f"only {', '.join(sorted(tc.RESUMABLE))} may change when resuming"
        )
    return tc.merge({k: v for k, v in requested.items() if k in tc.RESUMABLE}, base=saved).validate()


def saved_config(run_dir: Path) -> TrainConfig | None:
    """The configuration a run was started with: its config.toml (the run folder's first
    write), else the one its newest checkpoint records (a config.toml deleted since); None for
    a run that never got that far (nothing to continue)."""
    saved_file = run_dir / CONFIG_FILE
    if saved_file.exists():
        return tc.merge(tc.read_toml(saved_file), origin=str(saved_file))
    found = checkpoint.load_latest(run_dir / "checkpoints", warn=lambda msg: None)
    if found is None:
        return None
    path, state = found
    return tc.merge(state.get("config") or {}, origin=str(path))


def train(config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or with ``resume``, continue) a training job; returns its result on every rank.

    Raises :class:`TrainingStopped` (a :class:`VerydeepError`) when the run diverges."""
    job = Trainer(config, resume=resume, log=log)
    try:
        return job.run()
    finally:
        job.close()


class _Diverged(Exception):
    """Raised inside the loop by a divergence rule; :meth:`Trainer.run` turns it into TrainingStopped."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.what)
        self.stop = stop


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (summary.json is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class KernelFlags:
    """torch's process-wide kernel switches that a run sets; saved first so that
    :meth:`Trainer.close` gives the caller back its own."""

    deterministic: bool
    warn_only: bool
    cudnn_benchmark: bool
    matmul_tf32: bool
    cudnn_tf32: bool

    @classmethod
    def current(cls) -> KernelFlags:
        return cls(
            deterministic=torch.are_deterministic_algorithms_enabled(),
            warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32


def _set_dropout(model: VGG, p: float) -> None:
    """Dropout's rate on fc6 and fc7 (the only dropout layers of Table 1's nets)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


class Trainer:
    """One training run; ``run()`` executes it. Attributes are the job's state."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.cfg = config.validate()
        self.ctx = distributed.init(config.device)
        self.device = torch.device(distributed.device_for(self.ctx, config.device))
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self.bar: Any = None
        self.metrics: MetricsLog | None = None
        self._held = contextlib.ExitStack()  # the run folder's lock
        self._saved_flags = KernelFlags.current()
        self._set_determinism()
        try:
            self._set_up(resume)
        except BaseException:  # leave no process group, open file or changed torch flag behind
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------------------
    def _set_up(self, resume: bool) -> None:
        """Every check (data, model, options) first; the run folder is written last."""
        self.run_dir = self._run_dir()
        self._hold_run_dir()
        self.ckpt_dir = self.run_dir / "checkpoints"
        latest = self._latest_checkpoint(resume)
        self._set_up_data()
        self._set_up_model(latest)
        self._set_up_optimiser()
        self._set_up_progress()
        if latest is not None:
            self._restore(*latest)
        apply_lr(self.optimizer, self.lr)
        self._set_up_execution()
        self._open_outputs(resumed=latest is not None)

    def _set_up_data(self) -> None:
        """The training (and validation) ImageFolders, and how a global batch is split."""
        cfg = self.cfg
        self.train_set = scan_image_folder(self._required("data"))
        classes = self.train_set.classes
        self.val_set: ImageFolder | None = scan_image_folder(cfg.val, classes) if cfg.val else None
        if cfg.num_classes is not None and cfg.num_classes != len(classes):
            raise VerydeepError(
                f"num_classes: {cfg.num_classes} given, but {self.train_set.root} has {len(classes)} class folders"
            )
        self.n_train = len(self.train_set)
        self.steps_per_epoch = steps_per_epoch(self.n_train, cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise VerydeepError(
                f"{self.train_set.root}: {self.n_train} images, fewer than one batch of {cfg.batch_size}; "
                "lower --batch-size"
            )
        self.micro, self.accum = accumulation(cfg.batch_size, cfg.micro_batch, self.ctx.world_size)
        self.workers = default_workers(cfg.workers)
        self.labels = label_stats([label for _, label in self.train_set.samples], len(classes))

    def _set_up_model(self, latest: tuple[Path, dict[str, Any]] | None) -> None:
        """The net (from the checkpoint, the weights to fine-tune, or new), frozen layers, dropout, device."""
        cfg = self.cfg
        self.model = self._build_model(latest)
        self.cfg = tc.merge(
            {"arch": self.model.config, "width": self.model.width, "num_classes": self.model.num_classes}, base=cfg
        )
        self.frozen = frozen_layers(self.model, cfg.freeze_through)
        freeze(self.model, self.frozen)
        _set_dropout(self.model, cfg.dropout)
        auto = CHANNELS_LAST_AUTO.get(self.device.type, False)
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and auto)
        self.model.to(self.device)
        self.model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _set_up_optimiser(self) -> None:
        """SGD with momentum and weight decay over the trainable layers, loss scaling, the LR rule."""
        cfg = self.cfg
        self.base_lr = cfg.base_lr
        self.warmup_steps = max(1, round(cfg.warmup * self.steps_per_epoch)) if cfg.warmup > 0 else 0
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, cfg.lr_mult), lr=self.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.plateau = Plateau(cfg.lr_factor, cfg.plateau_patience, cfg.max_lr_drops, cfg.plateau_threshold)
        self.watchdog = Watchdog(self.labels, enabled=cfg.divergence_checks)

    def _set_up_progress(self) -> None:
        """Where the run stands: the counters a checkpoint saves and :meth:`_restore` sets."""
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.images_seen, self.train_time, self.elapsed_before = 0, 0.0, 0.0
        self.last_val: dict[str, float] | None = None
        self.skipped: dict[str, str] = {}  # path -> reason
        self.window = torch.zeros(7, dtype=torch.float64, device=self.device)  # the sums LOSS..STEPS since the last log
        self.epoch_sums = torch.zeros(7, dtype=torch.float64)  # this epoch's logged windows, all ranks
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=self.device)  # first non-finite step
        self.window_start = 0.0  # perf_counter() at the start of the log window
        self.resumed_from: str | None = None
        self._kill_at = int(os.environ.get(KILL_AT_ENV, "0") or 0)

    def _set_up_execution(self) -> None:
        """``torch.compile`` and DDP around the model (``self.net`` is what a step calls)."""
        self.net: nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.cfg.compile:
            self.model.compile()
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
            self.net = self.ddp

    def _open_outputs(self, *, resumed: bool) -> None:
        """RUN_DIR with config.toml (its first file), init.txt and the metrics log, written by rank 0
        before any rank goes on."""
        if self.ctx.is_main:
            make_dirs(self.run_dir)
            tc.save_toml(self.cfg, self.run_dir / CONFIG_FILE)  # first: what --resume continues from
            if self.init_rows is not None:
                write_text(self.run_dir / "init.txt", format_rows(self.init_rows) + "\n")
            self.metrics = MetricsLog(
                self.run_dir,
                self.cfg.metrics_format,
                tensorboard=self.cfg.tensorboard,
                resume_step=self.global_step if resumed else None,
            )
        distributed.barrier(self.ctx)

    def _hold_run_dir(self) -> None:
        """One run per folder: rank 0 holds ``RUN_DIR.lock`` (beside it) until :meth:`close`; a
        second run on the folder refuses at once, naming the process that holds it."""
        self._held.enter_context(output_lock(self.run_dir, self.ctx, remedy="choose another -o"))

    # -- set-up helpers ----------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.ctx.is_main:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                self._log(msg)

    def _required(self, name: str) -> str:
        value = getattr(self.cfg, name)
        if value is None:
            raise VerydeepError(f"{name}: required (--{name.replace('_', '-')} or `{name} = ...` in the config file)")
        return value

    def _set_determinism(self) -> None:
        """Set torch's global kernel flags for this run; :meth:`close` puts the caller's back."""
        if self.cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _run_dir(self) -> Path:
        out = self.cfg.out
        if out is None:
            out = str(Path("runs") / f"{self.cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
            out = distributed.broadcast_object(out, self.ctx)
        run_dir = Path(out)
        if run_dir.exists() and not run_dir.is_dir():
            raise VerydeepError(f"out: {run_dir} is a file; the run folder must be a folder")
        blocker = file_in_the_way(run_dir)
        if blocker is not None:
            raise VerydeepError(f"out: {run_dir}: cannot write: {blocker} is a file, not a folder")
        self.cfg = tc.absolute_paths(tc.merge({"out": str(run_dir)}, base=self.cfg))
        return run_dir.resolve()

    def _latest_checkpoint(self, resume: bool) -> tuple[Path, dict[str, Any]] | None:
        existing = checkpoint.list_checkpoints(self.ckpt_dir)
        if not resume:
            if existing:
                raise VerydeepError(
                    f"{self.run_dir}: holds checkpoints of an earlier run; "
                    "pass --resume to continue it or choose another -o RUN_DIR"
                )
            return None
        with distributed.main_rank_first(self.ctx):  # what a killed write left is gone before any rank reads
            if self.ctx.is_main:
                remove_stale(self.ckpt_dir)
        found = checkpoint.load_latest(self.ckpt_dir, warn=self.say)
        if found is None:
            self.say(f"{self.run_dir}: no checkpoint yet; starting from the beginning")
        return found

    # -- the model's first parameters: a checkpoint, weights to fine-tune, or new -------------
    def _build_model(self, latest: tuple[Path, dict[str, Any]] | None) -> VGG:
        """The net; ``init_rows`` records where each layer came from (None: from the checkpoint)."""
        torch.manual_seed(_seed_of(self.cfg.seed, 0xC0FFEE))
        self.init_rows: list[InitRow] | None = None
        if latest is not None:  # the checkpoint holds every parameter: no download, no init
            return self._model_from_checkpoint(latest[1])
        model, self.init_rows = self._fine_tuned_model() if self.cfg.weights is not None else self._new_model()
        return model

    def _model_from_checkpoint(self, state: dict[str, Any]) -> VGG:
        cfg = self.cfg
        lrn_k = state.get("lrn_k", LRN_DEFAULTS["k"])  # A-LRN's k (from a fine-tuned caffemodel)
        model = VGG(cfg.arch, len(self.train_set.classes), cfg.width, lrn_k=lrn_k, class_names=state["class_names"])
        model.load_state_dict(state["model"])
        return model

    def _load_weights(self, source: str, prototxt: str | None = None) -> nn.Module:
        """A weights file, name or URL; under torchrun rank 0 fetches it into the cache first."""
        from verydeep.hub.loader import load

        with distributed.main_rank_first(self.ctx):
            return load(source, prototxt=prototxt)

    def _fine_tuned_model(self) -> tuple[VGG, list[InitRow]]:
        """``--weights``: every layer copied, fc8 replaced when the classes differ."""
        cfg = self.cfg
        weights = self._required("weights")
        source = self._load_weights(weights, cfg.prototxt)
        found = {"arch": getattr(source, "config", None), "width": getattr(source, "width", None)}
        for name, value in found.items():
            if name in self._explicit and getattr(cfg, name) != value:
                raise VerydeepError(f"{weights}: {name} is {value!r}, but {name} {getattr(cfg, name)!r} was asked for")
        model, report = fine_tune_model(
            source, self.train_set.classes, origin=weights, scheme=cfg.init, std=cfg.init_std
        )
        self.say(report)
        new_fc8 = {"fc8": f"new, random ({cfg.init})"} if "replaced" in report else {}
        return model, table_rows(model, new_fc8, default=f"copied from {weights}")

    def _new_model(self) -> tuple[VGG, list[InitRow]]:
        """A new net: drawn at random, or (``--init FROM``) with the paper's layers of a trained one."""
        cfg, classes = self.cfg, self.train_set.classes
        model = VGG(cfg.arch, len(classes), cfg.width, class_names=classes)
        if cfg.init in RANDOM_INITS:
            initialize(model, cfg.init, std=cfg.init_std)
            return model, table_rows(model, {}, default=f"random ({cfg.init})")
        source = self._load_weights(cfg.init)
        if not isinstance(source, VGG):
            raise VerydeepError(f"{cfg.init}: --init needs a Table 1 VGG, found a {type(source).__name__}")
        rows = init_from(
            model, source, origin=cfg.init, layers=cfg.init_layers, scheme=DEFAULT_SCHEME, std=cfg.init_std
        )
        self.say(f"initialised from {cfg.init}:\n{format_rows(rows)}")
        return model, rows

    @property
    def _explicit(self) -> set[str]:
        """Options the user set (arch/width checks against --weights need this)."""
        defaults = TrainConfig()
        return {k for k in ("arch", "width") if getattr(self.cfg, k) != getattr(defaults, k)}

    # -- resuming ----------------------------------------------------------------------------
    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.plateau.load_state_dict(state["plateau"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.images_seen, self.train_time = state["images_seen"], state["train_time"]
        self.elapsed_before = state["elapsed_s"]
        self.last_val = state["last_val"]
        self.skipped = dict(state["skipped"])
        self.window = torch.tensor(self._own_window(state), dtype=torch.float64, device=self.device)
        if "epoch_sums" in state:
            self.epoch_sums = torch.tensor(state["epoch_sums"], dtype=torch.float64)
        self.watchdog.load_state_dict(state.get("watchdog", {}))
        checkpoint.set_rng_state(state["rng"])
        if state["train_size"] != self.n_train:
            self.say(
                f"warning: the training set had {state['train_size']} images, now {self.n_train}; "
                "the run continues but will not repeat an uninterrupted one"
            )
        self.resumed_from = str(path)
        self.say(
            f"resumed from {path}: epoch {self.epoch + 1}, {self.step_in_epoch} of {self.steps_per_epoch} steps done"
        )

    # -- the run: header, epoch loop ---------------------------------------------------------
    @property
    def total_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def run(self) -> TrainResult:
        self.t0 = time.perf_counter()
        self._describe()
        self.bar = self._progress_bar()
        try:
            at_epoch_end = self._train_epochs()
            if not at_epoch_end:  # max_steps stopped it inside an epoch: validate and save that state too
                if self.val_set is not None:
                    self.last_val = self._validate(self.val_set)
                    self._log_val(self.last_val)
                if self.global_step > 0:
                    self._save_checkpoint()
        except _Diverged as e:
            self.bar.close()
            self.bar = None
            self._stopped(e.stop)
        self.bar.close()
        self.bar = None
        return self._finish()

    def _describe(self) -> None:
        """The run's header: the net, the data, how the batch is split, where it is written."""
        cfg = self.cfg
        lo, hi = cfg.scale_range
        scale = f"S={lo}" if lo == hi else f"S in [{lo}, {hi}]"
        self.say(
            f"training VGG-{self.model.config} (width {self.model.width:g}, {self.model.num_classes} classes) on "
            f"{self.n_train} images, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
            f"batch {cfg.batch_size} = {self.ctx.world_size} rank(s) x {self.accum} x {self.micro}; {scale}, "
            f"Q={cfg.test_scale}; {self.device}, {cfg.precision}; run folder {self.run_dir}"
        )
        self.say(self._lr_header())
        if self.frozen:
            self.say(f"frozen: {', '.join(self.frozen)}")
        if self.val_set is None:
            self.say(
                f"note: no --val; the learning rate stays at {self.base_lr:g} once warmed up "
                "(it drops only on a validation plateau)"
            )

    def _lr_header(self) -> str:
        """The LR, why it has that value, and the warm-up."""
        cfg = self.cfg
        rule = tc.linear_scaling_lr(cfg.batch_size)
        if cfg.lr is None:
            why = (
                f"= {tc.REFERENCE_LR:g} x {cfg.batch_size}/{tc.REFERENCE_BATCH}: the paper's LR for batch "
                f"{tc.REFERENCE_BATCH}, scaled linearly to this batch (--lr sets another)"
            )
        else:
            why = f"(--lr; the linear rule gives {rule:.3g} for batch {cfg.batch_size})"
        if self.warmup_steps:
            warm = (
                f"warm-up: linear over the first {self.warmup_steps} steps ({cfg.warmup:g} epoch(s)) from "
                f"{self.base_lr / self.warmup_steps:.3g} (--warmup 0 turns it off)"
            )
        else:
            warm = "no warm-up"
        clip = f"; gradients clipped to norm {cfg.clip_grad_norm:g}" if cfg.clip_grad_norm is not None else ""
        return f"learning rate {self.base_lr:.4g} {why}; {warm}{clip}"

    def _progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.global_step,
            unit="step",
            desc="train",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (self.ctx.is_main and self.cfg.progress),
            mininterval=1.0,
        )

    def _train_epochs(self) -> bool:
        """Epochs until the last one or max_steps; True if the run stopped at an epoch's end."""
        at_epoch_end = True
        while self.epoch < self.cfg.epochs and self.global_step < self.total_steps:
            at_epoch_end = False
            if not self._train_epoch():  # stopped by max_steps inside the epoch
                break
            self._end_of_epoch()
            at_epoch_end = True
        return at_epoch_end

    def _epoch_loader(self) -> DataLoader:
        """This rank's micro-batches of the rest of ``epoch``, decoded and augmented in workers."""
        cfg = self.cfg
        transform = TrainTransform(
            scale=cfg.scale_range, crop=cfg.crop, flip=cfg.flip, lighting_std=cfg.lighting_std, seed=cfg.seed
        )
        batches = micro_batches(
            self.n_train,
            cfg.batch_size,
            micro=self.micro,
            ctx=self.ctx,
            seed=cfg.seed,
            epoch=self.epoch,
            start_step=self.step_in_epoch,
        )
        return make_loader(
            LabelledImages(self.train_set, transform),
            batches,
            crop=cfg.crop,
            workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self) -> bool:
        """Steps ``step_in_epoch..`` of ``epoch``; False if max_steps stopped it early."""
        cfg = self.cfg
        loader = self._epoch_loader()
        self.net.train()
        # Times are wall-clock between points where the device has finished its queued work
        # (a log waits for the loss sums), so CUDA's asynchrony cannot inflate images/s;
        # checkpoint writing is left out of both the windows and train_time.
        epoch_start = self.window_start = time.perf_counter()
        if self.step_in_epoch == 0:
            self.epoch_sums.zero_()
        it = iter(loader)
        while self.step_in_epoch < self.steps_per_epoch:
            if self.global_step >= self.total_steps:
                if self.global_step % cfg.log_every:  # stopped between logs: record the partial window
                    self._log_train()
                self.train_time += time.perf_counter() - epoch_start
                return False
            torch.manual_seed(_seed_of(cfg.seed, self.epoch, self.step_in_epoch, self.ctx.rank))  # dropout
            if self.global_step < self.warmup_steps:
                apply_lr(self.optimizer, self.lr)
            self._step([next(it) for _ in range(self.accum)])
            self.step_in_epoch += 1
            self.global_step += 1
            if self.watchdog.start_loss is None:
                self._check_first_step()
            self.bar.update(1)
            end = self.step_in_epoch == self.steps_per_epoch
            if self.global_step % cfg.log_every == 0 or end:
                self._log_train()
                self.window_start = time.perf_counter()
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and not end:
                pause = self._timed_checkpoint()
                epoch_start += pause
                self.window_start += pause
            if self.global_step == self._kill_at:
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        self.train_time += time.perf_counter() - epoch_start
        return True

    def _timed_checkpoint(self) -> float:
        """A mid-epoch checkpoint; returns the seconds it took (not counted as training time)."""
        self._sync()
        start = time.perf_counter()
        self._check_window()  # a checkpoint is only written of weights that gave finite losses
        self._save_checkpoint()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one optimiser step ------------------------------------------------------------------
    def _step(self, micro: list[Batch]) -> None:
        """One optimiser step over the global batch (this rank's micro-batches)."""
        scale = self.ctx.world_size / self.cfg.batch_size
        n_local = 0
        for j, batch in enumerate(micro):
            self._note_failures(batch.failed)
            last = j == len(micro) - 1
            # DDP all-reduces the gradients in the last micro-batch's backward pass only.
            no_sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with no_sync:
                self.scaler.scale(self._micro_loss(batch, scale)).backward()
            n_local += len(batch)
        self._rescale_for_skipped(n_local)
        self._gradient_norm()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.images_seen += self.cfg.batch_size  # nominal (all ranks); skipped images are reported separately

    def _gradient_norm(self) -> None:
        """The step's global gradient L2 norm (after unscaling fp16's loss scale), clipped with
        ``clip_grad_norm``, added to the log window; a non-finite one counts as divergence
        except under fp16, where the scaler skips such steps by design."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return
        clip = self.cfg.clip_grad_norm
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        norm = norm.to(torch.float64)
        finite = torch.isfinite(norm)
        self.window[GRAD_NORM] += torch.where(finite, norm, 0.0)
        self.window[STEPS] += finite.double()
        if not self.scaler.is_enabled():
            self._note_nonfinite(~finite)

    def _micro_loss(self, batch: Batch, scale: float) -> torch.Tensor:
        """The micro-batch's summed cross-entropy times ``scale``; adds its loss and hits to the log window."""
        dtype = PRECISION[self.cfg.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if not len(batch):  # every image was unreadable: a zero-gradient pass keeps DDP in step
                x = torch.zeros(1, 3, self.cfg.crop, self.cfg.crop, device=self.device)
                return self.net(x).float().sum() * 0.0
            x = to_input(
                batch.crops.to(self.device, non_blocking=True),
                batch.shifts.to(self.device, non_blocking=True),
                self.channels_last,
            )
            labels = batch.labels.to(self.device, non_blocking=True)
            logits = self.net(x)
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
            with torch.no_grad():
                correct = (logits.argmax(1) == labels).sum()
                loss = loss_sum.detach().double()
                bad = ~torch.isfinite(loss)
                self.window[LOSS] += torch.where(bad, 0.0, loss)
                self.window[LOSS_IMAGES] += torch.where(bad, 0.0, float(len(batch)))
                self.window[CORRECT] += correct.double()
                self.window[IMAGES] += float(len(batch))
                self._note_nonfinite(bad)
            return loss_sum * scale

    def _note_nonfinite(self, bad: torch.Tensor) -> None:
        """Count a non-finite loss or gradient in the window; remember the first step (1-based)."""
        self.window[NONFINITE] += bad.double()
        first = torch.tensor(float(self.global_step + 1), dtype=torch.float64, device=self.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), first, self.first_bad)

    def _count(self, batch: Batch) -> torch.Tensor:
        """The number of images in ``batch``, as a float64 on the device (summed with the losses)."""
        return torch.tensor(float(len(batch)), dtype=torch.float64, device=self.device)

    def _rescale_for_skipped(self, n_local: int) -> None:
        """Gradients were scaled for a full batch; make them the mean over the images that were read."""
        B = self.cfg.batch_size
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not self.ctx.distributed:
            if n_local != B and n_local > 0:
                torch._foreach_mul_(grads, B / n_local)
            return
        count = torch.tensor([float(n_local)], device=self.device)
        distributed.all_reduce_sum(count, self.ctx)
        factor = (B / count.clamp(min=1.0)).squeeze()
        if grads:
            torch._foreach_mul_(grads, factor)

    def _note_failures(self, failed: list[Failed]) -> None:
        for f in failed:
            if f.path not in self.skipped:
                self.skipped[f.path] = f.reason
                msg = f"skipped unreadable image {f.path}: {f.reason}"
                if self.bar is not None and self.ctx.is_main:
                    self.bar.write(msg, file=sys.stderr)
                else:
                    print(f"[rank {self.ctx.rank}] {msg}", file=sys.stderr)

    # -- metrics -----------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The LR of the next step: warm-up, then the plateau rule's drops."""
        return self.lr_at(self.global_step)

    def lr_at(self, step: int) -> float:
        """The LR of step ``step`` (0-based): rising linearly over the warm-up, times the drops so far."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.base_lr * warm * self.plateau.scale

    def _record(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """A metrics record of the current step: its position, ``values``, the time since the start."""
        return {
            "kind": kind,
            "step": self.global_step,
            "epoch": round(self.global_step / self.steps_per_epoch, 6),
            **values,
            "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.t0, 3),
        }

    def _log_train(self) -> None:
        """One train record of the window's sums; then the divergence rules on them."""
        reduced = distributed.all_reduce_sum(self.window.clone(), self.ctx).cpu()  # waits for the device
        seconds = time.perf_counter() - self.window_start
        self.window.zero_()
        self.epoch_sums += reduced
        w = reduced.tolist()
        loss = w[LOSS] / w[LOSS_IMAGES] if w[LOSS_IMAGES] else None  # over the micro-batches with a finite loss
        lr = self.lr_at(self.global_step - 1)  # the LR of the window's last step
        record = self._record(
            "train",
            {
                "loss": loss,
                "top1": w[CORRECT] / w[IMAGES] if w[IMAGES] else None,
                "lr": lr,
                "grad_norm": w[GRAD_NORM] / w[STEPS] if w[STEPS] else None,
                "nonfinite": int(w[NONFINITE]) or None,
                "images_per_s": w[IMAGES] / seconds if seconds > 0 else None,
            },
        )
        if self.metrics is not None:
            self.metrics.write(record)
        if self.bar is not None and loss is not None:
            self.bar.set_postfix(
                epoch=self.epoch + 1,
                loss=f"{loss:.4f}",
                lr=f"{lr:.2g}",
                img_s=f"{w[IMAGES] / seconds:.0f}",
                refresh=False,
            )
        stop = self.watchdog.window(loss=loss, nonfinite=int(w[NONFINITE]), first_bad=self._first_bad())
        if stop is not None:
            raise _Diverged(stop)

    def _first_bad(self) -> int | None:
        """The first step with a non-finite loss or gradient on this rank (None: none here)."""
        step = int(self.first_bad.item())
        return step if step > 0 else None

    def _check_first_step(self) -> None:
        """After step 1: the starting loss (every rank reduces the same window)."""
        w = distributed.all_reduce_sum(self.window.clone(), self.ctx).tolist()
        loss = w[LOSS] / w[LOSS_IMAGES] if w[LOSS_IMAGES] and not w[NONFINITE] else math.inf
        stop = self.watchdog.first_step(loss)
        if stop is not None:
            self._log_train()  # record what step 1 logged
            raise _Diverged(stop)

    def _check_window(self) -> None:
        """Stop if the current window holds a non-finite loss (before a checkpoint is written)."""
        nonfinite = distributed.all_reduce_sum(self.window[NONFINITE : NONFINITE + 1].clone(), self.ctx)
        if float(nonfinite.item()):
            self._log_train()  # raises

    def _log_val(self, v: dict[str, float]) -> None:
        record = self._record("val", {**v, "lr": self.lr})
        if self.metrics is not None:
            self.metrics.write(record)
        self.say(
            f"epoch {record['epoch']:g}: val loss {v['loss']:.4f}  top-1 {100 * v['top1']:.2f}%  "
            f"top-5 {100 * v['top5']:.2f}%  ({int(v['images'])} images)"
        )

    # -- validation and the learning-rate rule -----------------------------------------------
    def _end_of_epoch(self) -> None:
        """Validation, the dead-net rule (epochs after warm-up), the plateau rule, a checkpoint."""
        epoch_start_step = self.global_step - self.steps_per_epoch
        self.epoch += 1
        self.step_in_epoch = 0
        e = self.epoch_sums.tolist()
        loss, top1 = e[LOSS] / max(e[LOSS_IMAGES], 1.0), e[CORRECT] / max(e[IMAGES], 1.0)
        at_chance = self.watchdog.at_chance(loss=loss, top1=top1, images=e[IMAGES])
        after_warmup = epoch_start_step >= self.warmup_steps
        if self.val_set is not None:
            self.last_val = self._validate(self.val_set)
            self._log_val(self.last_val)
        stop = (
            self.watchdog.epoch(loss=loss, top1=top1, images=e[IMAGES], steps=self.steps_per_epoch)
            if after_warmup
            else None
        )
        if stop is not None:
            raise _Diverged(stop)
        if self.last_val is not None and self.val_set is not None:
            # During warm-up, and while the net sits at chance, a validation may set a new best
            # but never counts towards a drop: a lower LR cures neither.
            dropped = self.plateau.step(self.last_val["top1"], hold=not after_warmup or at_chance)
            if dropped:
                apply_lr(self.optimizer, self.lr)
                self.say(
                    f"epoch {self.epoch}: validation top-1 stopped improving; learning rate now {self.lr:g} "
                    f"(drop {self.plateau.drops} of {self.plateau.max_drops})"
                )
        self._save_checkpoint()

    def _val_loader(self, val_set: ImageFolder) -> DataLoader:
        """This rank's share of the central Q-crops of the validation set."""
        cfg = self.cfg
        return make_loader(
            LabelledImages(val_set, ValTransform(scale=cfg.test_scale, crop=cfg.crop)),
            val_batches(len(val_set), self.micro, self.ctx),
            crop=cfg.crop,
            workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )

    @torch.no_grad()
    def _validate(self, val_set: ImageFolder) -> dict[str, float]:
        """Loss, top-1 and top-5 of the central Q-crops of the validation set (all ranks)."""
        model = self.model
        dtype = PRECISION[self.cfg.precision]
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, n
        k = min(5, model.num_classes)
        model.eval()
        for batch in self._val_loader(val_set):
            self._note_failures(batch.failed)
            if not len(batch):
                continue
            x = to_input(batch.crops.to(self.device), batch.shifts.to(self.device), self.channels_last)
            labels = batch.labels.to(self.device)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x).float()
            hit = logits.topk(k, dim=1).indices == labels[:, None]
            loss = F.cross_entropy(logits, labels, reduction="sum")
            sums += torch.stack(
                [loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(), self._count(batch)]
            )
        model.train()
        loss_sum, top1, top5, n = distributed.all_reduce_sum(sums, self.ctx).tolist()
        n = max(n, 1.0)
        return {"loss": loss_sum / n, "top1": top1 / n, "top5": top5 / n, "images": n}

    # -- checkpoints -------------------------------------------------------------------------
    def _own_window(self, state: dict[str, Any]) -> list[float]:
        """This rank's share of the sums not yet logged when the checkpoint was written: its own
        under the same number of ranks, else all of them on rank 0 (each counted once)."""
        windows = state.get("windows") or [state["window"]]
        if len(windows) == self.ctx.world_size:
            mine = list(windows[self.ctx.rank])
        elif self.ctx.is_main:
            mine = [sum(column) for column in zip(*windows)]
        else:
            mine = [0.0] * len(windows[0])
        return mine + [0.0] * (len(self.window) - len(mine))

    def _gather_skipped(self) -> dict[str, str]:
        parts = distributed.gather_objects(self.skipped, self.ctx)
        merged: dict[str, str] = {}
        for part in parts or []:
            merged.update(part)
        return merged

    def _save_checkpoint(self) -> None:
        skipped = self._gather_skipped()  # collective: every rank calls it
        windows = distributed.gather_objects(self.window.tolist(), self.ctx)  # each rank's unlogged sums
        if self.ctx.is_main:
            self.skipped = skipped
            state = self._checkpoint_state()
            state["windows"] = windows
            checkpoint.save(self.ckpt_dir, self.global_step, state, keep=self.cfg.keep_checkpoints)
            self._write_skipped()
        distributed.barrier(self.ctx)

    def _checkpoint_state(self) -> dict[str, Any]:
        """Everything :meth:`_restore` needs to continue bit for bit (weights_only-loadable values)."""
        return {
            "version": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "plateau": self.plateau.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "images_seen": self.images_seen,
            "train_time": self.train_time,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0,
            "last_val": self.last_val,
            "skipped": sorted(self.skipped.items()),
            "window": self.window.tolist(),
            "epoch_sums": self.epoch_sums.tolist(),
            "watchdog": self.watchdog.state_dict(),
            "rng": checkpoint.rng_state(),
            "class_names": list(self.model.class_names or []),
            "lrn_k": self.model.lrn_k,
            "train_size": self.n_train,
            "config": self.cfg.to_dict(),
        }

    def _write_skipped(self) -> None:
        if self.skipped:
            write_text(self.run_dir / "skipped.txt", "".join(f"{p}\t{r}\n" for p, r in sorted(self.skipped.items())))

    # -- the end of the run ------------------------------------------------------------------
    def _stopped(self, stop: Stop) -> NoReturn:
        """The run diverged: record why (metrics, summary.json, curves.png), write no weights and
        no checkpoint, and raise :class:`TrainingStopped` with the one-line message."""
        newest = checkpoint.list_checkpoints(self.ckpt_dir)
        kept = f"the last good checkpoint is {newest[-1]}" if newest else "no checkpoint was written before it"
        message = (
            f"stopped at step {self.global_step} (epoch {self.global_step / self.steps_per_epoch:.3g}): "
            f"{stop.what}; try {advice(self.cfg, stop.kind)}; {kept}"
        )
        if self.metrics is not None:
            self.metrics.write(self._record("stop", {"reason": stop.kind, "lr": self.lr_at(self.global_step - 1)}))
        result = self._finish(stopped=message)
        raise TrainingStopped(message, result)

    def _finish(self, stopped: str | None = None) -> TrainResult:
        self.skipped = self._gather_skipped()
        elapsed = self.elapsed_before + time.perf_counter() - self.t0
        weights = self.run_dir / WEIGHTS_FILE
        curves = self._save_outputs(weights if stopped is None else None) if self.ctx.is_main else None
        result = TrainResult(
            run_dir=str(self.run_dir),
            weights=str(weights) if stopped is None else None,
            epochs=self.epoch,
            steps=self.global_step,
            images=self.images_seen,
            val=self.last_val,
            best_val_top1=self.plateau.best if math.isfinite(self.plateau.best) else None,
            images_per_s=(self.images_seen / self.train_time) if self.train_time > 0 else 0.0,
            elapsed_s=elapsed,
            skipped=sorted(self.skipped),
            curves=str(curves) if curves else None,
            resumed_from=self.resumed_from,
            lr=self.base_lr,
            stopped=stopped,
        )
        if self.ctx.is_main:
            write_json(self.run_dir / "summary.json", _finite(asdict(result)))
            if stopped is None:
                self.say(f"weights: {weights}")
        distributed.barrier(self.ctx)
        return result

    def _save_outputs(self, weights: Path | None) -> Path | None:
        """Rank 0: the final weights (unless the run diverged), skipped.txt, the closed metrics
        log and curves.png (returned)."""
        from verydeep.formats.safetensors import save_safetensors

        if weights is not None:
            self.model.class_names = list(self.train_set.classes)
            save_safetensors(
                self.model, weights, trained_by="verydeep train", epochs=self.epoch, steps=self.global_step
            )
        self._write_skipped()
        if self.skipped:
            self.say(f"{len(self.skipped)} unreadable image(s) skipped; listed in {self.run_dir / 'skipped.txt'}")
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        return self._curves()

    def _curves(self) -> Path | None:
        from verydeep.train.curves import plot_run

        try:
            return plot_run(self.run_dir)
        except (VerydeepError, OSError, ValueError) as e:  # the weights are saved; a plot must not fail the run
            self.say(f"warning: no curves.png ({e}); try `verydeep plot {self.run_dir}`")
            return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        self._held.close()
        self._saved_flags.restore()
        distributed.finish(self.ctx)
