"""``verydeep train``: the paper's training recipe as one job, on a CPU, a GPU or many hosts.

One optimiser step consumes one global batch (256 by default) however it is split: over
``torchrun`` ranks (DDP) and, within a rank, over micro-batches whose gradients accumulate.
Each micro-batch's summed loss is scaled by ranks / global batch, so the step's gradient is
the mean over the global batch for any split (see :mod:`verydeep.train_data` for why the
images of a step do not depend on the split either).

A run lives in one folder (RUN_DIR): ``config.toml`` (effective options), ``checkpoints/``,
``metrics.jsonl`` (or ``.csv``), ``tensorboard/``, ``init.txt`` (where each layer's
parameters came from), ``skipped.txt`` (unreadable images), ``model.safetensors`` (the final
weights with the class names) and ``curves.png``. ``resume=True`` continues from the newest
checkpoint to the same final weights as an uninterrupted run: the shuffle order is a
function of (seed, epoch), each image's augmentation of (seed, epoch, index), and dropout's
random numbers are re-seeded from (seed, epoch, step, rank) at every step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from verydeep.configs import LRN_DEFAULTS
from verydeep.core import distributed
from verydeep.data.augment import TrainTransform, ValTransform, to_input
from verydeep.data.training import (
    ImageFolder,
    LabelledImages,
    accumulation,
    default_workers,
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
from verydeep.train.initialization import format_rows, init_from, initialize, table_rows
from verydeep.train.run_log import MetricsLog
from verydeep.train.schedule import Plateau, apply_lr

PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_FILE = "model.safetensors"
#: Test hook: ``VERYDEEP_TRAIN_KILL_AT_STEP=N`` makes every rank SIGKILL itself right after
#: optimiser step N (and the mid-epoch checkpoint that step may write), so a test can kill a
#: run at a known point inside an epoch. Unset, it costs nothing.
KILL_AT_ENV = "VERYDEEP_TRAIN_KILL_AT_STEP"


@dataclass
class TrainResult:
    """What a run produced (also written to RUN_DIR/summary.json)."""

    run_dir: str
    weights: str
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


def prepare_config(
    config_file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None, resume: bool = False
) -> TrainConfig:
    """The effective configuration: defaults < config file < ``overrides``; with ``resume``,
    the run's saved configuration, where only options in ``RESUMABLE`` may change."""
    overrides = dict(overrides or {})
    if not resume:
        return tc.load(config_file, overrides)
    requested = {**(tc.read_toml(config_file) if config_file else {}), **overrides}
    out = requested.get("out")
    if not out:
        raise VerydeepError("--resume needs --out RUN_DIR (the run to continue)")
    saved_file = Path(out) / "config.toml"
    if not saved_file.exists():
        raise VerydeepError(f"{saved_file}: not found; {out} is not a verydeep train run (or it never started)")
    saved = tc.merge(tc.read_toml(saved_file), origin=str(saved_file))
    changed = tc.changed_on_resume(saved, requested)
    if changed:
        name = changed[0]
        raise VerydeepError(
            f"--resume: option {name} is {getattr(saved, name)!r} in {saved_file}, found {requested[name]!r}; "
            f"only {', '.join(sorted(tc.RESUMABLE))} may change when resuming"
        )
    return tc.merge({k: v for k, v in requested.items() if k in tc.RESUMABLE}, base=saved).validate()


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or with ``resume``, continue) a training job; returns its result on every rank."""
    job = Trainer(config, resume=resume, log=log)
    try:
        return job.run()
    finally:
        job.close()


def _seed_of(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    """One training run; ``run()`` executes it. Attributes are the job's state."""

    def __init__(self, config: TrainConfig, resume: bool = False, log: Callable[[str], None] | None = None):
        self.cfg = config.validate()
        self.ctx = distributed.init(config.device)
        self.device = torch.device(distributed.device_for(self.ctx, config.device))
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self.bar: Any = None
        self.metrics: MetricsLog | None = None
        self._set_determinism()
        try:
            self._set_up(config, resume)
        except BaseException:  # leave no process group, open file or changed torch flag behind
            self.close()
            raise

    def _set_up(self, config: TrainConfig, resume: bool) -> None:
        self.run_dir = self._run_dir(resume)
        self.ckpt_dir = self.run_dir / "checkpoints"
        latest = self._latest_checkpoint(resume)

        # data
        self.train_set = scan_image_folder(self._required("data"))
        classes = self.train_set.classes
        self.val_set: ImageFolder | None = scan_image_folder(config.val, classes) if config.val else None
        if config.num_classes is not None and config.num_classes != len(classes):
            raise VerydeepError(
                f"num_classes: {config.num_classes} given, but {self.train_set.root} has {len(classes)} class folders"
            )
        self.n_train = len(self.train_set)
        self.steps_per_epoch = steps_per_epoch(self.n_train, config.batch_size)
        if self.steps_per_epoch == 0:
            raise VerydeepError(
                f"{self.train_set.root}: {self.n_train} images, fewer than one batch of {config.batch_size}; lower --batch-size"
            )
        self.micro, self.accum = accumulation(config.batch_size, config.micro_batch, self.ctx.world_size)
        self.workers = default_workers() if config.workers is None else config.workers

        # model, optimiser, schedule
        self.model = self._build_model(latest)
        self.cfg = tc.merge(
            {"arch": self.model.config, "width": self.model.width, "num_classes": self.model.num_classes}, base=self.cfg
        )
        self.frozen = frozen_layers(self.model, config.freeze_through)
        freeze(self.model, self.frozen)
        self.model.drop6.p = self.model.drop7.p = config.dropout
        self.channels_last = config.channels_last == "on" or (
            config.channels_last == "auto" and self.device.type == "cuda"
        )
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, config.lr_mult),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.plateau = Plateau(config.lr_factor, config.plateau_patience, config.max_lr_drops, config.plateau_threshold)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.images_seen, self.train_time, self.elapsed_before = 0, 0.0, 0.0
        self.last_val: dict[str, float] | None = None
        self.skipped: dict[str, str] = {}  # path -> reason
        self.window = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, n
        self.resumed_from: str | None = None
        self._kill_at = int(os.environ.get(KILL_AT_ENV, "0") or 0)
        if latest is not None:
            self._restore(*latest)
        apply_lr(self.optimizer, config.lr * self.plateau.scale)

        # execution wrappers
        self.net: torch.nn.Module = self.model
        if config.compile:
            self.model.compile()
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids, gradient_as_bucket_view=True)

        if self.ctx.is_main:
            tc.save_toml(self.cfg, self.run_dir / "config.toml")
            self.metrics = MetricsLog(
                self.run_dir,
                config.metrics_format,
                config.tensorboard,
                resume_step=self.global_step if latest else None,
            )
        distributed.barrier(self.ctx)

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
        self._saved_flags = (
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
        )  # fmt: skip
        if self.cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _run_dir(self, resume: bool) -> Path:
        out = self.cfg.out
        if out is None:
            out = str(Path("runs") / f"{self.cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}")
            out = _broadcast(out, self.ctx)
        run_dir = Path(out)
        if self.ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.ctx)
        self.cfg = tc.absolute_paths(tc.merge({"out": str(run_dir)}, base=self.cfg))
        return run_dir.resolve()

    def _latest_checkpoint(self, resume: bool) -> tuple[Path, dict] | None:
        existing = checkpoint.list_checkpoints(self.ckpt_dir)
        if not resume:
            if existing:
                raise VerydeepError(
                    f"{self.run_dir}: holds checkpoints of an earlier run; pass --resume to continue it or choose another --out"
                )
            return None
        if self.ctx.is_main:
            checkpoint.clean_temporary(self.ckpt_dir)
        found = checkpoint.load_latest(self.ckpt_dir, warn=self.say)
        if found is None:
            self.say(f"{self.run_dir}: no checkpoint yet; starting from the beginning")
        return found

    def _build_model(self, latest: tuple[Path, dict] | None) -> VGG:
        cfg, classes = self.cfg, self.train_set.classes
        torch.manual_seed(_seed_of(cfg.seed, 0xC0FFEE))
        if latest is not None:  # the checkpoint holds every parameter: no download, no init
            state = latest[1]
            lrn_k = state.get("lrn_k", LRN_DEFAULTS["k"])  # A-LRN's k (from a fine-tuned caffemodel)
            model = VGG(cfg.arch, len(classes), cfg.width, lrn_k=lrn_k, class_names=state["class_names"])
            model.load_state_dict(state["model"])
            return model
        if cfg.weights is not None:
            from verydeep.hub.weights import load

            source = load(cfg.weights, cfg.prototxt)
            for name in ("arch", "width"):
                if name in self._explicit and getattr(cfg, name) != getattr(
                    source, "config" if name == "arch" else name, None
                ):
                    found = source.config if name == "arch" else source.width
                    raise VerydeepError(
                        f"{cfg.weights}: {name} is {found!r}, but {name} {getattr(cfg, name)!r} was asked for"
                    )
            model, report = fine_tune_model(source, classes, cfg.weights, cfg.init, cfg.init_std)
            self.say(report)
            rows = table_rows(model, {}, f"copied from {cfg.weights}")
            if "replaced" in report:
                rows = [r if r.layer != "fc8" else type(r)(r.layer, r.shape, f"new, random ({cfg.init})") for r in rows]
        else:
            model = VGG(cfg.arch, len(classes), cfg.width, class_names=classes)
            if cfg.init in ("glorot", "normal"):
                initialize(model, cfg.init, cfg.init_std)
                rows = table_rows(model, {}, f"random ({cfg.init})")
            else:
                from verydeep.hub.weights import load

                source = load(cfg.init)
                if not isinstance(source, VGG):
                    raise VerydeepError(f"{cfg.init}: --init needs a Table 1 VGG, found a {type(source).__name__}")
                rows = init_from(model, source, cfg.init, cfg.init_layers, "glorot", cfg.init_std)
                self.say(f"initialised from {cfg.init}:\n{format_rows(rows)}")
        if self.ctx.is_main:
            (self.run_dir / "init.txt").write_text(format_rows(rows) + "\n")
        return model

    @property
    def _explicit(self) -> set[str]:
        """Options the user set (arch/width checks against --weights need this)."""
        defaults = TrainConfig()
        return {k for k in ("arch", "width") if getattr(self.cfg, k) != getattr(defaults, k)}

    def _restore(self, path: Path, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.plateau.load_state_dict(state["plateau"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.images_seen, self.train_time = state["images_seen"], state["train_time"]
        self.elapsed_before = state["elapsed_s"]
        self.last_val = state["last_val"]
        self.skipped = dict(state["skipped"])
        self.window = torch.tensor(state["window"], dtype=torch.float64, device=self.device)
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

    # -- the run -----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self._describe()
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_steps, initial=self.global_step, unit="step", desc="train", file=sys.stderr,
            dynamic_ncols=True, disable=not (self.ctx.is_main and cfg.progress), mininterval=1.0,
        )  # fmt: skip
        validated = True
        while self.epoch < cfg.epochs and self.global_step < self.total_steps:
            finished = self._train_epoch()
            validated = False
            if not finished:  # stopped by max_steps inside the epoch
                break
            self._end_of_epoch()
            validated = True
        if not validated and self.val_set is not None:
            self.last_val = self._validate()
            self._log_val()
        if self.global_step > 0 and not validated:
            self._save_checkpoint()
        self.bar.close()
        self.bar = None
        return self._finish()

    def _describe(self) -> None:
        cfg = self.cfg
        lo, hi = cfg.scale_range
        scale = f"S={lo}" if lo == hi else f"S in [{lo}, {hi}]"
        self.say(
            f"training VGG-{self.model.config} (width {self.model.width:g}, {self.model.num_classes} classes) on "
            f"{self.n_train} images, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
            f"batch {cfg.batch_size} = {self.ctx.world_size} rank(s) x {self.accum} x {self.micro}; {scale}, "
            f"Q={cfg.test_scale}; {self.device}, {cfg.precision}; run folder {self.run_dir}"
        )
        if self.frozen:
            self.say(f"frozen: {', '.join(self.frozen)}")
        if self.val_set is None:
            self.say(
                f"note: no --val; the learning rate stays at {cfg.lr * self.plateau.scale:g} (it drops only on a validation plateau)"
            )

    def _train_epoch(self) -> bool:
        """Steps ``step_in_epoch..`` of ``epoch``; False if max_steps stopped it early."""
        cfg = self.cfg
        transform = TrainTransform(cfg.scale_range, cfg.crop, cfg.flip, cfg.lighting_std, cfg.seed)
        batches = micro_batches(
            self.n_train, cfg.batch_size, self.micro, self.ctx, cfg.seed, self.epoch, self.step_in_epoch
        )
        loader = make_loader(
            LabelledImages(self.train_set, transform), batches, cfg.crop, self.workers, self.device.type == "cuda"
        )
        self.net.train()
        # Times are wall-clock between points where the device has finished its queued work
        # (a log waits for the loss sums), so CUDA's asynchrony cannot inflate images/s;
        # checkpoint writing is left out of both the windows and train_time.
        epoch_start = window_start = time.perf_counter()
        it = iter(loader)
        while self.step_in_epoch < self.steps_per_epoch:
            if self.global_step >= self.total_steps:
                if self.global_step % cfg.log_every:  # stopped between logs: record the partial window
                    self._log_train(window_start)
                self.train_time += time.perf_counter() - epoch_start
                return False
            torch.manual_seed(_seed_of(cfg.seed, self.epoch, self.step_in_epoch, self.ctx.rank))  # dropout
            self._step([next(it) for _ in range(self.accum)])
            self.step_in_epoch += 1
            self.global_step += 1
            self.bar.update(1)
            end = self.step_in_epoch == self.steps_per_epoch
            if self.global_step % cfg.log_every == 0 or end:
                self._log_train(window_start)
                window_start = time.perf_counter()
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and not end:
                self._sync()
                pause = time.perf_counter()
                self._save_checkpoint()
                pause = time.perf_counter() - pause
                epoch_start += pause
                window_start += pause
            if self.global_step == self._kill_at:
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        self.train_time += time.perf_counter() - epoch_start
        return True

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, micro: list) -> None:
        """One optimiser step over the global batch (this rank's micro-batches)."""
        cfg = self.cfg
        scale = self.ctx.world_size / cfg.batch_size
        dtype = PRECISION[cfg.precision]
        n_local = 0
        for j, batch in enumerate(micro):
            self._note_failures(batch.failed)
            sync = j == len(micro) - 1
            ctx = self.net.no_sync() if (self.ctx.distributed and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    if len(batch):
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
                            self.window += torch.stack(
                                [
                                    loss_sum.detach().double(),
                                    correct.double(),
                                    torch.tensor(float(len(batch)), dtype=torch.float64, device=self.device),
                                ]
                            )
                        loss = loss_sum * scale
                    else:  # every image of this micro-batch was unreadable: a zero-gradient pass keeps DDP in step
                        x = torch.zeros(1, 3, cfg.crop, cfg.crop, device=self.device)
                        loss = self.net(x).float().sum() * 0.0
                self.scaler.scale(loss).backward()
            n_local += len(batch)
        self._rescale_for_skipped(n_local)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.images_seen += cfg.batch_size  # nominal (all ranks); skipped images are reported separately

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

    def _note_failures(self, failed: list) -> None:
        for f in failed:
            if f.path not in self.skipped:
                self.skipped[f.path] = f.reason
                msg = f"skipped unreadable image {f.path}: {f.reason}"
                if self.bar is not None and self.ctx.is_main:
                    self.bar.write(msg, file=sys.stderr)
                else:
                    print(f"[rank {self.ctx.rank}] {msg}", file=sys.stderr)

    @property
    def lr(self) -> float:
        return self.cfg.lr * self.plateau.scale

    def _log_train(self, window_start: float) -> None:
        w = distributed.all_reduce_sum(self.window.clone(), self.ctx).tolist()  # waits for the device
        seconds = time.perf_counter() - window_start
        self.window.zero_()
        loss, correct, n = w
        record = {
            "kind": "train",
            "step": self.global_step,
            "epoch": round(self.global_step / self.steps_per_epoch, 6),
            "loss": loss / n if n else None,
            "top1": correct / n if n else None,
            "lr": self.lr,
            "images_per_s": n / seconds if seconds > 0 else None,
            "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.t0, 3),
        }
        if self.metrics is not None:
            self.metrics.write(record)
        if self.bar is not None and n:
            self.bar.set_postfix(
                epoch=self.epoch + 1,
                loss=f"{loss / n:.4f}",
                lr=f"{self.lr:.2g}",
                img_s=f"{n / seconds:.0f}",
                refresh=False,
            )

    def _end_of_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        if self.val_set is not None:
            self.last_val = self._validate()
            dropped = self.plateau.step(self.last_val["top1"])
            self._log_val()
            if dropped:
                apply_lr(self.optimizer, self.lr)
                self.say(
                    f"epoch {self.epoch}: validation top-1 stopped improving; learning rate now {self.lr:g} (drop {self.plateau.drops} of {self.plateau.max_drops})"
                )
        self._save_checkpoint()

    def _log_val(self) -> None:
        v = self.last_val
        record = {"kind": "val", "step": self.global_step, "epoch": round(self.global_step / self.steps_per_epoch, 6), **v, "lr": self.lr,
                  "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.t0, 3)}  # fmt: skip
        if self.metrics is not None:
            self.metrics.write(record)
        self.say(
            f"epoch {record['epoch']:g}: val loss {v['loss']:.4f}  top-1 {100 * v['top1']:.2f}%  top-5 {100 * v['top5']:.2f}%  ({int(v['images'])} images)"
        )

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 of the central Q-crops of the validation set (all ranks)."""
        cfg, model = self.cfg, self.model
        dtype = PRECISION[cfg.precision]
        dataset = LabelledImages(self.val_set, ValTransform(cfg.test_scale, cfg.crop))
        loader = make_loader(
            dataset,
            val_batches(len(self.val_set), self.micro, self.ctx),
            cfg.crop,
            self.workers,
            self.device.type == "cuda",
        )
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, top1, top5, n
        k = min(5, model.num_classes)
        model.eval()
        for batch in loader:
            self._note_failures(batch.failed)
            if not len(batch):
                continue
            x = to_input(batch.crops.to(self.device), batch.shifts.to(self.device), self.channels_last)
            labels = batch.labels.to(self.device)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x).float()
            topk = logits.topk(k, dim=1).indices
            hit = topk == labels[:, None]
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), hit[:, 0].sum().double(),
                                 hit.any(1).sum().double(), torch.tensor(float(len(batch)), dtype=torch.float64, device=self.device)])  # fmt: skip
        model.train()
        loss, top1, top5, n = distributed.all_reduce_sum(sums, self.ctx).tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "images": n}

    def _gather_skipped(self) -> dict[str, str]:
        parts = distributed.gather_objects(self.skipped, self.ctx)
        merged: dict[str, str] = {}
        for part in parts or []:
            merged.update(part)
        return merged

    def _save_checkpoint(self) -> None:
        skipped = self._gather_skipped()  # collective: every rank calls it
        if self.ctx.is_main:
            self.skipped = skipped
            state = {
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
                "skipped": sorted(skipped.items()),
                "window": self.window.tolist(),
                "rng": checkpoint.rng_state(),
                "class_names": list(self.model.class_names or []),
                "lrn_k": self.model.lrn_k,
                "train_size": self.n_train,
                "config": self.cfg.to_dict(),
            }
            checkpoint.save(self.ckpt_dir, self.global_step, state, keep=self.cfg.keep_checkpoints)
            self._write_skipped()
        distributed.barrier(self.ctx)

    def _write_skipped(self) -> None:
        path = self.run_dir / "skipped.txt"
        if self.skipped:
            path.write_text("".join(f"{p}\t{r}\n" for p, r in sorted(self.skipped.items())))

    def _finish(self) -> TrainResult:
        self.skipped = self._gather_skipped()
        elapsed = self.elapsed_before + time.perf_counter() - self.t0
        weights = self.run_dir / WEIGHTS_FILE
        curves = None
        if self.ctx.is_main:
            from verydeep.hub.weights import save_safetensors

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
            curves = self._curves()
        result = TrainResult(
            run_dir=str(self.run_dir),
            weights=str(weights),
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
        )
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
            self.say(f"weights: {weights}")
        distributed.barrier(self.ctx)
        return result

    def _curves(self) -> Path | None:
        from verydeep.train.curves import plot_run  # matplotlib is a dependency

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
        deterministic, warn_only, benchmark, matmul_tf32, cudnn_tf32 = self._saved_flags
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
        distributed.finish(self.ctx)


def _broadcast(obj: Any, ctx: distributed.Context) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
