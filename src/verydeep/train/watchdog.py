"""The rules that stop a run which diverged or died, and the advice its one-line message gives.

A net can fail in two ways that the loss shows. It *diverges*: the loss becomes NaN or
infinite, or climbs far above where it started (too high a learning rate, or weights that blow
the inputs up). Or it *dies*: every ReLU of some layer stays off, the output no longer depends
on the image, and the net predicts the label frequencies; its loss is then the entropy of the
labels (ln(C) for C balanced classes) and its top-1 that of a constant guess. A dead net is not
on a plateau, and dropping its learning rate cannot revive it, so the run stops instead.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from verydeep.train.config import INIT_SCHEMES, TrainConfig, linear_scaling_lr

#: A loss this many times above max(the first step's loss, the labels' entropy) has exploded:
#: the net then gives the true class a probability below C^-10 on average.
EXPLODED_FACTOR = 10.0
#: An epoch's mean training loss within this fraction of the labels' entropy is "at ln(C)".
AT_CHANCE_RTOL = 0.01
#: Training top-1 within this many binomial standard deviations of a constant guess is "at chance".
AT_CHANCE_SIGMAS = 3.0
#: A net is called dead after whole epochs at chance (past warm-up) adding up to at least this
#: many steps: one epoch of ImageNet, several of a small set. Measured on the digits (44 steps
#: an epoch): VGG-A at --lr 0.01 without warm-up sat at chance for its first epoch, then learned.
DEAD_MIN_STEPS = 150


@dataclass(frozen=True)
class LabelStats:
    """What a net that ignores its input achieves on the training labels."""

    classes: int
    entropy: float  # nats: the loss of the best constant guess (ln(C) for balanced classes)
    chance_top1: float  # the largest class's share: the top-1 of a constant guess


def label_stats(labels: Iterable[int], classes: int) -> LabelStats:
    counts = Counter(labels)
    n = sum(counts.values())
    entropy = -sum(c / n * math.log(c / n) for c in counts.values() if c)
    return LabelStats(classes=classes, entropy=entropy, chance_top1=max(counts.values()) / n)


@dataclass(frozen=True)
class Stop:
    """Why a run must stop: ``kind`` picks the advice, ``what`` says what happened."""

    kind: str  # "nonfinite" | "start" | "exploded" | "dead"
    what: str


class Watchdog:
    """Applies the rules to the numbers the trainer logs anyway (no extra device syncs).

    Mutable on purpose: it remembers the first step's loss (saved in checkpoints)."""

    def __init__(self, labels: LabelStats, *, enabled: bool = True) -> None:
        self.labels = labels
        self.enabled = enabled
        self.start_loss: float | None = None
        self.chance_epochs = 0  # consecutive epochs past warm-up at chance, and their steps
        self.chance_steps = 0

    @property
    def reference(self) -> float:
        return max(self.start_loss or 0.0, self.labels.entropy)

    def first_step(self, loss: float) -> Stop | None:
        """The first step's mean loss; far above chance means the initial weights are wrong."""
        self.start_loss = loss
        if not math.isfinite(loss):
            return Stop("nonfinite", f"the first step's loss is {loss}")
        if self.enabled and loss > EXPLODED_FACTOR * self.labels.entropy:
            return Stop(
                "start",
                f"the first step's loss is {loss:.3g}, over {EXPLODED_FACTOR:g}x the chance level "
                f"{self.labels.entropy:.3g} (ln({self.labels.classes}) for balanced classes): "
                "the initial weights blow the inputs up",
            )
        return None

    def window(self, *, loss: float | None, nonfinite: int, first_bad: int | None) -> Stop | None:
        """A log window: its mean loss over the finite micro-batches, how many were not finite."""
        if nonfinite:
            at = f", the first at step {first_bad}" if first_bad is not None else ""
            return Stop(
                "nonfinite", f"the loss became NaN or infinite ({nonfinite} non-finite losses or gradients{at})"
            )
        if self.enabled and loss is not None and loss > EXPLODED_FACTOR * self.reference:
            return Stop(
                "exploded",
                f"the loss rose to {loss:.3g}, over {EXPLODED_FACTOR:g}x where it started ({self.reference:.3g})",
            )
        return None

    def at_chance(self, *, loss: float, top1: float, images: float) -> bool:
        """An epoch's training loss at the labels' entropy and its top-1 at a constant guess's."""
        h, p = self.labels.entropy, self.labels.chance_top1
        sigma = math.sqrt(p * (1 - p) / max(images, 1.0))
        return abs(loss - h) <= AT_CHANCE_RTOL * h and top1 <= p + AT_CHANCE_SIGMAS * sigma

    def epoch(self, *, loss: float, top1: float, images: float, steps: int) -> Stop | None:
        """A whole epoch past warm-up; whole epochs at chance adding up to DEAD_MIN_STEPS: dead."""
        if not self.at_chance(loss=loss, top1=top1, images=images):
            self.chance_epochs = self.chance_steps = 0
            return None
        self.chance_epochs += 1
        self.chance_steps += steps
        if not self.enabled or self.chance_steps < DEAD_MIN_STEPS:
            return None
        return Stop(
            "dead",
            f"the net is dead: {self.chance_epochs} whole epoch(s) ({self.chance_steps} steps) after warm-up at "
            f"chance level (training top-1 {100 * top1:.1f}%, a constant guess gets "
            f"{100 * self.labels.chance_top1:.1f}%; loss {loss:.4f}, the labels' entropy is "
            f"{self.labels.entropy:.4f} = ln({self.labels.classes}) for balanced classes)",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"start_loss": self.start_loss, "chance_epochs": self.chance_epochs, "chance_steps": self.chance_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start_loss = state.get("start_loss")
        self.chance_epochs = state.get("chance_epochs", 0)
        self.chance_steps = state.get("chance_steps", 0)


def advice(config: TrainConfig, kind: str) -> str:
    """What to try, as option values for this run's configuration (most likely cure first)."""
    lr, rule = config.base_lr, linear_scaling_lr(config.batch_size)
    if config.lr is not None and config.lr > rule:
        lower = f"--lr {rule:.3g} (the rule for batch {config.batch_size}; this run: {lr:g})"
    else:
        lower = f"--lr {lr / 10:.3g} (this run: {lr:.3g})"
    warm = (
        "--warmup 1 (this run: none)"
        if config.warmup == 0
        else f"--warmup {2 * config.warmup:g} (this run: {config.warmup:g} epoch(s))"
    )
    if config.init == "balanced":
        init = "--init RUN/model.safetensors of a trained shallower net (the paper's way for deep nets)"
    elif config.init in INIT_SCHEMES:
        init = f"--init balanced (this run: {config.init})"
    else:
        init = "--init balanced"
    clip = [] if config.clip_grad_norm is not None else ["--clip-grad-norm 10 (see grad_norm in the metrics)"]
    order = {
        "start": [init, lower],
        "nonfinite": [lower, warm, *clip, init],
        "exploded": [lower, warm, *clip, init],
        "dead": [lower, warm, init],
    }[kind]
    return ", ".join(order[:-1]) + " or " + order[-1]
