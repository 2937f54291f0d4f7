"""Loss, accuracy, learning-rate and gradient-norm curves of a run as a PNG (matplotlib, no
display needed).

Uses matplotlib's object API with the Agg canvas, not pyplot, so it never touches a GUI
backend or global figure state (safe in workers, servers and tests). A run that diverged shows
where it stopped (a dashed line and the reason); a panel with nothing finite to draw says so
instead of staying blank.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError
from verydeep.train.run_log import read_metrics

#: The panels, left to right: y label, the factor values are drawn at (accuracy in %), and
#: whether the axis is logarithmic (the LR falls by factors of 10; gradient norms span decades).
PANELS = (("loss", 1.0, False), ("accuracy (%)", 100.0, False), ("learning rate", 1.0, True),
          ("gradient norm", 1.0, True))  # fmt: skip
#: The lines: (panel, record kind, key, legend label); within a panel, in matplotlib's colour order.
LINES = (
    ("loss", "train", "loss", "train"),
    ("loss", "val", "loss", "val"),
    ("accuracy (%)", "train", "top1", "train top-1"),
    ("accuracy (%)", "val", "top1", "val top-1"),
    ("accuracy (%)", "val", "top5", "val top-5"),
    ("learning rate", "train", "lr", "lr"),
    ("gradient norm", "train", "grad_norm", "train"),
)
#: A loss axis spanning more than this ratio is drawn logarithmic (an explosion next to ln(C)).
LOG_LOSS_RANGE = 100.0
#: What a "stop" record's reason means, for the label of its marker.
STOP_LABELS = {
    "nonfinite": "stopped: loss NaN/inf",
    "start": "stopped: first loss far above chance",
    "exploded": "stopped: loss exploded",
    "dead": "stopped: dead net (at chance)",
}


def series(records: list[dict[str, Any]], *, kind: str, key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` in the records of ``kind``."""
    pts = [(r["epoch"], r[key]) for r in records if r.get("kind") == kind and key in r and "epoch" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """A matplotlib Figure with four panels: loss, accuracy (%), learning rate, gradient norm."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    stops = [r for r in records if r.get("kind") == "stop" and "epoch" in r]
    for ax, (ylabel, factor, log) in zip(axes, PANELS):
        values: list[float] = []
        for kind, key, label in (line[1:] for line in LINES if line[0] == ylabel):
            x, y = series(records, kind=kind, key=key)
            if x:
                dots = kind == "val" or len(x) < 3  # a run stopped after a step or two still shows its points
                ax.plot(x, [v * factor for v in y], marker="o" if dots else None, markersize=3, label=label)
                values += y
        positive = [v for v in values if v > 0]
        if positive and (log or (ylabel == "loss" and max(positive) > LOG_LOSS_RANGE * min(positive))):
            ax.set_yscale("log")
        if not values:
            ax.text(0.5, 0.5, "no finite values logged", transform=ax.transAxes, ha="center", va="center")
        for stop in stops:
            ax.axvline(stop["epoch"], color="red", linestyle="--", linewidth=1,
                       label=STOP_LABELS.get(stop.get("reason", ""), "stopped"))  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw a run's (or a metrics file's) curves to ``out`` (default RUN_DIR/curves.png)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    run = Path(run)
    try:
        records = read_metrics(run)
    except FileNotFoundError:
        raise VerydeepError(f"{run}: no metrics.jsonl or metrics.csv (is it a verydeep train run folder?)") from None
    if not records:
        raise VerydeepError(f"{run}: the metrics file holds no records yet")
    folder = run if run.is_dir() else run.parent
    out = Path(out) if out is not None else folder / "curves.png"
    if not out.parent.is_dir():
        raise VerydeepError(f"{out}: folder {out.parent} does not exist (create it, or choose another -o)")
    fig = figure(records, title=folder.name)
    FigureCanvasAgg(fig)
    try:
        with atomic_path(out) as tmp:  # the temporary name ends in .png too
            fig.savefig(tmp, format="png")
    except OSError as e:
        raise VerydeepError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    return out
