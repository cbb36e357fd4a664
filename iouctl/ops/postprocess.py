"""Post-processing after greedy NMS, as ops: DIoU-NMS, Matrix NMS, Cluster-NMS (+SPM, +D, +W), box voting (weighted
NMS) and Weighted Boxes Fusion, each single-group and batched per group (e.g. per (image, class)) in one kernel call.

Definitions (the papers and the reference code named in each docstring); conventions shared with ``iouctl.ops.nms``:

- boxes are Tensor[N, 4] (x1, y1, x2, y2), finite (a non-finite coordinate is refused with one line); the IoU is
  ``iouctl::box_iou`` (kernels/nms/nms_math.h): torchvision's expression in the boxes' dtype (float16/bfloat16 in
  float32). A zero-area box has IoU 0 or 0/0 = NaN with others, which counts as no overlap in every rule here.
- Ranking is by decreasing score, ties by increasing index (a stable sort); results do not depend on the thread count.
- Batched variants are exact per group (no coordinate-offset trick); lists of kept boxes of several groups are merged
  by decreasing score, ties by index (Weighted Boxes Fusion: by decreasing fused score, ties by first member).
- NaN scores are refused with one line (there is no rank for them). Ops that weight by the scores (box voting,
  Cluster-NMS +W, WBF) need them finite and >= 0 (WBF drops those under ``skip_box_threshold`` >= 0 first).
- Coordinate averages and score decays are computed in float64 and returned in the input dtypes.
- The ops are not differentiable (inputs are detached); outputs are on the input device.

``impl``: "auto" (the C++ kernel; CUDA tensors run it on a host copy, as there are no CUDA kernels for these ops;
the reference when the build failed), "cpp", "reference" (pure PyTorch below, runs on any device). The kernels live
in ``kernels/postprocess/`` (per-element rules: postprocess_math.h).
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import Tensor

from iouctl.ops import _extension
from iouctl.ops.nms import _check_boxes, _check_no_nan, _check_vector, check_real
from iouctl.ops.reference import kernel_box_iou

__all__ = [
    "MATRIX_KERNELS",
    "WBF_CONF_TYPES",
    "batched_box_voting",
    "batched_cluster_nms",
    "batched_diou_nms",
    "batched_matrix_nms",
    "batched_weighted_boxes_fusion",
    "box_voting",
    "cluster_nms",
    "diou_nms",
    "matrix_nms",
    "weighted_boxes_fusion",
]

_LIB = "postprocess"
MATRIX_KERNELS = ("gaussian", "linear")
WBF_CONF_TYPES = ("avg", "max")
_registered = False
_register_lock = threading.Lock()


def _register_fakes() -> None:
    """Fake (meta) kernels, once the library is loaded: the number of kept boxes is data-dependent."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return

        def _k(boxes: Tensor):
            n = boxes.shape[0]  # a bound helps the compiler, but it must be a plain int (not a SymInt)
            ctx = torch.library.get_ctx()
            return ctx.new_dynamic_size(max=n) if isinstance(n, int) else ctx.new_dynamic_size()

        @torch.library.register_fake("iouctl::diou_nms")
        def _fake_diou(boxes, scores, idxs, iou_threshold, beta):
            return boxes.new_empty((_k(boxes),), dtype=torch.long)

        @torch.library.register_fake("iouctl::matrix_nms")
        def _fake_matrix(boxes, scores, idxs, kernel, sigma):
            return torch.empty_like(scores)

        @torch.library.register_fake("iouctl::cluster_nms")
        def _fake_cluster(boxes, scores, idxs, iou_threshold, spm, distance, weighted, sigma, beta, weight_threshold,
                          score_threshold, max_iterations):
            k = _k(boxes)
            return boxes.new_empty((k,), dtype=torch.long), scores.new_empty((k,)), boxes.new_empty((k, 4))

        @torch.library.register_fake("iouctl::box_voting")
        def _fake_voting(boxes, scores, idxs, iou_threshold, vote_threshold):
            k = _k(boxes)
            return boxes.new_empty((k,), dtype=torch.long), boxes.new_empty((k, 4))

        @torch.library.register_fake("iouctl::weighted_boxes_fusion")
        def _fake_wbf(boxes, scores, idxs, iou_threshold, skip_box_threshold, conf_type):
            k = _k(boxes)
            return boxes.new_empty((k,), dtype=torch.long), boxes.new_empty((k, 4)), scores.new_empty((k,))

        _registered = True


