"""How well a score tracks localization quality: true IoU of each detection and rank/linear correlations."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch import Tensor

from iouctl.analysis.groundtruth import GroundTruth, load_gt
from iouctl.data.detections import Detections
from iouctl.ops.boxes import paired_box_iou

_BLOCK = 1 << 16  # detections per block in true_iou


def true_iou(gt: str | os.PathLike | GroundTruth, dets: Detections) -> Tensor:
    """IoU of each detection with its best same-class, non-crowd ground-truth box of the same image.

    Args:
        gt: COCO ground-truth json path (cached) or a GroundTruth.
        dets: N detections whose image ids and labels exist in ``gt``.
    Returns:
        Tensor[N], float64 (computed in float64; 0 where the image has no such box).
    """
    g = load_gt(gt)
    n = len(dets)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    g.check_ids(dets.image_ids, dets.labels, "detections")
    dkeys = g.key(dets.image_ids.cpu(), dets.labels.cpu())
    # Every (detection, GT) pair sharing a key, built without a Python loop: GT are sorted by key, so the
    # candidates of detection i are the contiguous range start[i]:end[i].
    start_all = torch.searchsorted(g.keys, dkeys, right=False)
    counts_all = torch.searchsorted(g.keys, dkeys, right=True) - start_all
    boxes = dets.boxes.cpu().double()
    out = torch.zeros(n, dtype=torch.float64)
    # Blocks of detections bound the pair tensors' memory (5M raw COCO boxes would make ~15M pairs at once).
    for lo in range(0, n, _BLOCK):
        start, counts = start_all[lo : lo + _BLOCK], counts_all[lo : lo + _BLOCK]
        total = int(counts.sum())
        if total == 0:
            continue
        det_idx = torch.repeat_interleave(torch.arange(len(counts)), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        gt_idx = torch.repeat_interleave(start, counts) + (torch.arange(total) - first)
        ious = paired_box_iou(boxes[lo + det_idx], g.boxes[gt_idx])
        out[lo : lo + len(counts)].scatter_reduce_(0, det_idx, ious, reduce="amax", include_self=True)
    return out


def _as_f64(x: Tensor | np.ndarray, name: str, n: int | None) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(
            f"correlations: '{name}' must be 1-d of length {n if n is not None else 'N'}, got shape {list(a.shape)}"
        )
    if not np.isfinite(a).all():
        raise ValueError(f"correlations: '{name}' has non-finite values; pass finite scores")
    return a


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r in float64 (centred sums); nan when n < 2 or either input is constant."""
    if x.shape[0] < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = float(xc @ xc), float(yc @ yc)
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    return float(np.clip((xc @ yc) / math.sqrt(sxx * syy), -1.0, 1.0))


def correlations(true_iou: Tensor, scores: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Pearson, Spearman and Kendall (tau-b) of each score with the true IoU.

    Args:
        true_iou (Tensor[N]): e.g. from ``true_iou``.
        scores: {name: Tensor[N]}, e.g. {"cls": ..., "iou": ..., "fused": ...}.
    Returns:
        {name: {"pearson", "spearman", "kendall": float}}; nan (no warning) when N < 2 or an input is constant.
    """
    from scipy import stats

    if not isinstance(scores, dict) or not scores:
        raise ValueError("correlations: scores must be a non-empty dict {name: Tensor[N]}")
    t = _as_f64(true_iou, "true_iou", None)
    out = {}
    for name, s in scores.items():
        v = _as_f64(s, name, t.shape[0])
        degenerate = t.shape[0] < 2 or np.ptp(t) == 0 or np.ptp(v) == 0
        if degenerate:
            out[name] = {"pearson": math.nan, "spearman": math.nan, "kendall": math.nan}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's small-sample notes; the degenerate cases are handled above
            rho = float(stats.spearmanr(t, v).statistic)
            tau = float(stats.kendalltau(t, v).statistic)
        out[name] = {"pearson": pearson(t, v), "spearman": rho, "kendall": tau}
    return out


def matched_correlations(true_iou: Tensor, scores: dict[str, Tensor], min_iou: float = 0.5
                         ) -> dict[str, dict[str, float]]:
    """``correlations`` over the detections whose true IoU exceeds ``min_iou`` only: IoU-Net's protocol (Fig. 2,
    boxes with IoU > 0.5 against their ground truth), where background boxes do not dominate the statistic."""
    t = true_iou.detach().cpu()
    keep = t > min_iou
    return correlations(t[keep], {k: v.detach().cpu()[keep] for k, v in scores.items()})
