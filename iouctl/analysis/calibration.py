"""Is a confidence calibrated? Reliability diagrams and ECE of a score against the true IoU, the localisation-aware
ECE (LaECE) and LRP / optimal LRP with its components.

- ``reliability``: equal-width bins of the confidence over [0, 1] (bin j = [j/J, (j+1)/J), the last one closed);
  per bin the count, mean confidence and mean target; ECE = sum_j n_j / N |mean conf_j - mean target_j| (Guo et
  al. 2017's estimator, here with a real-valued target), MCE = the largest gap. ``iou_calibration`` uses it with the
  true IoU of each detection as the target: a calibrated predicted IoU (or fused score) says how well the box fits.
- ``laece``: LaECE of Oksuz, Joy and Dokania, "Towards Building Self-Aware Object Detectors via Reliable Uncertainty
  Quantification and Calibration" (CVPR 2023), as their reference code (fiveai/saod, ``Calibration``) computes it:
  detections matched COCO-style at IoU ``tau`` (0.10), per class c and confidence bin j (25 bins),
  |mean confidence - precision_c(j) x mean IoU of the true positives_c(j)| (= sum of the TP IoUs / detections in the
  bin), weighted by the bin's share of the class's detections, then averaged over the classes that have ground truth
  and detections. Differences from that code, at bin edges and in empty classes only: a confidence of exactly 1
  falls in the last bin (the reference drops it), and a class with ground truth but no detection is left out
  (the reference averages in a 0; Kuzucu et al. 2024's code leaves it out).
- ``lrp``: Localisation-Recall-Precision error of Oksuz et al. (ECCV 2018; TPAMI 2022 "One Metric to Measure them
  All"): per class, with TP/FP/FN from COCO matching at IoU ``tau`` (0.5) among the detections scoring >= s,
  LRP = (sum_TP (1 - IoU) / (1 - tau) + N_FP + N_FN) / (N_TP + N_FP + N_FN); optimal LRP = its minimum over s
  (the authors' COCO code scans s = 0, 0.01, ..., 1; ``score_thresholds=None`` scans every distinct score), and the
  components at that s: localisation = mean (1 - IoU) of the TPs, FP = N_FP / (N_TP + N_FP), FN = N_FN / N_GT.
  moLRP and its components are means over classes with ground truth (components skip nan: no TP / no detection);
  the authors' code averages in a -1 for classes without ground truth, which this leaves out.

All matching is cocoeval's (area "all", ``max_dets`` per image and class, crowd regions ignore detections).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from iouctl.analysis.correlation import _as_f64
from iouctl.analysis.errors import _Frame, _stable_order, to_jsonable
from iouctl.analysis.groundtruth import GroundTruth, load_gt
from iouctl.data.detections import Detections

LRP_SCORE_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # the authors' COCO code: s = 0, 0.01, ..., 1


def _bin_edges(num_bins: int, what: str) -> np.ndarray:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"{what}: num_bins must be an integer >= 1, got {num_bins!r}")
    return np.linspace(0.0, 1.0, num_bins + 1)


def _bin_of(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin j holds edges[j] <= conf < edges[j+1]; the last bin also holds 1.0."""
    return np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, len(edges) - 2)


def _check_unit(a: np.ndarray, name: str, what: str) -> None:
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{what}: '{name}' must lie in [0, 1], got values in [{a.min():g}, {a.max():g}]")