def _resolve(impl: str, device: torch.device, op: str) -> str:
    """'cpp' (on a host copy for CUDA tensors) or 'reference' for tensors on ``device``."""
    if impl == "cuda":
        raise ValueError("impl='cuda': the post-processing ops have no CUDA kernels; impl='auto' runs the CPU kernel "
                         "on a host copy of CUDA tensors, impl='reference' runs PyTorch on the device")
    kind = _extension.resolve_or_host_copy(_LIB, impl, device, op)  # no CUDA kernels: auto is cpp on a host copy
    if kind != "reference":
        _register_fakes()
    return kind


_call = _extension.call_kernel


# --------------------------------------------------------------------------------------------------- validation
def _inputs(boxes, scores, idxs=None, *, idxs_name: str = "idxs") -> tuple[Tensor, Tensor, Tensor | None]:
    boxes = _check_boxes(boxes)
    scores = _check_vector(scores, "scores", boxes)
    if idxs is not None:
        idxs = _check_vector(idxs, idxs_name, boxes, integer=True)
    if boxes.device.type == "cpu" and boxes.dtype in (torch.float32, torch.float64):
        # numpy's single-threaded test: torch's parallel one wakes the thread pool for 4N values, which costs more
        # than the kernels themselves on a loaded machine
        finite = bool(np.isfinite(boxes.numpy()).all())
    else:
        finite = bool(torch.isfinite(boxes).all())
    if not finite:
        row = int((~torch.isfinite(boxes)).any(1).nonzero()[0, 0])
        raise ValueError(f"boxes must be finite (x1, y1, x2, y2), got {boxes[row].tolist()} at row {row}")
    _check_no_nan(scores, "scores")
    return boxes, scores, idxs


def _check_weights(scores: Tensor, what: str) -> None:
    bad = ~torch.isfinite(scores) | (scores < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"scores are the {what}: they must be finite and >= 0, got {float(scores[i])} at index {i}")


def _unit(x, name: str) -> float:
    return check_real(x, name, 0.0, 1.0)


def _positive(x, name: str) -> float:
    x = check_real(x, name, 0.0, open_lo=True)
    if math.isinf(x):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return x


def _choice(x, name: str, choices: tuple[str, ...]) -> str:
    if x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {x!r}")
    return x


def _flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r}")
    return x


def check_beta(beta) -> float:
    """The DIoU penalty's exponent: a finite number > 0 (one-line ValueError)."""
    return _positive(beta, "beta")


def check_matrix_args(kernel, sigma) -> tuple[str, float]:
    """Matrix NMS's kernel ('gaussian' | 'linear') and sigma (finite, > 0); one-line ValueError naming a bad one."""
    return _choice(kernel, "kernel", MATRIX_KERNELS), _positive(sigma, "sigma")


def check_cluster_args(iou_threshold, spm, distance, weighted, sigma, score_threshold, beta, weight_threshold,
                       max_iterations) -> tuple:
    """The validated Cluster-NMS arguments, in this order; one-line ValueError naming a bad one."""
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}")
    st = check_real(score_threshold, "score_threshold", 0.0)
    return (_unit(iou_threshold, "iou_threshold"), _flag(spm, "spm"), _flag(distance, "distance"),
            _flag(weighted, "weighted"), _positive(sigma, "sigma"), st, _positive(beta, "beta"),
            _unit(weight_threshold, "weight_threshold"), max_iterations)


