"""Loss, accuracy and learning-rate curves of a run as a PNG (matplotlib, no display needed).

Uses matplotlib's object API with the Agg canvas, not pyplot, so it never touches a GUI
backend or global figure state (safe in workers, servers and tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from verydeep.core.atomic import atomic_path
from verydeep.errors import VerydeepError
from verydeep.train.run_log import read_metrics

#: The panels, left to right: y label and the factor values are drawn at (accuracy in %).
PANELS = (("loss", 1.0), ("accuracy (%)", 100.0), ("learning rate", 1.0))
#: The lines: (panel, record kind, key, legend label); within a panel, in matplotlib's colour order.
LINES = (
    ("loss", "train", "loss", "train"),
    ("loss", "val", "loss", "val"),
    ("accuracy (%)", "train", "top1", "train top-1"),
    ("accuracy (%)", "val", "top1", "val top-1"),
    ("accuracy (%)", "val", "top5", "val top-5"),
    ("learning rate", "train", "lr", "lr"),
)


def series(records: list[dict[str, Any]], *, kind: str, key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` in the records of ``kind``."""
    pts = [(r["epoch"], r[key]) for r in records if r.get("kind") == kind and key in r and "epoch" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """A matplotlib Figure with three panels: loss, accuracy (%), learning rate."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (ylabel, factor) in zip(axes, PANELS):
        for kind, key, label in (line[1:] for line in LINES if line[0] == ylabel):
            x, y = series(records, kind=kind, key=key)
            if x:
                ax.plot(x, [v * factor for v in y], marker="o" if kind == "val" else None, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if any(series(records, kind="train", key="lr")[1]):
        axes[-1].set_yscale("log")  # the learning rate falls by factors of 10
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
    fig = figure(records, title=folder.name)
    FigureCanvasAgg(fig)
    with atomic_path(out) as tmp:  # the temporary name ends in .png too
        fig.savefig(tmp, format="png")
    return out
