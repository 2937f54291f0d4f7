"""Loss, accuracy and learning-rate curves of a run as a PNG (matplotlib, no display needed).

Uses matplotlib's object API with the Agg canvas, not pyplot, so it never touches a GUI
backend or global figure state (safe in workers, servers and tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from verydeep.errors import VerydeepError
from verydeep.train.run_log import read_metrics


def series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` in the records of ``kind``."""
    pts = [(r["epoch"], r[key]) for r in records if r.get("kind") == kind and key in r and "epoch" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """A matplotlib Figure with three panels: loss, accuracy (%), learning rate."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    panels = [
        (loss_ax, "loss", 1.0, [("train", "loss", "train"), ("val", "loss", "val")]),
        (acc_ax, "accuracy (%)", 100.0, [("train", "top1", "train top-1"), ("val", "top1", "val top-1"), ("val", "top5", "val top-5")]),
        (lr_ax, "learning rate", 1.0, [("train", "lr", "lr")]),
    ]  # fmt: skip
    for ax, ylabel, factor, lines in panels:
        for kind, key, label in lines:
            x, y = series(records, kind, key)
            if x:
                ax.plot(x, [v * factor for v in y], marker="o" if kind == "val" else None, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    if any(series(records, "train", "lr")[1]):
        lr_ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    return fig


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
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
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out
