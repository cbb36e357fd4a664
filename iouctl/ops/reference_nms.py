"""Pure-PyTorch references of the NMS family: the fallback when the kernels cannot be built (or ``impl="reference"``).

Same definitions as ``kernels/nms/nms_cpu.cpp``, step for step, so the results agree exactly:
- IoU in the boxes' dtype (float32 for half/bfloat16) as torchvision's CPU nms computes it:
  inter / (area_i + area_j - inter), area = (x2 - x1) * (y2 - y1); max/min with std::max/std::min's NaN behaviour.
- Suppression when IoU > iou_threshold, the double threshold compared exactly (``_threshold_as``).
- Ranking: decreasing score, ties by increasing index (a stable sort).
- Soft-NMS scores decay in float64; the Gaussian factor uses ``math.exp`` (the C library's exp, as the kernel).
Inputs are assumed validated by ``iouctl.ops.nms`` (shapes, dtypes, no NaN scores).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(boxes: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32 (half overflows in areas)."""
    return torch.float64 if boxes.dtype == torch.float64 else torch.float32


def _threshold_as(thr: float, dtype: torch.dtype, device) -> Tensor:
    """The largest ``dtype`` value not above ``thr``: for x of that dtype, float64(x) > thr <=> x > result.

    torch would round a Python threshold to the tensor's dtype *to nearest*, which can flip a comparison at the
    boundary (float32(0.3) > 0.3); torchvision's kernel compares in double, and so do we, exactly.
    """
    t = torch.tensor(thr, dtype=dtype, device=device)
    if float(t) > thr:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype, device=device))
    return t


