"""``verydeep train``: the paper's training recipe (Sec. 3.1) as one resumable job, from one
CPU to many GPUs under torchrun.

- :mod:`.trainer`: the loop. :func:`train` runs a job, :func:`prepare_config` builds its
  options (or a resumed run's), :class:`Trainer` orchestrates set-up, epochs, validation,
  checkpoints and the final outputs; :class:`TrainResult` is what a run returns.
- :mod:`.config`: :class:`TrainConfig`, every option with the paper's defaults, and its TOML
  reading and writing (``RUN_DIR/config.toml``).
- :mod:`.schedule`: the LR rule, divide by 10 when validation top-1 stops improving
  (:class:`Plateau`).
- :mod:`.watchdog`: the rules that stop a diverged or dead run, and the advice its message
  gives (:class:`TrainingStopped` is what :func:`train` raises then).
- :mod:`.checkpoint`: checkpoints that survive SIGKILL, and the random generators' states.
- :mod:`.run_log`: the metrics file (JSONL or CSV) and TensorBoard events (:class:`MetricsLog`).
- :mod:`.curves`: the loss/accuracy/LR curves PNG (:func:`plot_run`, ``verydeep plot``).
- :mod:`.initialization`: the paper's initialisations and the default (balanced: He's
  fan-in variance, scaled for Caffe-space input), copying layers from a trained shallower net (:func:`init_from`), and
  :func:`activation_scales`, the per-layer RMS an initialisation gives.
- :mod:`.finetune`: a new fc8 for the user's classes, frozen layers, Caffe's ``lr_mult``.

The split follows what a reader looks for: the recipe's rules (schedule, initialisation,
fine-tuning, divergence) are small modules of their own, each testable without a run; what a run writes
(config, checkpoints, metrics, curves) is one module per file kind; the trainer only ties
them together.
"""

from verydeep.train.checkpoint import list_checkpoints, load_latest
from verydeep.train.config import RESUMABLE, TrainConfig
from verydeep.train.curves import figure, plot_run
from verydeep.train.finetune import fine_tune_model, freeze, frozen_layers, param_groups, parse_lr_mult
from verydeep.train.initialization import InitRow, activation_scales, copy_layers, format_rows, init_from, initialize
from verydeep.train.run_log import MetricsLog, read_metrics
from verydeep.train.schedule import Plateau, apply_lr
from verydeep.train.trainer import (
    KILL_AT_ENV,
    PRECISION,
    WEIGHTS_FILE,
    Trainer,
    TrainingStopped,
    TrainResult,
    prepare_config,
    train,
)
from verydeep.train.watchdog import LabelStats, Watchdog, label_stats

__all__ = [
    "KILL_AT_ENV",
    "PRECISION",
    "RESUMABLE",
    "WEIGHTS_FILE",
    "InitRow",
    "LabelStats",
    "MetricsLog",
    "Plateau",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingStopped",
    "Watchdog",
    "activation_scales",
    "apply_lr",
    "copy_layers",
    "figure",
    "fine_tune_model",
    "format_rows",
    "freeze",
    "frozen_layers",
    "init_from",
    "initialize",
    "label_stats",
    "list_checkpoints",
    "load_latest",
    "param_groups",
    "parse_lr_mult",
    "plot_run",
    "prepare_config",
    "read_metrics",
    "train",
]