@dataclass
class Reliability:
    """Reliability-diagram data. Lists have one entry per bin; means are nan for empty bins."""

    edges: list[float]            # J + 1 bin edges over [0, 1]
    count: list[int]
    mean_confidence: list[float]
    mean_target: list[float]
    ece: float                    # sum_j count_j / n |mean_confidence_j - mean_target_j|; nan when n == 0
    mce: float                    # largest |gap| over non-empty bins; nan when n == 0
    n: int

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def reliability(confidence: Tensor | np.ndarray, target: Tensor | np.ndarray, num_bins: int = 10) -> Reliability:
    """Binned reliability of ``confidence`` (Tensor[N] in [0, 1]) as a predictor of ``target`` (Tensor[N], e.g. the
    true IoU or a 0/1 correctness), float64 throughout."""
    edges = _bin_edges(num_bins, "reliability")
    c = _as_f64(confidence, "confidence", None)
    t = _as_f64(target, "target", c.shape[0])
    _check_unit(c, "confidence", "reliability")
    b = _bin_of(c, edges)
    cnt = np.bincount(b, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc = np.bincount(b, weights=c, minlength=num_bins) / cnt
        mt = np.bincount(b, weights=t, minlength=num_bins) / cnt
    gap = np.abs(mc - mt)
    n = int(len(c))
    ece = float(np.sum(cnt[cnt > 0] / n * gap[cnt > 0])) if n else math.nan
    mce = float(gap[cnt > 0].max()) if n else math.nan
    return Reliability(edges.tolist(), cnt.tolist(), mc.tolist(), mt.tolist(), ece, mce, n)


def iou_calibration(true_iou: Tensor, scores: dict[str, Tensor], num_bins: int = 10,
                    min_true_iou: float | None = None) -> dict[str, Reliability]:
    """Reliability of each score (e.g. {"iou": predicted IoU, "fused": cls^a IoU^(1-a)}) against the true IoU.

    Args:
        true_iou (Tensor[N]): e.g. ``true_iou(gt, dets)``.
        scores: {name: Tensor[N]} in [0, 1].
        min_true_iou: keep only detections whose true IoU exceeds it (0.5: IoU-Net's protocol, the boxes an IoU head
            is trained on); None keeps all, background boxes included.
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError("iou_calibration: scores must be a non-empty dict {name: Tensor[N]}")
    t = _as_f64(true_iou, "true_iou", None)
    keep = t > min_true_iou if min_true_iou is not None else np.ones(len(t), bool)
    return {k: reliability(_as_f64(v, k, len(t))[keep], t[keep], num_bins) for k, v in scores.items()}


@dataclass
class LaECE:
    """LaECE of one confidence (fractions). ``diagram``: bins pooled over classes, target = sum of TP IoUs / count
    (precision x mean TP IoU), what the class-wise terms compare the confidence with."""

    value: float                 # mean over classes; nan when no class has ground truth and detections
    tau: float
    per_class: dict[int, float]  # COCO category id -> LaECE of that class
    diagram: Reliability

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def laece(gt: str | os.PathLike | GroundTruth, dets: Detections, scores: Tensor | None = None, tau: float = 0.1,
          num_bins: int = 25, max_dets: int = 100) -> LaECE:
    """Localisation-aware ECE (module docstring) of ``dets`` ranked and binned by ``scores`` (Tensor[N] in [0, 1];
    default ``dets.scores``)."""
    _check_tau(tau, "laece")
    edges = _bin_edges(num_bins, "laece")
    return _laece(_Frame(load_gt(gt), dets, scores, max_dets, per_image=False), float(tau), edges)


def _laece(f: _Frame, tau: float, edges: np.ndarray) -> LaECE:
    num_bins = len(edges) - 1
    _check_unit(f.score, "scores", "laece")
    m = f.match(tau)
    ok = ~m.ignored
    conf, cls, gain = f.score[ok], f.cls[ok], np.where(m.tp, m.iou, 0.0)[ok]
    b = _bin_of(conf, edges)
    cell = cls * num_bins + b  # (class, bin)
    size = f.K * num_bins
    cnt = np.bincount(cell, minlength=size).reshape(f.K, num_bins)
    sum_c = np.bincount(cell, weights=conf, minlength=size).reshape(f.K, num_bins)
    sum_g = np.bincount(cell, weights=gain, minlength=size).reshape(f.K, num_bins)
    n_c = cnt.sum(1)
    per_class = {}
    for k in np.flatnonzero((f.n_gt > 0) & (n_c > 0)):
        nz = cnt[k] > 0
        per_class[int(f.category_ids[k])] = float(
            np.sum(cnt[k][nz] / n_c[k] * np.abs(sum_c[k][nz] / cnt[k][nz] - sum_g[k][nz] / cnt[k][nz])))
    value = float(np.mean(list(per_class.values()))) if per_class else math.nan
    tot = cnt.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc, mg = sum_c.sum(0) / tot, sum_g.sum(0) / tot
    gap = np.abs(mc - mg)
    n = int(tot.sum())
    diagram = Reliability(edges.tolist(), tot.tolist(), mc.tolist(), mg.tolist(),
                          float(np.sum(tot[tot > 0] / n * gap[tot > 0])) if n else math.nan,
                          float(gap[tot > 0].max()) if n else math.nan, n)
    return LaECE(value, float(tau), per_class, diagram)


@dataclass
class LRP:
    """LRP error at IoU ``tau`` (fractions, lower is better)."""

    tau: float
    lrp: float       # mean over classes of LRP with every detection kept (no score threshold)
    olrp: float      # moLRP: mean over classes of the optimal LRP
    olrp_loc: float  # means over classes of the components at each class's optimum
    olrp_fp: float
    olrp_fn: float
    per_class: dict[int, dict[str, float]]  # category id -> {"lrp", "olrp", "loc", "fp", "fn", "threshold"}

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def lrp(gt: str | os.PathLike | GroundTruth, dets: Detections, scores: Tensor | None = None, tau: float = 0.5,
        score_thresholds: Any = "coco", max_dets: int = 100) -> LRP:
    """LRP and optimal LRP with components (module docstring).

    Args:
        scores (Tensor[N], optional): the confidence thresholded (default ``dets.scores``).
        score_thresholds: "coco" (s = 0, 0.01, ..., 1, the authors' grid), None (every distinct score: the exact
            optimum), or a 1-d array of thresholds.
    """
    _check_tau(tau, "lrp")
    grid = _lrp_grid(score_thresholds)
    return _lrp(_Frame(load_gt(gt), dets, scores, max_dets, per_image=False), float(tau), grid)


def _lrp_grid(score_thresholds: Any) -> np.ndarray | None:
    if isinstance(score_thresholds, str):
        if score_thresholds != "coco":
            raise ValueError(f"lrp: score_thresholds must be 'coco', None or an array, got {score_thresholds!r}")
        grid = LRP_SCORE_THRESHOLDS
    elif score_thresholds is not None:
        grid = np.sort(np.asarray(score_thresholds, dtype=np.float64).ravel())
        if not len(grid) or not np.isfinite(grid).all():
            raise ValueError("lrp: score_thresholds must be a non-empty array of finite values")
    else:
        grid = None
    return grid


def _lrp(f: _Frame, tau: float, grid: np.ndarray | None) -> LRP:
    if tau >= 1:
        raise ValueError(f"lrp: tau must be < 1 (the localisation term divides by 1 - tau), got {tau}")
    m = f.match(tau)
    per_class: dict[int, dict[str, float]] = {}
    ok = ~m.ignored
    # the detections of each class, score descending, ties by frame order: one sort for every class
    by_cls = np.flatnonzero(ok)
    by_cls = by_cls[_stable_order(f.cls[by_cls], -f.score[by_cls])]
    ends = np.cumsum(np.bincount(f.cls[by_cls], minlength=f.K))
    for k in np.flatnonzero(f.n_gt > 0):
        sel = by_cls[(ends[k - 1] if k else 0):ends[k]]
        s, tp, loss = f.score[sel], m.tp[sel], np.where(m.tp, 1.0 - m.iou, 0.0)[sel]
        n_gt = int(f.n_gt[k])
        ntp = np.r_[0, np.cumsum(tp)]                # prefix sizes 0..n: the detections scoring >= s
        nfp = np.r_[0, np.cumsum(~tp)]
        sloc = np.r_[0.0, np.cumsum(loss)]
        if grid is None:
            # Every distinct score (a tie group enters at once) and the empty set, lowest threshold first.
            cut = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) + 1 if len(s) else np.zeros(0, np.int64)
            cut, thr = np.r_[cut[::-1], 0], np.r_[s[cut - 1][::-1], np.inf]
        else:
            cut = len(s) - np.searchsorted(s[::-1], grid, side="left")  # number of scores >= each threshold
            thr = grid
        tp_c, fp_c, loc_c = ntp[cut].astype(np.float64), nfp[cut].astype(np.float64), sloc[cut]
        fn_c = n_gt - tp_c
        err = (loc_c / (1 - tau) + fp_c + fn_c) / (tp_c + fp_c + fn_c)
        i = int(np.argmin(err))  # thresholds ascend: ties go to the lowest, as in the authors' code
        with np.errstate(invalid="ignore", divide="ignore"):
            comp_loc = loc_c[i] / tp_c[i]
            comp_fp = fp_c[i] / (tp_c[i] + fp_c[i])
        all_err = (sloc[-1] / (1 - tau) + nfp[-1] + n_gt - ntp[-1]) / (n_gt + nfp[-1])
        per_class[int(f.category_ids[k])] = {"lrp": float(all_err), "olrp": float(err[i]), "loc": float(comp_loc),
                                             "fp": float(comp_fp), "fn": float(fn_c[i] / n_gt),
                                             "threshold": float(thr[i])}

    def mean(key: str) -> float:
        v = np.asarray([c[key] for c in per_class.values()], dtype=np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else math.nan

    return LRP(float(tau), mean("lrp"), mean("olrp"), mean("loc"), mean("fp"), mean("fn"), per_class)


def _check_tau(tau: float, what: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 <= tau <= 1.0):
        raise ValueError(f"{what}: tau must be an IoU in [0, 1], got {tau!r}")


def calibration_report(gt: str | os.PathLike | GroundTruth, dets: Detections, scores: dict[str, Tensor] | None = None,
                       true_iou: Tensor | None = None, num_bins: int = 10, laece_bins: int = 25,
                       laece_tau: float = 0.1, lrp_tau: float = 0.5, max_dets: int = 100) -> dict[str, Any]:
    """Calibration of each score of a detection set, as plain JSON-ready dicts.

    Args:
        dets: N detections (an arm's output, or raw ones).
        scores: {name: Tensor[N] in [0, 1]}, e.g. {"reported": kept.scores, "iou": dets.ious[kept.index],
            "fused": ...}; default {"reported": dets.scores}.
        true_iou (Tensor[N], optional): IoU of each detection with its best same-class ground truth (computed when
            absent; pass ``true_iou(gt, raw)[kept.index]`` to reuse it).
    Returns:
        {name: {"reliability": Reliability dict (all detections), "reliability_iou>0.5": (true IoU > 0.5 only),
                "laece": LaECE dict, "lrp": LRP dict}}.
    """
    return _calibration(load_gt(gt), dets, scores, true_iou, num_bins, laece_bins, laece_tau, lrp_tau, max_dets)


def _calibration(g: GroundTruth, dets: Detections, scores: dict[str, Tensor] | None, true_iou: Tensor | None,
                 num_bins: int, laece_bins: int, laece_tau: float, lrp_tau: float, max_dets: int,
                 frame: _Frame | None = None) -> dict[str, Any]:
    from iouctl.analysis.correlation import true_iou as _true_iou

    if scores is None:
        scores = {"reported": dets.scores}
    if not isinstance(scores, dict) or not scores:
        raise ValueError("calibration_report: scores must be a non-empty dict {name: Tensor[N]}")
    _check_tau(laece_tau, "laece")
    _check_tau(lrp_tau, "lrp")
    edges = _bin_edges(laece_bins, "laece")
    if true_iou is None:
        true_iou = _true_iou(g, dets)
    rel = iou_calibration(true_iou, scores, num_bins)
    rel_fg = iou_calibration(true_iou, scores, num_bins, min_true_iou=0.5)
    out = {}
    for name, s in scores.items():
        # one geometry for every ranking score (and for the error breakdown, through analyze_arm)
        frame = frame.rescore(dets, s, per_image=False) if frame is not None else _Frame(g, dets, s, max_dets, False)
        frame.match_all((laece_tau, lrp_tau))  # one kernel call for both
        out[name] = {"reliability": rel[name].to_dict(), "reliability_iou>0.5": rel_fg[name].to_dict(),
                     "laece": _laece(frame, float(laece_tau), edges).to_dict(),
                     "lrp": _lrp(frame, float(lrp_tau), LRP_SCORE_THRESHOLDS).to_dict()}
    return out


def analyze_arm(gt: str | os.PathLike | GroundTruth, dets: Detections, scores: dict[str, Tensor] | None = None,
                true_iou: Tensor | None = None, iou_thresholds: tuple[float, ...] = (0.5, 0.75),
                background_threshold: float = 0.1, num_bins: int = 10, laece_bins: int = 25, laece_tau: float = 0.1,
                lrp_tau: float = 0.5, max_dets: int = 100) -> dict[str, Any]:
    """An NMS arm's output analysed in one call: TIDE's error breakdown (ranked by ``dets.scores``, the reported
    score) and ``calibration_report`` of each score, computing the detection/ground-truth geometry once.

    Returns:
        {"errors": list of ErrorBreakdown (one per threshold, as ``error_breakdown``; ``.to_dict()`` for JSON),
         "calibration": calibration_report(...)}.
    """
    from iouctl.analysis.errors import _breakdown, _check_thresholds

    g = load_gt(gt)
    ts = _check_thresholds(iou_thresholds, background_threshold)
    frame = _Frame(g, dets, None, max_dets, per_image=True)
    frame.match_all(ts)
    errors = [_breakdown(frame, t, float(background_threshold)) for t in ts]
    calib = _calibration(g, dets, scores, true_iou, num_bins, laece_bins, laece_tau, lrp_tau, max_dets, frame)
    return {"errors": errors, "calibration": calib}


def calibration_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """One markdown table row per (arm, score) of ``{arm: calibration_report(...)}``: ECE vs the true IoU (all /
    IoU > 0.5), LaECE, LRP, oLRP and its components, in percent."""
    cols = ["arm", "score", "ECE vs IoU", "ECE, IoU > 0.5", "LaECE", "LRP", "oLRP", "oLRP loc", "oLRP FP", "oLRP FN"]
    out = ["Calibration (in %, lower is better): ECE of the score against the true IoU; LaECE (tau 0.1, 25 bins); "
           "LRP and optimal LRP (tau 0.5) with localisation, FP and FN components.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for arm, rep in reports.items():
        for name, r in rep.items():
            vals = [r["reliability"]["ece"], r["reliability_iou>0.5"]["ece"], r["laece"]["value"], r["lrp"]["lrp"],
                    r["lrp"]["olrp"], r["lrp"]["olrp_loc"], r["lrp"]["olrp_fp"], r["lrp"]["olrp_fn"]]
            out.append("| " + " | ".join([arm, name, *(_pct(v) for v in vals)]) + " |")
    return "\n".join(out) + "\n"


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


__all__ = ["LRP", "LaECE", "Reliability", "analyze_arm", "calibration_markdown", "calibration_report",
           "iou_calibration", "laece", "lrp", "reliability"]
