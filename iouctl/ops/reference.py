"""Pure-PyTorch references for the iouctl kernels: the test oracles and the fallback when a build fails.

PrRoI pooling first, then the NMS family.

Precise RoI Pooling (IoU-Net, Jiang et al. 2018) in its exact separable form (the IoU-Net paper's PrRoI definition):
    out[k, c, p, q] = sum_{h, w} By[k, p, h] * F[b_k, c, h, w] * Bx[k, q, w] / bin_area,
    Bx[k, q, w] = G(x_{q+1} - w) - G(x_q - w),
with G the antiderivative of the bilinear hat. Differentiable by autograd in the input and the box coordinates.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# A bin area (cells^2) below this is empty, as kMinBinArea in kernels/prroi_pool/prroi_pool_math.h: float
# accumulation would round it and its integral to 0.
MIN_BIN_AREA = 1e-30
_ROI_CHUNK = 64  # RoIs per matmul: bounds the [chunk, PH, C, W] intermediate (a few MB at C=256)


def hat_antiderivative(t: Tensor) -> Tensor:
    """G(t) = integral of max(0, 1 - |s|) over s <= t: 0 below -1, 1 above 1, quadratic in between."""
    tc = t.clamp(-1.0, 1.0)  # clamp: G is flat outside [-1, 1], so the gradient is 0 there too
    return torch.where(tc < 0, 0.5 * (tc + 1) ** 2, 1 - 0.5 * (1 - tc) ** 2)


def _edge_weights(lo: Tensor, step: Tensor, bins: int, size: int) -> Tensor:
    """Bin weights [K, bins, size]: weight of feature column w in bin q = G(x_{q+1} - w) - G(x_q - w)."""
    q = torch.arange(bins + 1, device=lo.device, dtype=lo.dtype)
    edges = lo[:, None] + q[None, :] * step[:, None]  # [K, bins + 1]
    cells = torch.arange(size, device=lo.device, dtype=lo.dtype)
    g = hat_antiderivative(edges[:, :, None] - cells[None, None, :])  # [K, bins + 1, size]
    return g[:, 1:] - g[:, :-1]


def check_batch_index(rois: Tensor, batch: int) -> Tensor:
    """rois[:, 0] as int64 after checking every entry is an integer in [0, batch) (ValueError otherwise)."""
    b = rois[:, 0]
    bad = ~(torch.isfinite(b) & (b == torch.floor(b)) & (b >= 0) & (b < batch))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"prroi_pool: rois[{k}, 0] (batch index) is {float(b[k])}; it must be an integer in [0, {batch}) "
            f"for an input batch of {batch}"
        )
    return b.long()


def prroi_pool_reference(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int,
                         spatial_scale: float = 1.0) -> Tensor:
    """Exact PrRoI pooling by dense separable weights.

    Args:
        input (Tensor[N, C, H, W]): features; computed in its dtype (use float64 for an oracle).
        rois (Tensor[K, 5]): (batch index, x1, y1, x2, y2) in image coordinates, multiplied by ``spatial_scale``.
    Returns:
        Tensor[K, C, PH, PW]: bin averages; 0 for an empty or infinite bin (or one below MIN_BIN_AREA), NaN for a
        box with NaN coordinates.
    """
    N, C, H, W = input.shape
    K = rois.shape[0]
    PH, PW = int(pooled_height), int(pooled_width)
    batch = check_batch_index(rois, N)
    coords = rois[:, 1:].to(input.dtype) * spatial_scale
    x1, y1, x2, y2 = coords.unbind(1)
    w, h = x2 - x1, y2 - y1
    bw, bh = w / PW, h / PH
    area = bw * bh
    normal = (w > 0) & (h > 0) & torch.isfinite(area) & (area >= MIN_BIN_AREA)
    nan_box = torch.isnan(w) | torch.isnan(h)
    # Non-normal boxes get a harmless stand-in so that no NaN/inf enters the graph (torch.where leaks NaN grads).
    one = torch.ones_like(bw)
    x1s, y1s = torch.where(normal, x1, 0 * one), torch.where(normal, y1, 0 * one)
    bws, bhs = torch.where(normal, bw, one), torch.where(normal, bh, one)
    Bx = _edge_weights(x1s, bws, PW, W)  # [K, PW, W]
    By = _edge_weights(y1s, bhs, PH, H)  # [K, PH, H]
    out = input.new_zeros((K, C, PH, PW))
    for n in range(N if H * W * C else 0):  # an empty map integrates to 0 everywhere
        idx = (batch == n).nonzero().flatten()
        feat = input[n].permute(1, 0, 2).reshape(H, C * W)  # [H, C * W]
        for chunk in idx.split(_ROI_CHUNK):
            t = (By[chunk].reshape(-1, H) @ feat).reshape(len(chunk), PH * C, W)  # rows ordered (p, c)
            val = torch.bmm(t, Bx[chunk].transpose(1, 2)).reshape(len(chunk), PH, C, PW).transpose(1, 2)
            out = out.index_put((chunk,), val)
    area_s = torch.where(normal, area, one)
    fill = torch.where(nan_box, torch.full_like(area, float("nan")), torch.zeros_like(area))
    return torch.where(normal[:, None, None, None], out / area_s[:, None, None, None], fill[:, None, None, None])


# --- NMS family ------------------------------------------------------------------------------------------------

# Pure-PyTorch references of the NMS family: the fallback when the kernels cannot be built (or ``impl="reference"``).
#
# Same definitions as ``kernels/nms/nms_cpu.cpp``, step for step, so the results agree exactly:
# - IoU: ``kernel_box_iou`` (iouctl::box_iou, torchvision's CPU nms expression) in the boxes' dtype (float32 for
#   half/bfloat16).
# - Suppression when IoU > iou_threshold, the double threshold compared exactly (``_threshold_as``).
# - Ranking: decreasing score, ties by increasing index (a stable sort).
# - Soft-NMS scores decay in float64; the Gaussian factor uses ``math.exp`` (the C library's exp, as the kernel).
# Inputs are assumed validated by ``iouctl.ops.nms`` (shapes, dtypes, no NaN scores).


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


def kernel_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``iouctl::box_iou`` (kernels/nms/nms_math.h) term for term: the kernels' IoU, for the references.

    boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]) in the dtype the kernel computes in (``compute_dtype``).
    Returns Tensor[N, M]: std::max/std::min with a box of boxes1 as the first argument, signed areas, and no
    zero-union rule (0 / 0 = NaN); iouctl.ops.boxes says how that agrees with the torch and numpy IoU.
    """
    a, b = boxes1[:, None, :], boxes2[None, :, :]
    zero = torch.zeros((), dtype=boxes1.dtype, device=boxes1.device)
    w = _max_(zero, _min_(a[..., 2], b[..., 2]) - _max_(a[..., 0], b[..., 0]))
    h = _max_(zero, _min_(a[..., 3], b[..., 3]) - _max_(a[..., 1], b[..., 1]))
    inter = w * h
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    return inter / ((area1[:, None] + area2[None, :]) - inter)


def _ordered(boxes: Tensor, order: Tensor) -> Tensor:
    return boxes.to(compute_dtype(boxes))[order]


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
    b = _ordered(boxes, order)
    thr = _threshold_as(iou_threshold, b.dtype, device)
    owner = torch.full((n,), -1, dtype=torch.long, device=device)  # position of the kept box that suppressed j
    i = 0
    while i < n:
        owner[i] = i
        newly = (owner[i + 1:] < 0) & (kernel_box_iou(b[i:i + 1], b[i + 1:])[0] > thr)
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
    b = _ordered(boxes, live)
    s = s_all[live].clone()
    thr = _threshold_as(iou_threshold, b.dtype, device)
    keep, kept_scores = [], []
    while s.numel() > 0:
        m = int(torch.argmax(s))  # first maximal value
        mx = float(s[m])
        if mx == dead:
            break
        keep.append(int(live[m]))
        kept_scores.append(mx)
        s[m] = dead
        ov = kernel_box_iou(b[m:m + 1], b)[0]
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