def check_vote_threshold(vote_threshold) -> float:
    """Box voting's IoU threshold for a voter, in (0, 1] (0 would make every box of the group a voter)."""
    return check_real(vote_threshold, "vote_threshold", 0.0, 1.0, open_lo=True)


def check_wbf_args(iou_threshold, skip_box_threshold, conf_type) -> tuple[float, float, str]:
    """WBF's iou_threshold in [0, 1], skip_box_threshold >= 0 and conf_type ('avg' | 'max'); one-line ValueError."""
    skip = check_real(skip_box_threshold, "skip_box_threshold", 0.0)
    return _unit(iou_threshold, "iou_threshold"), skip, _choice(conf_type, "conf_type", WBF_CONF_TYPES)


# --------------------------------------------------------------------------------------------------------- ops
def diou_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, beta: float = 1.0, *, impl: str = "auto") -> Tensor:
    """DIoU-NMS (Zheng et al., "Distance-IoU Loss", AAAI 2020, eq. 8; darknet's ``diounms_sort``/``box_diounms``).

    Greedy NMS in decreasing score whose rule is distance-aware: a kept box M suppresses B when
    ``IoU(M, B) - (rho^2 / c^2) ** beta > iou_threshold``, with rho the distance between the box centres and c the
    diagonal of the smallest box enclosing both (penalty 0 when c = 0). beta = 1 is the paper's R_DIoU; darknet's
    ``beta_nms`` is 0.6. The paper writes the rule with >=; darknet (and torchvision's nms) use >, as here. Boxes far
    apart survive where greedy NMS would merge them; beta -> inf tends to greedy NMS.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]): the ranking.
        iou_threshold (float in [0, 1]), beta (float > 0).
    Returns:
        keep (Tensor[K] int64): kept indices in decreasing score (ties: increasing index), like torchvision's nms.
    """
    return batched_diou_nms(boxes, scores, None, iou_threshold, beta, impl=impl)


def batched_diou_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, beta: float = 1.0, *,
                     impl: str = "auto") -> Tensor:
    """``diou_nms`` independently per group ``idxs`` (Tensor[N] integer; None: one group). Returns keep Tensor[K]
    int64, all groups merged by decreasing score (ties: increasing index)."""
    boxes, scores, idxs = _inputs(boxes, scores, idxs)
    thr, beta = _unit(iou_threshold, "iou_threshold"), check_beta(beta)
    if _resolve(impl, boxes.device, "diou_nms") == "reference":
        return _grouped(boxes, scores, idxs, lambda b, s: (_diou_ref(b, s, thr, beta),))[0]
    return _call("diou_nms", boxes.device, boxes, scores, idxs, thr, beta)


def matrix_nms(boxes: Tensor, scores: Tensor, kernel: str = "gaussian", sigma: float = 2.0, *,
               impl: str = "auto") -> Tensor:
    """Matrix NMS (Wang et al., "SOLOv2", NeurIPS 2020, eq. 4 and Fig. 4; for boxes as PaddlePaddle's matrix_nms).

    Every box is decayed at once, in parallel, by the boxes ranked above it: with comp_i the largest IoU of box i with
    a box ranked above i (0 for the top box), ``decay_j = min(1, min over i above j of f(IoU_ij) / f(comp_i))``,
    gaussian ``f(x) = exp(-sigma x^2)`` (sigma 2, the paper's) or linear ``f(x) = 1 - x``; returns ``score * decay``.
    Nothing is removed: rank by the decayed scores (and keep the top k). A term f(IoU)/f(comp) with f(comp) = 0
    (linear, comp = 1: box i duplicates a box above it, which decays j by itself) is no decay.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]), kernel ("gaussian" | "linear"), sigma (float > 0, gaussian only).
    Returns:
        decayed scores (Tensor[N], dtype of ``scores``), in input order. Ties in ``scores`` rank by index.
    """
    return batched_matrix_nms(boxes, scores, None, kernel, sigma, impl=impl)


