"""Figures: score vs true IoU (IoU-Net Fig. 2) and AP vs IoU threshold. Agg canvas only, never a window.

Each function returns what it drew, read back from the matplotlib artists, so callers and tests can check
that the picture shows the data it was given.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from iouctl.analysis.coco_eval import IOU_THRESHOLDS
from iouctl.analysis.correlation import _as_f64, pearson
from iouctl.fileio import atomic_write

PANEL_INCHES = 4.0
DPI = 100


def new_figure(width_in: float, height_in: float) -> Any:
    # A bare Figure on an Agg canvas: no pyplot global state, no GUI backend, safe in threads and tests.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, out_png: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": keeps the pixel size predictable
    return atomic_write(out_png, buf.getvalue())


def plot_score_vs_iou(
    true_iou: Tensor,
    scores: dict[str, Tensor],
    out_png: str | os.PathLike,
    max_points: int = 20000,
    seed: int = 0,
) -> dict[str, Any]:
    """Side-by-side scatters of each score (y) against the true IoU (x), Pearson r of all N points in the titles.

    Args:
        true_iou (Tensor[N]); scores: {name: Tensor[N]}; out_png: written atomically.
        max_points: above this, the same random subset (seeded) is drawn in every panel; r still uses all N.
    Returns:
        {"path": Path, "size": (width_px, height_px), "index": ndarray[M] rows drawn,
         "panels": {name: {"x": ndarray[M], "y": ndarray[M], "pearson": float, "title": str}}}.
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError("plot_score_vs_iou: scores must be a non-empty dict {name: Tensor[N]}")
    if max_points < 1:
        raise ValueError(f"plot_score_vs_iou: max_points must be >= 1, got {max_points}")
    t = _as_f64(true_iou, "true_iou", None)
    vals = {k: _as_f64(v, k, t.shape[0]) for k, v in scores.items()}
    n = t.shape[0]
    index = np.arange(n)
    if n > max_points:
        index = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
    fig = new_figure(PANEL_INCHES * len(vals), PANEL_INCHES)
    axes = fig.subplots(1, len(vals), squeeze=False)[0]
    panels = {}
    for ax, (name, v) in zip(axes, vals.items()):
        r = pearson(t, v)
        title = f"{name}: Pearson r = {r:.3f}" if not math.isnan(r) else f"{name}: Pearson r = n/a"
        # rasterized: 20k markers stay a bitmap, cheap to draw.
        ax.scatter(t[index], v[index], s=2, alpha=0.3, linewidths=0, rasterized=True)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("IoU with ground truth")
        ax.set_ylabel(name)
        ax.set_title(title, fontsize=10)
        off = np.asarray(ax.collections[0].get_offsets(), dtype=np.float64).reshape(-1, 2)
        panels[name] = {"x": off[:, 0], "y": off[:, 1], "pearson": r, "title": ax.get_title()}
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "index": index, "panels": panels}


def plot_ap_vs_threshold(
    curves: dict[str, list[float]],
    out_png: str | os.PathLike,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> dict[str, Any]:
    """AP against the IoU threshold, one line per arm (e.g. ``evaluate(...)["ap_per_threshold"]``).

    Args:
        curves: {arm: list of len(thresholds) APs in [0, 1]}; -1 (undefined) is drawn as a gap.
    Returns:
        {"path": Path, "size": (width_px, height_px), "lines": {arm: {"x": ndarray, "y": ndarray}}}
        (y as drawn: nan where the input was -1).
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError("plot_ap_vs_threshold: curves must be a non-empty dict {arm: list of APs}")
    x = np.asarray(thresholds, dtype=np.float64)
    # An ablation grid has ~25 arms: the legend goes beside the axes, in as many columns as it needs.
    ncol = math.ceil(len(curves) / 18)
    plot_w = 6.0
    fig = new_figure(plot_w + 1.9 * ncol, 4.0) if len(curves) > 1 else new_figure(plot_w, 4.0)
    ax = fig.subplots()
    lines = {}
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors if len(curves) > 10 else colormaps["tab10"].colors
    styles = ("-", "--", ":", "-.")
    for i, (name, ys) in enumerate(curves.items()):
        y = np.asarray(ys, dtype=np.float64)
        if y.shape != x.shape or not np.isfinite(y).all():
            raise ValueError(
                f"plot_ap_vs_threshold: curve '{name}' must hold {len(x)} finite values (one per IoU threshold), "
                f"got {list(ys)[:12]}"
            )
        y = np.where(y == -1, np.nan, y)
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=name, color=colors[i % len(colors)],
                          linestyle=styles[(i // len(colors)) % len(styles)])
        lines[name] = {
            "x": np.asarray(line.get_xdata(), dtype=np.float64),
            "y": np.asarray(line.get_ydata(), dtype=np.float64),
        }
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP")
    ax.set_xlim(x.min() - 0.02, x.max() + 0.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    width = fig.get_figwidth()
    if len(curves) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=ncol, frameon=False)
    # Fixed margins (inches): tight_layout would shrink the axes to make room for the outside legend.
    fig.subplots_adjust(left=0.8 / width, right=(plot_w - 0.2) / width, bottom=0.13, top=0.95)
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "lines": lines}


def plot_iou_before_after(before: Tensor, after: Tensor, out_png: str | os.PathLike, max_points: int = 20000,
                          seed: int = 0) -> dict[str, Any]:
    """True IoU of each box after a change (y) against before it (x), with the diagonal: points above it improved.

    Args:
        before, after (Tensor[N]) IoUs in [0, 1]; above max_points a seeded random subset is drawn.
    Returns:
        {"path": Path, "size": (width_px, height_px), "x": ndarray[M], "y": ndarray[M], "improved": int, "worse": int}
        (the counts use all N boxes).
    """
    x = _as_f64(before, "before", None)
    y = _as_f64(after, "after", x.shape[0])
    index = np.arange(len(x))
    if len(x) > max_points:
        index = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
    improved, worse = int((y > x).sum()), int((y < x).sum())
    fig = new_figure(PANEL_INCHES + 0.4, PANEL_INCHES)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, zorder=0)
    ax.scatter(x[index], y[index], s=3, alpha=0.4, linewidths=0, rasterized=True)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true IoU before")
    ax.set_ylabel("true IoU after")
    ax.set_title(f"{improved} improved, {worse} worse of {len(x)}", fontsize=10)
    off = np.asarray(ax.collections[0].get_offsets(), dtype=np.float64).reshape(-1, 2)
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "x": off[:, 0], "y": off[:, 1], "improved": improved, "worse": worse}
