"""Figures: score vs true IoU (IoU-Net Fig. 2, as density), AP vs IoU threshold (absolute, or as deltas vs the
baseline), a heat map of dAP per arm x IoU threshold, reliability diagrams and TIDE error bars. Agg canvas only.

Each function returns what it drew, read back from the matplotlib artists, so callers and tests can check
that the picture shows the data it was given.
"""

from __future__ import annotations

import io
import math
import os
import warnings
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
    kind: str = "hexbin",
    gridsize: int = 40,
) -> dict[str, Any]:
    """Side-by-side panels of each score (y) against the true IoU (x), Pearson r of all N points in the titles.

    Args:
        true_iou (Tensor[N]); scores: {name: Tensor[N]}; out_png: written atomically.
        kind: "hexbin" (default): density of all N points, log colour scale, so 100k overlapping boxes stay
            readable; "scatter": points (above ``max_points`` the same seeded random subset in every panel).
        gridsize: hexagons across the x range (hexbin).
    Returns:
        {"path": Path, "size": (width_px, height_px), "index": ndarray[M] rows drawn,
         "panels": {name: {"x": ndarray[M], "y": ndarray[M], "pearson": float, "title": str}}}; hexbin panels add
        "centers" (ndarray[H, 2]) and "counts" (ndarray[H]) of the drawn hexagons (empty ones are not drawn).
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError("plot_score_vs_iou: scores must be a non-empty dict {name: Tensor[N]}")
    if max_points < 1:
        raise ValueError(f"plot_score_vs_iou: max_points must be >= 1, got {max_points}")
    _check_kind(kind, "plot_score_vs_iou")
    t = _as_f64(true_iou, "true_iou", None)
    vals = {k: _as_f64(v, k, t.shape[0]) for k, v in scores.items()}
    n = t.shape[0]
    index = np.arange(n)
    if n > max_points and kind == "scatter":
        index = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
    fig = new_figure(PANEL_INCHES * len(vals) + (0.6 if kind == "hexbin" else 0.0), PANEL_INCHES)
    axes = fig.subplots(1, len(vals), squeeze=False)[0]
    panels = {}
    for ax, (name, v) in zip(axes, vals.items()):
        r = pearson(t, v)
        title = f"{name}: Pearson r = {r:.3f}" if not math.isnan(r) else f"{name}: Pearson r = n/a"
        panels[name] = {"pearson": r, **_density(ax, t[index], v[index], kind, gridsize, (-0.02, 1.02), None)}
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("IoU with ground truth")
        ax.set_ylabel(name)
        ax.set_title(title, fontsize=10)
        panels[name]["title"] = ax.get_title()
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "index": index, "panels": panels}


def plot_ap_vs_threshold(
    curves: dict[str, list[float]],
    out_png: str | os.PathLike,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    baseline: str | None = None,
    highlight: int = 6,
) -> dict[str, Any]:
    """AP against the IoU threshold, one line per arm (e.g. ``evaluate(...)["ap_per_threshold"]``).

    Args:
        curves: {arm: list of len(thresholds) APs in [0, 1]}; -1 (undefined) is drawn as a gap.
        baseline: an arm of ``curves``: draw every other arm as its AP difference from it instead
            (``plot_ap_deltas``, readable for a whole grid); None: absolute AP.
    Returns:
        {"path": Path, "size": (width_px, height_px), "lines": {arm: {"x": ndarray, "y": ndarray}}}
        (y as drawn: nan where the input was -1); with a baseline, what ``plot_ap_deltas`` returns.
    """
    if baseline is not None:
        return plot_ap_deltas(curves, baseline, out_png, thresholds, highlight)
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
                          seed: int = 0, kind: str = "hexbin", gridsize: int = 40) -> dict[str, Any]:
    """True IoU of each box after a change (y) against before it (x), with the diagonal: points above it improved.

    Args:
        before, after (Tensor[N]) IoUs in [0, 1].
        kind: "hexbin" (default, density of all N boxes, log colour scale) or "scatter" (above ``max_points`` a
            seeded random subset).
    Returns:
        {"path": Path, "size": (width_px, height_px), "x": ndarray[M], "y": ndarray[M], "improved": int, "worse": int}
        (the counts use all N boxes); hexbin adds "centers" (ndarray[H, 2]) and "counts" (ndarray[H]).
    """
    _check_kind(kind, "plot_iou_before_after")
    x = _as_f64(before, "before", None)
    y = _as_f64(after, "after", x.shape[0])
    index = np.arange(len(x))
    if len(x) > max_points and kind == "scatter":
        index = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
    improved, worse = int((y > x).sum()), int((y < x).sum())
    fig = new_figure(PANEL_INCHES + (1.0 if kind == "hexbin" else 0.4), PANEL_INCHES)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, zorder=3)
    drawn = _density(ax, x[index], y[index], kind, gridsize, (-0.02, 1.02), (-0.02, 1.02))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true IoU before")
    ax.set_ylabel("true IoU after")
    ax.set_title(f"{improved} improved, {worse} worse of {len(x)}", fontsize=10)
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "improved": improved, "worse": worse, **drawn}


KINDS = ("hexbin", "scatter")


def _check_kind(kind: str, what: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{what}: kind must be one of {list(KINDS)}, got {kind!r}")


def _density(ax: Any, x: np.ndarray, y: np.ndarray, kind: str, gridsize: int, xlim: tuple, ylim: tuple | None
             ) -> dict[str, Any]:
    """Draw y against x as points or as hexagon counts; return what the artist holds (read back from it)."""
    if kind == "scatter":
        # rasterized: 20k markers stay a bitmap, cheap to draw.
        coll = ax.scatter(x, y, s=2, alpha=0.3, linewidths=0, rasterized=True)
        off = np.asarray(coll.get_offsets(), dtype=np.float64).reshape(-1, 2)
        return {"x": off[:, 0], "y": off[:, 1]}
    if len(x) == 0:
        return {"x": x, "y": y, "centers": np.zeros((0, 2)), "counts": np.zeros(0)}
    lo_y, hi_y = ylim if ylim is not None else (min(float(y.min()), 0.0) - 0.02, max(float(y.max()), 1.0) + 0.02)
    # mincnt=1: empty hexagons stay blank; log colours: a dense cluster does not wash out the tails.
    coll = ax.hexbin(x, y, gridsize=gridsize, extent=(xlim[0], xlim[1], lo_y, hi_y), mincnt=1, bins="log",
                     cmap="viridis", linewidths=0.1, rasterized=True)
    ax.figure.colorbar(coll, ax=ax, fraction=0.05, pad=0.02).set_label("boxes", fontsize=8)
    return {"x": x, "y": y, "centers": np.asarray(coll.get_offsets(), dtype=np.float64).reshape(-1, 2),
            "counts": np.asarray(coll.get_array(), dtype=np.float64)}


def _curve_matrix(curves: dict[str, list[float]], baseline: str, thresholds: tuple[float, ...], what: str
                  ) -> tuple[list[str], np.ndarray]:
    """(arms other than the baseline, dAP in AP points [A, T]); nan where either side is undefined (-1)."""
    if not isinstance(curves, dict) or not curves:
        raise ValueError(f"{what}: curves must be a non-empty dict {{arm: list of APs}}")
    if baseline not in curves:
        raise ValueError(f"{what}: baseline {baseline!r} is not one of the curves {list(curves)[:8]}")
    ys = {}
    for name, v in curves.items():
        y = np.asarray(v, dtype=np.float64)
        if y.shape != (len(thresholds),) or not np.isfinite(y).all():
            raise ValueError(f"{what}: curve '{name}' must hold {len(thresholds)} finite values (one per IoU "
                             f"threshold), got {list(v)[:12]}")
        ys[name] = np.where(y == -1, np.nan, y)
    arms = [a for a in curves if a != baseline]
    if not arms:
        raise ValueError(f"{what}: needs at least one arm besides the baseline {baseline!r}")
    return arms, np.stack([100.0 * (ys[a] - ys[baseline]) for a in arms])


def plot_ap_deltas(
    curves: dict[str, list[float]],
    baseline: str,
    out_png: str | os.PathLike,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    highlight: int = 6,
) -> dict[str, Any]:
    """AP minus the baseline's AP (in AP points) against the IoU threshold: the zero line is the baseline.

    The ``highlight`` arms with the best mean gain are coloured and named in the legend (with their mean dAP); the
    others are thin grey lines, so a grid of 30 arms reads at a glance.
    Args:
        curves: {arm: list of len(thresholds) APs in [0, 1]} including ``baseline``; -1 (undefined) is a gap.
    Returns:
        {"path", "size", "order": arms by mean gain (best first), "lines": {arm: {"x": ndarray[T], "y": ndarray[T]
        (as drawn, AP points), "highlighted": bool}}}.
    """
    if isinstance(highlight, bool) or not isinstance(highlight, int) or highlight < 0:
        raise ValueError(f"plot_ap_deltas: highlight must be an integer >= 0, got {highlight!r}")
    arms, d = _curve_matrix(curves, baseline, thresholds, "plot_ap_deltas")
    x = np.asarray(thresholds, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an arm undefined at every threshold: mean of nothing
        mean = np.where(np.isnan(d).all(1), -np.inf, np.nanmean(d, 1))
    order = [arms[i] for i in np.argsort(-mean, kind="stable")]
    shown = set(order[:highlight])
    fig = new_figure(8.6, 4.2)
    ax = fig.subplots()
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    legend = {f"{baseline} (baseline)": ax.axhline(0.0, color="black", linewidth=1.4, zorder=2)}
    lines, named = {}, {}
    for name in reversed(order):  # the best drawn last, on top
        i = arms.index(name)
        if name in shown:
            k = order.index(name)
            (line,) = ax.plot(x, d[i], marker="o", markersize=3, linewidth=1.6, color=colors[k % len(colors)],
                              zorder=3)
            named[name] = (f"{name} ({mean[i]:+.1f})", line)
        else:
            (line,) = ax.plot(x, d[i], color="0.7", linewidth=0.8, zorder=1)
        lines[name] = {"x": np.asarray(line.get_xdata(), dtype=np.float64),
                       "y": np.asarray(line.get_ydata(), dtype=np.float64), "highlighted": name in shown}
    legend.update(named[n] for n in order if n in named)
    others = len(arms) - len(shown)
    if others:
        (line,) = ax.plot([], [], color="0.7", linewidth=0.8)
        legend[f"{others} other arm{'s' if others > 1 else ''}"] = line
    ax.legend(list(legend.values()), list(legend), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              frameon=False)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel(f"AP - AP of {baseline} (points)")
    ax.set_xlim(x.min() - 0.02, x.max() + 0.02)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.09, right=0.62, bottom=0.13, top=0.95)
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "order": order, "lines": lines}


def _heatmap(fig: Any, ax: Any, m: np.ndarray, rows: list[str], cols: list[str], label: str) -> Any:
    """A diverging heat map centred on 0 (red: worse, blue: better), values written in the cells."""
    finite = m[np.isfinite(m)]
    vmax = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-9)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.tick_params(length=0)
    if m.size <= 800:
        for (i, j), v in np.ndenumerate(m):
            text = "-" if not math.isfinite(v) else "0.0" if abs(v) < 0.05 else f"{v:+.1f}"  # no "-0.0"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                    color="white" if math.isfinite(v) and abs(v) > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label(label, fontsize=8)
    return im


def plot_dap_heatmap(
    curves: dict[str, list[float]],
    baseline: str,
    out_png: str | os.PathLike,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    sort: bool = False,
) -> dict[str, Any]:
    """dAP vs the baseline (AP points) per arm (rows) x IoU threshold (columns), plus a last column "AP" (the mean
    over thresholds: COCO's AP difference). ``sort``: rows by that mean, best first; otherwise grid order.
    Returns:
        {"path", "size", "rows": list[str], "cols": list[str], "matrix": ndarray[A, T + 1] (as drawn; nan where
        undefined)}.
    """
    arms, d = _curve_matrix(curves, baseline, thresholds, "plot_dap_heatmap")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.concatenate([d, np.nanmean(d, 1, keepdims=True)], 1)
    m[np.isnan(d).all(1), -1] = np.nan
    if sort:
        o = np.argsort(-np.nan_to_num(m[:, -1], nan=-np.inf), kind="stable")
        arms, m = [arms[i] for i in o], m[o]
    cols = [f"{t:g}" for t in thresholds] + ["AP"]
    fig = new_figure(7.6, 1.2 + 0.24 * len(arms))
    ax = fig.subplots()
    im = _heatmap(fig, ax, m, arms, cols, f"AP - AP of {baseline} (points)")
    ax.axvline(len(thresholds) - 0.5, color="black", linewidth=1.2)  # the AP column is a summary, set apart
    ax.set_xlabel("IoU threshold")
    ax.set_title(f"dAP vs {baseline}", fontsize=10)
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    drawn = np.ma.filled(np.ma.asarray(im.get_array(), dtype=np.float64), np.nan)
    return {"path": path, "size": (w, h), "rows": arms, "cols": cols, "matrix": drawn}


def plot_reliability(diagrams: dict[str, Any], out_png: str | os.PathLike, target: str = "mean true IoU"
                     ) -> dict[str, Any]:
    """Reliability diagrams, one panel per score: bars of the mean target per confidence bin against the diagonal
    (a calibrated score sits on it), the ECE in the title, and the share of detections per bin as a grey strip.

    Args:
        diagrams: {name: Reliability or its to_dict()} (``iou_calibration``, ``laece(...).diagram``).
        target: the y-axis label.
    Returns:
        {"path", "size", "panels": {name: {"x": bin centres, "height": bar heights (0 for empty bins), "count":
        ndarray[J], "ece": float, "title": str}}} (x and heights read back from the bars).
    """
    if not isinstance(diagrams, dict) or not diagrams:
        raise ValueError("plot_reliability: diagrams must be a non-empty dict {name: Reliability}")
    fig = new_figure(PANEL_INCHES * len(diagrams), PANEL_INCHES + 0.3)
    axes = fig.subplots(1, len(diagrams), squeeze=False)[0]
    panels = {}
    for ax, (name, r) in zip(axes, diagrams.items()):
        r = r if isinstance(r, dict) else r.to_dict()
        edges = np.asarray(r["edges"], dtype=np.float64)
        count = np.asarray(r["count"], dtype=np.float64)
        mt = np.asarray([np.nan if v is None else v for v in r["mean_target"]], dtype=np.float64)
        if len(edges) != len(count) + 1 or len(mt) != len(count):
            raise ValueError(f"plot_reliability: '{name}' needs len(edges) == len(count) + 1 == len(mean_target) + 1")
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        bars = ax.bar(centres, np.nan_to_num(mt, nan=0.0), width=width * 0.95, color="tab:blue", alpha=0.8,
                      label=target, zorder=2)
        share = count / count.sum() if count.sum() else count
        ax.bar(centres, share, width=width * 0.95, color="0.55", alpha=0.5, label="share of detections", zorder=3)
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, zorder=4)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{name} (binned)")
        ax.set_ylabel(target)
        ece = r.get("ece")
        ece_text = "n/a" if ece is None or (isinstance(ece, float) and math.isnan(ece)) else f"{100 * ece:.1f}%"
        ax.set_title(f"{name}: ECE {ece_text}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", frameon=False)
        panels[name] = {"x": np.asarray([b.get_x() + b.get_width() / 2 for b in bars]),
                        "height": np.asarray([b.get_height() for b in bars]), "count": count,
                        "ece": ece, "title": ax.get_title()}
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "panels": panels}


def plot_tide_errors(results: dict[str, list[Any]], out_png: str | os.PathLike) -> dict[str, Any]:
    """TIDE's dAP per error type (columns) and arm (rows), one heat map per foreground IoU threshold.

    Args:
        results: {arm: error_breakdown(...)} (each a list of ErrorBreakdown, one per threshold; same thresholds for
            every arm).
    Returns:
        {"path", "size", "rows": arms, "cols": error types, "panels": {threshold: ndarray[A, 8] (dAP points, as
        drawn)}}.
    """
    from iouctl.analysis.errors import ERROR_TYPES, SPECIAL_TYPES

    if not isinstance(results, dict) or not results:
        raise ValueError("plot_tide_errors: results must be a non-empty dict {arm: list of ErrorBreakdown}")
    arms = list(results)
    thresholds = [b.iou_threshold for b in results[arms[0]]]
    if any([b.iou_threshold for b in results[a]] != thresholds for a in arms) or not thresholds:
        raise ValueError("plot_tide_errors: every arm needs breakdowns at the same IoU thresholds")
    cols = [*ERROR_TYPES, *(s.upper() for s in SPECIAL_TYPES)]
    fig = new_figure(6.4 * len(thresholds), 1.3 + 0.24 * len(arms))
    axes = fig.subplots(1, len(thresholds), squeeze=False)[0]
    panels = {}
    for j, (ax, t) in enumerate(zip(axes, thresholds)):
        m = np.asarray([[100 * results[a][j].dap[k] for k in ERROR_TYPES] +
                        [100 * results[a][j].special_dap[k] for k in SPECIAL_TYPES] for a in arms], dtype=np.float64)
        im = _heatmap(fig, ax, m, arms if j == 0 else [""] * len(arms), cols, "dAP (points)")
        ax.set_title(f"TIDE errors at IoU {t:g}", fontsize=10)
        panels[t] = np.ma.filled(np.ma.asarray(im.get_array(), dtype=np.float64), np.nan)
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "rows": arms, "cols": cols, "panels": panels}