def batched_matrix_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, kernel: str = "gaussian",
                       sigma: float = 2.0, *, impl: str = "auto") -> Tensor:
    """``matrix_nms`` independently per group ``idxs`` (Tensor[N] integer; None: one group): only boxes of the same
    group decay each other. Returns the decayed scores Tensor[N], input order."""
    boxes, scores, idxs = _inputs(boxes, scores, idxs)
    kernel, sigma = check_matrix_args(kernel, sigma)
    if _resolve(impl, boxes.device, "matrix_nms") == "reference":
        return _matrix_ref_grouped(boxes, scores, idxs, kernel == "gaussian", sigma)
    return _call("matrix_nms", boxes.device, boxes, scores, idxs, kernel, sigma)


def cluster_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, spm: bool = False, distance: bool = False,
                weighted: bool = False, sigma: float = 0.2, score_threshold: float = 0.01, *, beta: float = 0.6,
                weight_threshold: float = 0.8, max_iterations: int = 200, impl: str = "auto"):
    """Cluster-NMS (Zheng et al., "Enhancing Geometric Factors in Model Learning and Inference for Object Detection
    and Instance Segmentation", IEEE TCYB 2021; the official ``cluster_nms``, ``cluster_diounms``,
    ``cluster_SPM_nms``, ``cluster_SPM_dist_nms`` and the weighted variants of github.com/Zzh-tju/CIoU).

    With X the upper-triangular matrix of overlaps in rank order, the boxes kept are iterated in parallel: start with
    all boxes, keep those no currently kept box above them overlaps by more than ``iou_threshold``, repeat until
    nothing changes or ``max_iterations`` (200) passes. Its fixed point is greedy NMS; so is the result unless a
    suppression chain is longer than the cap (then it is the capped iterate, as in the reference code).

    Variants (combinable):
        plain: X = IoU; keep == torchvision.ops.nms keep; scores unchanged.
        distance alone (+D, Cluster-DIoU-NMS): X = IoU - (rho^2/c^2)^beta (see ``diou_nms``; the official code uses
            beta 0.9 there), keep == ``diou_nms`` with the same beta.
        spm (score penalty): every kept box i decays each box j below it by exp(-IoU_ij^2 / sigma) (sigma 0.2), with
            distance by min(exp(-IoU_ij^2 / sigma) + (rho^2/c^2)^beta, 1) (beta 0.6 as the official ``distance``);
            the boxes whose decayed score is > ``score_threshold`` (0.01) are returned, suppressed ones included.
        weighted (+W): each returned box that the iteration kept becomes the mean of itself (weight: its score) and
            the boxes below it whose overlap X exceeds ``weight_threshold`` (0.8) (weight: score * X), the input
            scores (the official +W code with SPM weights by the decayed ones). A box whose weights sum to 0 stays.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]; finite and >= 0 when weighted), iou_threshold (float in [0, 1]).
    Returns:
        keep (Tensor[K] int64) in decreasing input score (ties: increasing index), scores2 (Tensor[K], dtype of
        ``scores``: the decayed scores with spm, else the input ones); with ``weighted=True`` also boxes2
        (Tensor[K, 4], dtype of ``boxes``).
    """
    return batched_cluster_nms(boxes, scores, None, iou_threshold, spm, distance, weighted, sigma, score_threshold,
                               beta=beta, weight_threshold=weight_threshold, max_iterations=max_iterations, impl=impl)


