"""Explanations as pictures: an overlay PNG per image, a contact sheet and an HTML index.

matplotlib's object API on the Agg canvas (no pyplot, no GUI backend, no global figure state);
every file goes through :mod:`verydeep.core.atomic`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verydeep.core.atomic import atomic_path, write_text

#: Colour map of the heat maps, and the overlay's opacity over the photo where the map is at its
#: top (it fades out with the map's square root, so the photo stays visible where the map is low).
CMAP, ALPHA = "jet", 0.6
#: A map is scaled for display so that this percentile of its values reaches the top colour
#: (gradients have a few extreme pixels that would otherwise darken everything else).
PERCENTILE = 99.5
#: Maps drawn on an absolute 0..1 scale (probabilities) rather than scaled per image.
ABSOLUTE = ("score-map",)
#: The contact sheet shows at most this many images (the HTML index lists all).
SHEET_MAX, SHEET_COLUMNS = 48, 6


@dataclass(frozen=True)
class Panel:
    """One picture's content: the photo (H x W x 3 uint8 RGB, what the net saw), the raw map
    (H x W, or 3 x H x W BGR for the guided methods; None: the picture alone), and its caption."""

    photo: np.ndarray
    raw: np.ndarray | None
    method: str
    caption: str


def heat(raw: np.ndarray, method: str) -> np.ndarray:
    """H x W values in 0..1 for the colour map: a 3-channel map by its largest |channel|."""
    m = np.abs(raw).max(axis=0) if raw.ndim == 3 else np.asarray(raw, np.float64)
    if method in ABSOLUTE:
        return np.clip(m, 0.0, 1.0)
    top = float(np.percentile(m, PERCENTILE)) if m.size else 0.0
    top = top if top > 0 else float(m.max()) if m.size and m.max() > 0 else 1.0
    return np.clip(m / top, 0.0, 1.0)


def overlay(values: np.ndarray) -> np.ndarray:
    """H x W values in 0..1 -> H x W x 4 RGBA: the colour map, opaque where the values are high."""
    from matplotlib import colormaps

    rgba = colormaps[CMAP](values)
    rgba[..., 3] = ALPHA * np.sqrt(values)
    return rgba


def gradient_image(raw: np.ndarray) -> np.ndarray:
    """A 3 x H x W BGR gradient as an H x W x 3 RGB picture: grey is zero, the percentile scale
    reaches black and white (the way guided backpropagation's figures show it)."""
    g = raw[::-1].transpose(1, 2, 0)  # BGR -> RGB, channels last
    top = float(np.percentile(np.abs(g), PERCENTILE)) or float(np.abs(g).max()) or 1.0
    return np.clip(0.5 + 0.5 * g / top, 0.0, 1.0)


def _label(ax: Any, text: str) -> None:
    ax.text(
        0.02,
        0.98,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=9,
        color="white",
        bbox={"facecolor": "black", "alpha": 0.65, "pad": 3, "edgecolor": "none"},
    )


def _draw_overlay(ax: Any, panel: Panel) -> None:
    ax.imshow(panel.photo)
    if panel.raw is not None:
        ax.imshow(overlay(heat(panel.raw, panel.method)))
    ax.set_axis_off()


def _save(fig: Any, out: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(out) as tmp:  # the temporary name ends in .png too
        fig.savefig(tmp, format="png")
    return Path(out)


def save_overlay(panel: Panel, out: str | os.PathLike[str]) -> Path:
    """Two panels: the map over the photo with the caption drawn in, and the map alone (a heat
    map, or the gradient as a picture for the guided methods)."""
    from matplotlib.figure import Figure

    if panel.raw is None:
        raise ValueError("save_overlay needs a map")
    h, w = panel.photo.shape[:2]
    fig = Figure(figsize=(2 * 4.0 * w / max(h, w) + 0.2, 4.0 * h / max(h, w) + 0.2), dpi=100)
    left, right = fig.subplots(
        1, 2, gridspec_kw={"wspace": 0.03, "left": 0.01, "right": 0.99, "top": 0.99, "bottom": 0.01}
    )
    _draw_overlay(left, panel)
    _label(left, panel.caption)
    if panel.raw.ndim == 3:
        right.imshow(gradient_image(panel.raw))
    else:
        right.imshow(heat(panel.raw, panel.method), cmap=CMAP, vmin=0.0, vmax=1.0)
    right.set_axis_off()
    _label(right, panel.method)
    return _save(fig, out)


def save_picture(image: np.ndarray, out: str | os.PathLike[str], caption: str) -> Path:
    """A class model image: as computed (mean pixel added back), and its departures from its mean
    colour scaled up (the same factor for all channels, so the hues stay) for the eye."""
    from matplotlib.figure import Figure

    centred = image.astype(np.float64) - image.mean(axis=(0, 1))
    top = float(np.percentile(np.abs(centred), PERCENTILE)) or 1.0
    stretched = np.clip(0.5 + 0.5 * centred / top, 0.0, 1.0)
    fig = Figure(figsize=(8.2, 4.2), dpi=100)
    left, right = fig.subplots(
        1, 2, gridspec_kw={"wspace": 0.03, "left": 0.01, "right": 0.99, "top": 0.99, "bottom": 0.01}
    )
    for ax, picture, text in ((left, image, caption), (right, stretched, "contrast stretched")):
        ax.imshow(picture)
        ax.set_axis_off()
        _label(ax, text)
    return _save(fig, out)


def save_sheet(panels: Sequence[Panel], out: str | os.PathLike[str], title: str, *, total: int = 0) -> Path:
    """A grid of the first :data:`SHEET_MAX` overlays with their captions (of ``total`` items)."""
    from matplotlib.figure import Figure

    shown = list(panels[:SHEET_MAX])
    cols = max(1, min(SHEET_COLUMNS, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.4), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, panel in zip(axes, shown):
        _draw_overlay(ax, panel)
        ax.set_title(panel.caption, fontsize=7)
    total = max(total, len(panels))
    more = f" (first {len(shown)} of {total})" if total > len(shown) else ""
    fig.suptitle(title + more, fontsize=10)
    return _save(fig, out)


def save_index(rows: Sequence[dict[str, str]], out: str | os.PathLike[str], title: str) -> Path:
    """A static HTML page: per image its picture (relative link), source and caption."""
    cells = "\n".join(
        f'<figure><a href="{html.escape(r["png"])}"><img src="{html.escape(r["png"])}" loading="lazy"></a>'
        f"<figcaption>{html.escape(r['caption'])}<br><small>{html.escape(r['source'])}</small></figcaption></figure>"
        for r in rows
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}}figure{{display:inline-block;margin:.5em;width:420px;vertical-align:top}}
img{{width:100%}}figcaption{{font-size:90%}}</style></head>
<body><h1>{html.escape(title)}</h1>
{cells}
</body></html>
"""
    return write_text(out, page)