def _max_(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(a < b, b, a)  # std::max(a, b): a unless a < b (so NaN in b is ignored, NaN in a kept)


def _min_(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b < a, b, a)  # std::min(a, b)


def _iou_row(x1, y1, x2, y2, area, i: int, lo: int) -> Tensor:
    """IoU of box i with boxes [lo:], in the kernel's expression order. Inputs are 1-D coordinate columns."""
    zero = torch.zeros((), dtype=x1.dtype, device=x1.device)
    xx1 = _max_(x1[i], x1[lo:])
    yy1 = _max_(y1[i], y1[lo:])
    xx2 = _min_(x2[i], x2[lo:])
    yy2 = _min_(y2[i], y2[lo:])
    w = _max_(zero, xx2 - xx1)
    h = _max_(zero, yy2 - yy1)
    inter = w * h
    return inter / (area[i] + area[lo:] - inter)


def _columns(boxes: Tensor, order: Tensor):
    b = boxes.to(compute_dtype(boxes))[order]
    x1, y1, x2, y2 = b.unbind(1)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


def _descending(rank: Tensor) -> Tensor:
    """Positions -> index, by decreasing rank, ties by increasing index."""
    return torch.sort(rank.to(torch.float64), descending=True, stable=True).indices


def iou_guided_nms_reference(
    boxes: Tensor, scores: Tensor, ious: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """IoU-Net Algorithm 1. boxes Tensor[N, 4] xyxy, scores/ious Tensor[N].

    Returns (keep Tensor[K] int64 in decreasing ``ious``, cluster_scores Tensor[K] in ``scores.dtype``).
    """
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=device), scores.new_empty(0)
    order = _descending(ious)
    x1, y1, x2, y2, area = _columns(boxes, order)
    thr = _threshold_as(iou_threshold, x1.dtype, device)
    owner = torch.full((n,), -1, dtype=torch.long, device=device)  # position of the kept box that suppressed j
    i = 0
    while i < n:
        owner[i] = i
        newly = (owner[i + 1:] < 0) & (_iou_row(x1, y1, x2, y2, area, i, i + 1) > thr)
        owner[i + 1:][newly] = i
        alive = (owner[i + 1:] < 0).nonzero()
        if alive.numel() == 0:
            break
        i = i + 1 + int(alive[0, 0])
    cls = scores.to(torch.float64)[order]
    best = cls.clone().scatter_reduce_(0, owner, cls, reduce="amax", include_self=True)
    kept = (owner == torch.arange(n, device=device)).nonzero().flatten()
    return order[kept], best[kept].to(scores.dtype)


def _merge(keep: Tensor, rank: Tensor) -> Tensor:
    """Order kept indices by decreasing rank, ties by increasing index (how the kernels merge classes)."""
    keep = keep.sort().values
    return keep[torch.sort(rank[keep].to(torch.float64), descending=True, stable=True).indices]


def batched_iou_guided_nms_reference(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """Per-class ``iou_guided_nms_reference`` (one call per category, no coordinate offsets: exact)."""
    keeps, clusters = [], []
    for c in torch.unique(idxs):
        members = (idxs == c).nonzero().flatten()
        k, cs = iou_guided_nms_reference(boxes[members], scores[members], ious[members], iou_threshold)
        keeps.append(members[k])
        clusters.append(cs)
    if not keeps:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_empty(0)
    keep = torch.cat(keeps)
    cluster = torch.empty(boxes.shape[0], dtype=scores.dtype, device=boxes.device)
    cluster[keep] = torch.cat(clusters)
    keep = _merge(keep, ious)
    return keep, cluster[keep]


def soft_nms_reference(
    boxes: Tensor, scores: Tensor, method: str = "gaussian", sigma: float = 0.5, iou_threshold: float = 0.3,
    score_threshold: float = 0.001, out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017). boxes Tensor[N, 4], scores Tensor[N] (finite).

    Repeatedly select the highest current score (ties: lowest index); decay every other box by
    linear: (1 - IoU) when IoU > iou_threshold, gaussian: exp(-IoU^2 / sigma) (no threshold); drop boxes whose
    score is under ``score_threshold``. Returns (keep Tensor[K] int64, decayed scores Tensor[K] in ``out_dtype``,
    default ``scores.dtype``) in selection order.
    """
    device = boxes.device
    s_all = scores.to(torch.float64)
    live = (s_all >= score_threshold).nonzero().flatten()  # ascending index: argmax's first max = lowest index
    dead = -math.inf
    x1, y1, x2, y2, area = _columns(boxes, live)
    s = s_all[live].clone()
    thr = _threshold_as(iou_threshold, x1.dtype, device)
    keep, kept_scores = [], []
    while s.numel() > 0:
        m = int(torch.argmax(s))  # first maximal value
        mx = float(s[m])
        if mx == dead:
            break
        keep.append(int(live[m]))
        kept_scores.append(mx)
        s[m] = dead
        ov = _iou_row(x1, y1, x2, y2, area, m, 0)
        if method == "gaussian":
            pos = (ov > 0).nonzero().flatten()  # NaN overlaps count as none
            w = torch.tensor([math.exp(-(o * o) / sigma) for o in ov[pos].tolist()], dtype=torch.float64,
                             device=device)
            ns = s[pos] * w
            s[pos] = torch.where(ns >= score_threshold, ns, torch.full_like(ns, dead))
        else:
            w = torch.where(ov > thr, 1.0 - ov.to(torch.float64), torch.ones_like(s))
            ns = s * w
            s = torch.where(ns >= score_threshold, ns, torch.full_like(ns, dead))
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    return keep_t, torch.tensor(kept_scores, dtype=torch.float64, device=device).to(out_dtype or scores.dtype)


def batched_soft_nms_reference(
    boxes: Tensor, scores: Tensor, idxs: Tensor, method: str = "gaussian", sigma: float = 0.5,
    iou_threshold: float = 0.3, score_threshold: float = 0.001,
) -> tuple[Tensor, Tensor]:
    """Per-class ``soft_nms_reference``, merged by decreasing decayed score (ties: increasing index)."""
    keeps, news = [], []
    for c in torch.unique(idxs):
        members = (idxs == c).nonzero().flatten()
        k, ns = soft_nms_reference(boxes[members], scores[members], method, sigma, iou_threshold, score_threshold,
                                   out_dtype=torch.float64)  # merge on the float64 scores, as the kernel does
        keeps.append(members[k])
        news.append(ns)
    if not keeps:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_empty(0)
    keep, new = torch.cat(keeps), torch.cat(news)
    by_index = keep.argsort()
    keep, new = keep[by_index], new[by_index]
    order = torch.sort(new, descending=True, stable=True).indices
    return keep[order], new[order].to(scores.dtype)