def batched_cluster_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, spm: bool = False,
                        distance: bool = False, weighted: bool = False, sigma: float = 0.2,
                        score_threshold: float = 0.01, *, beta: float = 0.6, weight_threshold: float = 0.8,
                        max_iterations: int = 200, impl: str = "auto"):
    """``cluster_nms`` independently per group ``idxs`` (Tensor[N] integer; None: one group). Returns (keep,
    scores2[, boxes2 when weighted]) with all groups merged by decreasing input score (ties: increasing index)."""
    boxes, scores, idxs = _inputs(boxes, scores, idxs)
    args = check_cluster_args(iou_threshold, spm, distance, weighted, sigma, score_threshold, beta, weight_threshold,
                              max_iterations)
    if weighted:
        _check_weights(scores, "weights of the weighted coordinates")
    if _resolve(impl, boxes.device, "cluster_nms") == "reference":
        keep, s2, b2 = _grouped(boxes, scores, idxs, lambda b, s: _cluster_ref(b, s, *args))
    else:
        thr, spm, distance, weighted, sigma, st, beta, wt, iters = args
        keep, s2, b2 = _call("cluster_nms", boxes.device, boxes, scores, idxs, thr, spm, distance, weighted, sigma,
                             beta, wt, st, iters)
    return (keep, s2, b2) if weighted else (keep, s2)


