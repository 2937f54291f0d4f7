"""The paper's learning-rate schedule: divide by 10 when validation accuracy stops improving.

"The learning rate was initially set to 10^-2, and then decreased by a factor of 10 when the
validation set accuracy stopped improving. In total, the learning rate was decreased 3 times."
The state is a few numbers, saved in every checkpoint so a resumed run drops at the same epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Plateau:
    """The rule's state: the best validation top-1 so far, how long since, how many drops.

    Mutable on purpose: :meth:`step` advances it once per validation."""

    factor: float = 0.1
    patience: int = 3  # validations without a new best before a drop
    max_drops: int = 3
    threshold: float = 0.0  # a new best must beat the old by more than this
    best: float = float("-inf")
    bad: int = 0  # validations since the last best (or the last drop)
    drops: int = 0

    @property
    def scale(self) -> float:
        """Current LR / initial LR."""
        return self.factor**self.drops

    def step(self, top1: float, *, hold: bool = False) -> bool:
        """Record one validation top-1; True when the LR drops now. With ``hold`` (warm-up, or a
        net at chance level) it may set a new best but does not count towards a drop."""
        if top1 > self.best + self.threshold:
            self.best, self.bad = top1, 0
            return False
        if hold:
            return False
        self.bad += 1
        if self.bad >= self.patience and self.drops < self.max_drops:
            self.drops += 1
            self.bad = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to ``lr`` times its ``lr_mult`` (Caffe's per-layer multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