def box_voting(boxes: Tensor, scores: Tensor, iou_threshold: float, vote_threshold: float = 0.8, *,
               impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Greedy NMS with box voting (Gidaris & Komodakis, "Object detection via a multi-region & semantic
    segmentation-aware CNN model", ICCV 2015; Detectron's ``box_voting``, ``TEST.BBOX_VOTE``, VOTE_TH 0.8).

    Greedy NMS (IoU > ``iou_threshold`` suppresses; keep == torchvision.ops.nms keep), then each kept box m becomes
    the score-weighted mean ``sum_j s_j b_j / sum_j s_j`` of the boxes j with ``IoU(m, j) >= vote_threshold``, m
    itself included. As in Detectron (scoring 'ID'), every box of the group votes, not only those m suppressed (a
    box suppressed by a higher kept box can vote for m too), and the kept box keeps its score. A kept box whose
    voters' scores sum to 0 stays as it is.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N], finite and >= 0: the weights), iou_threshold (float in [0, 1]),
        vote_threshold (float in (0, 1]).
    Returns:
        keep (Tensor[K] int64, decreasing score, ties by index), boxes2 (Tensor[K, 4], dtype of ``boxes``).
    """
    return batched_box_voting(boxes, scores, None, iou_threshold, vote_threshold, impl=impl)


def batched_box_voting(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float,
                       vote_threshold: float = 0.8, *, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``box_voting`` independently per group ``idxs`` (Tensor[N] integer; None: one group): only boxes of the same
    group vote. Returns (keep Tensor[K] int64, boxes2 Tensor[K, 4]) merged by decreasing score (ties: index)."""
    boxes, scores, idxs = _inputs(boxes, scores, idxs)
    thr, vote = _unit(iou_threshold, "iou_threshold"), check_vote_threshold(vote_threshold)
    _check_weights(scores, "voting weights")
    if _resolve(impl, boxes.device, "box_voting") == "reference":
        return _grouped(boxes, scores, idxs, lambda b, s: _voting_ref(b, s, thr, vote))
    return _call("box_voting", boxes.device, boxes, scores, idxs, thr, vote)


def weighted_boxes_fusion(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = 0.55,
                          skip_box_threshold: float = 0.0, conf_type: str = "avg", *,
                          impl: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Weighted Boxes Fusion of one model's detections (Solovyev, Wang & Gabruseva, "Weighted boxes fusion",
    Image and Vision Computing 2021; ``ensemble_boxes.weighted_boxes_fusion`` with one model of weight 1).

    Per label, boxes in decreasing score join the cluster whose fused box they overlap most, if by IoU >
    ``iou_threshold`` (0.55; the first such cluster on ties), or found a new cluster. A cluster's fused box is the
    score-weighted mean of its members' boxes (until a second member joins: the first box itself); its score the mean
    of their scores (``conf_type="avg"``) or the maximum ("max"). Boxes with score < ``skip_box_threshold`` or zero
    area are left out, as ensemble_boxes does; unlike it, coordinates are used as given (pixels are fine; no clipping
    to [0, 1], no swapping of inverted corners: an inverted box overlaps nothing). A cluster whose scores sum to 0
    gets the plain mean of its boxes.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N], finite), labels (Tensor[N] integer).
    Returns:
        boxes2 (Tensor[K, 4], dtype of ``boxes``), scores2 (Tensor[K], dtype of ``scores``), labels2 (Tensor[K],
        dtype of ``labels``): one row per cluster, by decreasing fused score (ties: the cluster's first box's index).
    """
    index, boxes2, scores2 = batched_weighted_boxes_fusion(boxes, scores, labels, iou_threshold, skip_box_threshold,
                                                           conf_type, impl=impl, _idxs_name="labels")
    return boxes2, scores2, labels[index]


def batched_weighted_boxes_fusion(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float = 0.55,
                                  skip_box_threshold: float = 0.0, conf_type: str = "avg", *, impl: str = "auto",
                                  _idxs_name: str = "idxs") -> tuple[Tensor, Tensor, Tensor]:
    """``weighted_boxes_fusion`` independently per group ``idxs`` (Tensor[N] integer; None: one group).

    Returns (index Tensor[K] int64: each cluster's first (highest-score) box, which carries its image and label;
    boxes2 Tensor[K, 4]; scores2 Tensor[K]), by decreasing fused score (ties: index).
    """
    boxes, scores, idxs = _inputs(boxes, scores, idxs, idxs_name=_idxs_name)
    thr, skip, conf_type = check_wbf_args(iou_threshold, skip_box_threshold, conf_type)
    inf = torch.isinf(scores) & (scores > 0)
    if bool(inf.any()):
        i = int(inf.nonzero()[0, 0])
        raise ValueError(f"scores are the fusion weights: they must be finite, got inf at index {i}")
    if _resolve(impl, boxes.device, "weighted_boxes_fusion") == "reference":
        return _wbf_ref_grouped(boxes, scores, idxs, thr, skip, conf_type == "avg")
    return _call("weighted_boxes_fusion", boxes.device, boxes, scores, idxs, thr, skip, conf_type)


# ----------------------------------------------------------------------------------- pure-PyTorch references
# The oracles of the kernels and their fallback. Dense per group: the pairwise matrices of a group (O(n^2) memory),
# the sequential scans on host copies (as torchvision's CUDA nms). The IoU is the kernels' expression, term for term.

def _compute(boxes: Tensor) -> Tensor:
    return boxes if boxes.dtype == torch.float64 else boxes.float()


def _iou_matrix(b: Tensor) -> Tensor:
    """Tensor[n, n] IoU of every pair of b's boxes, in b's dtype, as iouctl::box_iou."""
    return kernel_box_iou(b, b)


def _penalty_matrix(b: Tensor, beta: float) -> Tensor:
    """Tensor[n, n] float64 DIoU penalty (rho^2 / c^2)^beta, 0 where c = 0, as iouctl::diou_penalty."""
    d = b.double()
    cx, cy = 0.5 * (d[:, 0] + d[:, 2]), 0.5 * (d[:, 1] + d[:, 3])
    dx, dy = cx[:, None] - cx[None, :], cy[:, None] - cy[None, :]
    cw = torch.maximum(d[:, None, 2], d[None, :, 2]) - torch.minimum(d[:, None, 0], d[None, :, 0])
    ch = torch.maximum(d[:, None, 3], d[None, :, 3]) - torch.minimum(d[:, None, 1], d[None, :, 1])
    c2 = cw * cw + ch * ch
    r = (dx * dx + dy * dy) / c2
    return torch.where(c2 > 0, r.pow(beta), torch.zeros_like(r))


def _rank(scores: Tensor) -> Tensor:
    return torch.sort(scores, descending=True, stable=True).indices  # ties: increasing index


def _greedy_scan(suppress: Tensor) -> list[int]:
    """Kept positions of greedy NMS given suppress[i, j] (i above j suppresses j when i is kept)."""
    s = suppress.triu(1).cpu()
    removed = torch.zeros(s.shape[0], dtype=torch.bool)
    keep = []
    for i in range(s.shape[0]):
        if not removed[i]:
            keep.append(i)
            removed |= s[i]
    return keep


def _grouped(boxes: Tensor, scores: Tensor, idxs: Tensor | None, fn) -> tuple:
    """Run fn(group boxes, group scores) -> (kept positions[, values...] in the group's rank order) per group; map to
    input indices; merge groups by decreasing score, ties by index. Returns (keep, values...)."""
    dev = boxes.device
    b = _compute(boxes)
    groups = [torch.arange(len(scores), device=dev)] if idxs is None else \
        [(idxs == g).nonzero()[:, 0] for g in torch.unique(idxs)]
    parts = []
    for members in groups:
        if len(members) == 0:
            continue
        order = members[_rank(scores[members])]
        out = fn(b[order], scores[order])
        pos = torch.as_tensor(out[0], dtype=torch.long, device=dev)
        parts.append((order[pos], *out[1:]))
    if not parts:
        k = torch.zeros(0, dtype=torch.long, device=dev)
        extra = fn(b[:0], scores[:0])[1:]
        return (k, *extra)
    cols = [torch.cat(c) for c in zip(*parts)]
    keep = cols[0]
    by_index = torch.argsort(keep)
    merged = by_index[_rank(scores[keep][by_index])]
    return tuple(c[merged] for c in cols)


def _diou_ref(b: Tensor, s: Tensor, thr: float, beta: float) -> list[int]:
    value = _iou_matrix(b).double() - _penalty_matrix(b, beta)
    return _greedy_scan(value > thr)  # NaN (0/0 IoU) never suppresses


def _matrix_ref_grouped(boxes: Tensor, scores: Tensor, idxs: Tensor | None, gaussian: bool, sigma: float) -> Tensor:
    """SOLOv2's matrix_nms, literally (decay = column min of f(IoU) / f(compensation)), per group."""
    b = _compute(boxes)
    out = torch.empty(len(scores), dtype=torch.float64, device=scores.device)
    groups = [torch.arange(len(scores), device=scores.device)] if idxs is None else \
        [(idxs == g).nonzero()[:, 0] for g in torch.unique(idxs)]
    for members in groups:
        if len(members) == 0:
            continue
        order = members[_rank(scores[members])]
        iou = _iou_matrix(b[order]).double().nan_to_num(nan=0.0).triu(1)  # rows: the box above
        comp = iou.max(0).values  # comp_i: max IoU of i with a box above it
        if gaussian:
            decay = torch.exp(-sigma * iou ** 2) / torch.exp(-sigma * comp[:, None] ** 2)
        else:  # 1 / 0 = inf and 0 / 0 = NaN (comp_i = 1) are no decay
            decay = ((1 - iou) / (1 - comp[:, None])).nan_to_num(nan=math.inf)
        out[order] = scores[order].double() * decay.min(0).values
    return out.to(scores.dtype)


def _cluster_ref(b: Tensor, s: Tensor, thr: float, spm: bool, distance: bool, weighted: bool, sigma: float,
                 score_threshold: float, beta: float, weight_threshold: float, max_iterations: int):
    """The official Cluster-NMS iteration, literally (B = X * E, E = column max of B <= thr, until B stops changing
    or max_iterations), then SPM / +D / +W as the official variants (see ``cluster_nms``)."""
    n = len(s)
    iou = _iou_matrix(b).double().nan_to_num(nan=0.0)
    pen = _penalty_matrix(b, beta) if distance else None
    x = (iou - pen).nan_to_num(nan=0.0) if distance and not spm else iou
    x = x.triu(1)
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    bm = x
    for _ in range(max_iterations):
        a = bm
        keep = a.max(0).values <= thr if n else keep
        bm = x * keep[:, None]
        if torch.equal(a, bm):
            break
    sd = s.double()
    if spm:
        rows = iou.triu(1) * keep[:, None]
        f = torch.exp(-rows ** 2 / sigma)
        if distance:
            f = torch.minimum(f + pen * (rows > 0), torch.ones_like(f))
        reported = f.prod(0) * sd
        out = reported > score_threshold
    else:
        reported, out = sd, keep
    fused = b.double().clone()
    if weighted:
        w = (bm * (bm > weight_threshold) + torch.eye(n, dtype=torch.float64, device=b.device)) * sd[None, :]
        total = w.sum(1)
        mean = (w @ b.double()) / total[:, None]
        fused = torch.where((keep & (total > 0))[:, None], mean, fused)
    pos = out.nonzero()[:, 0]
    return pos.tolist(), reported[pos].to(s.dtype), fused[pos].to(b.dtype)


def _voting_ref(b: Tensor, s: Tensor, thr: float, vote: float):
    iou = _iou_matrix(b)
    keep = _greedy_scan(iou > thr)
    k = torch.as_tensor(keep, dtype=torch.long, device=b.device)
    voters = iou[k].double() >= vote
    voters[torch.arange(len(k), device=b.device), k] = True  # the kept box itself (also when empty: NaN IoU)
    w = voters * s.double()[None, :]
    total = w.sum(1)
    fused = torch.where((total > 0)[:, None], (w @ b.double()) / total[:, None], b[k].double())
    return keep, fused.to(b.dtype)


def _wbf_ref_grouped(boxes: Tensor, scores: Tensor, idxs: Tensor | None, thr: float, skip: float, avg: bool):
    """ensemble_boxes' clustering loop per group, in float64 and on the host."""
    b = _compute(boxes).double().cpu()
    sc = scores.double().cpu()
    ids = torch.zeros(len(sc), dtype=torch.long) if idxs is None else idxs.cpu().long()
    rows = []  # (fused score, first index, fused box)
    for g in torch.unique(ids).tolist():
        members = (ids == g).nonzero()[:, 0]
        order = members[_rank(sc[members])]
        fused = torch.empty(len(order), 4, dtype=torch.float64)  # the first `c` rows are the clusters'
        sums, plain, first, count, best = [], [], [], [], []
        c = 0
        for i in order.tolist():
            box, score = b[i], float(sc[i])
            area = float((box[2] - box[0]) * (box[3] - box[1]))
            if score < skip or area == 0.0:
                continue
            match = -1
            if c:
                iou = kernel_box_iou(fused[:c], box[None])[:, 0]
                iou = torch.where(iou > thr, iou, torch.full_like(iou, -1.0))  # NaN and <= thr: no match
                if float(iou.max()) > thr:
                    match = int(torch.argmax(iou))  # the first maximum
            if match < 0:
                fused[c] = box
                sums.append([score * box, score])
                plain.append([box.clone(), 1.0])
                first.append(i), count.append(1), best.append(score)
                c += 1
                continue
            sums[match] = [sums[match][0] + score * box, sums[match][1] + score]
            plain[match] = [plain[match][0] + box, plain[match][1] + 1.0]
            count[match] += 1
            best[match] = max(best[match], score)
            wsum = sums[match][1]
            fused[match] = sums[match][0] / wsum if wsum > 0 else plain[match][0] / plain[match][1]
        for q in range(c):
            rows.append((sums[q][1] / count[q] if avg else best[q], first[q], fused[q]))
    rows.sort(key=lambda r: (-r[0], r[1]))
    dev = boxes.device
    index = torch.tensor([r[1] for r in rows], dtype=torch.long, device=dev)
    out_boxes = torch.stack([r[2] for r in rows]) if rows else torch.zeros(0, 4, dtype=torch.float64)
    out_scores = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    return index, out_boxes.to(dev, boxes.dtype), out_scores.to(dev, scores.dtype)
