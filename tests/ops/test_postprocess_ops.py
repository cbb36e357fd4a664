"""Post-processing ops (DIoU-NMS, Matrix NMS, Cluster-NMS, box voting, WBF): C++ kernels and PyTorch references
against plain Python loops written from the papers, torchvision, and ensemble_boxes.

The loops below are independent of both implementations: scalar Python over the boxes, the IoU over numpy scalars of
the box dtype (numpy rounds every float32 operation to float32, as the kernel does) in torchvision's term order, the
rest in float64 Python floats (libm's pow and exp, as the kernels). Tolerances:
- keep sets and DIoU decisions: exact (same IoU bits, same float64 expression order, same libm pow);
- weighted coordinates: the loops sum in the kernel's order, so float64 agrees to rounding of the final division
  (rtol 1e-12 leaves room for the reference's matmul order); float32 outputs to 2 ulp (2.4e-7) of the rounded value;
- decayed scores (Matrix NMS, SPM): products and exps of float64 in another association (the loop takes the min of
  ratios f(iou)/f(comp), the kernel exp(sigma * min exponent)): rtol 1e-12 in float64, 2 ulp in float32;
- ensemble_boxes accumulates fused coordinates and scores in float32 (get_weighted_box): atol 1e-5 on coordinates in
  [0, 1] (20 float32 additions at most ~1e-6), rtol 1e-6 on scores.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iouctl.ops.postprocess import (
    batched_box_voting,
    batched_cluster_nms,
    batched_diou_nms,
    batched_matrix_nms,
    batched_weighted_boxes_fusion,
    box_voting,
    cluster_nms,
    diou_nms,
    matrix_nms,
    weighted_boxes_fusion,
)
from tests.box_loops import NP, loop_kernel_iou, numpy_rows
from tests.lanes import sample
from tests.ops.common import DTYPES, IMPLS, clustered, require_library

RTOL = {torch.float32: 2.4e-7, torch.float64: 1e-12}

_built = require_library("postprocess")


def close(got: torch.Tensor, want, dtype, atol=0.0):
    want = torch.as_tensor(want, dtype=torch.float64).reshape(got.shape)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=RTOL[dtype], atol=atol)


# ----------------------------------------------------------------------------------------------- plain loops
def loop_penalty(a, b, beta):
    """(rho^2 / c^2)^beta in float64 (Zheng et al. 2020), 0 when c = 0."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    dx = 0.5 * (a[0] + a[2]) - 0.5 * (b[0] + b[2])
    dy = 0.5 * (a[1] + a[3]) - 0.5 * (b[1] + b[3])
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    c2 = cw * cw + ch * ch
    return 0.0 if c2 <= 0 else ((dx * dx + dy * dy) / c2) ** beta


def overlap(o):
    return 0.0 if math.isnan(o) else o  # 0 / 0 (empty boxes): no overlap


def prepare(boxes, scores):
    rows = numpy_rows(boxes)
    s = scores.double().tolist()
    return rows, s, sorted(range(len(rows)), key=lambda i: (-s[i], i)), NP[boxes.dtype]


def loop_greedy(order, suppresses):
    """Greedy NMS over `order` (best first): a box is kept unless a kept box above it, i, suppresses it, j
    (suppresses(i, j)). Returns the kept indices, best first."""
    keep, removed = [], set()
    for p, i in enumerate(order):
        if i in removed:
            continue
        keep.append(i)
        removed.update(j for j in order[p + 1:] if suppresses(i, j))
    return keep


def loop_diou_nms(boxes, scores, thr, beta):
    rows, _, order, f = prepare(boxes, scores)

    def suppresses(i, j):
        return loop_kernel_iou(rows[i], rows[j], f) - loop_penalty(rows[i], rows[j], beta) > thr

    return loop_greedy(order, suppresses)


def loop_matrix_nms(boxes, scores, kernel, sigma):
    """SOLOv2 eq. 4 for every box: decay_j = min(1, min_{i above j} f(iou_ij) / f(comp_i))."""
    rows, s, order, f = prepare(boxes, scores)

    def fn(x):
        return math.exp(-sigma * x * x) if kernel == "gaussian" else 1.0 - x

    comp = {}
    out = [0.0] * len(rows)
    for p, j in enumerate(order):
        comp[j] = max([overlap(loop_kernel_iou(rows[i], rows[j], f)) for i in order[:p]], default=0.0)
        decay = 1.0
        for i in order[:p]:
            den = fn(comp[i])
            if den == 0.0:
                continue  # i duplicates a box above it: no decay of its own
            decay = min(decay, fn(overlap(loop_kernel_iou(rows[i], rows[j], f))) / den)
        out[j] = s[j] * decay
    return out


def loop_cluster_nms(boxes, scores, thr, spm=False, distance=False, weighted=False, sigma=0.2, score_threshold=0.01,
                     beta=0.6, weight_threshold=0.8, max_iterations=200):
    """Cluster-NMS (Zheng et al. 2021), the iteration written as loops: k_t[j] = no k_(t-1) box above j has
    X > thr; then SPM / +D / +W. Returns (keep, scores, boxes) as lists."""
    rows, s, order, f = prepare(boxes, scores)
    n = len(order)
    iou = {(p, q): overlap(loop_kernel_iou(rows[order[p]], rows[order[q]], f))
           for p in range(n) for q in range(p + 1, n)}
    pen = {k: loop_penalty(rows[order[k[0]]], rows[order[k[1]]], beta) for k in iou}
    x = {k: (iou[k] - pen[k] if distance and not spm else iou[k]) for k in iou}
    keep = [True] * n
    for _ in range(max_iterations):
        new = [not any(keep[p] and x[(p, q)] > thr for p in range(q)) for q in range(n)]
        if new == keep:
            break
        keep = new
    out_pos, reported, fused = [], [], []
    for q in range(n):
        r = s[order[q]]
        if spm:
            decay = 1.0
            for p in range(q):
                if keep[p] and iou[(p, q)] > 0:
                    fct = math.exp(-iou[(p, q)] ** 2 / sigma)
                    decay *= min(fct + pen[(p, q)], 1.0) if distance else fct
            r = decay * s[order[q]]
            if not r > score_threshold:
                continue
        elif not keep[q]:
            continue
        box = [float(v) for v in rows[order[q]]]
        if weighted and keep[q]:
            acc, w = [s[order[q]] * v for v in box], s[order[q]]
            for c in range(q + 1, n):
                if x[(q, c)] > weight_threshold:
                    wc = x[(q, c)] * s[order[c]]
                    acc = [u + wc * float(v) for u, v in zip(acc, rows[order[c]])]
                    w += wc
            if w > 0:
                box = [u / w for u in acc]
        out_pos.append(order[q])
        reported.append(r)
        fused.append(box)
    return out_pos, reported, fused


def loop_box_voting(boxes, scores, thr, vote):
    """Greedy NMS; kept box m = sum s_j b_j / sum s_j over j with IoU(m, j) >= vote, m included (Detectron)."""
    rows, s, order, f = prepare(boxes, scores)
    keep = loop_greedy(order, lambda i, j: loop_kernel_iou(rows[i], rows[j], f) > thr)
    fused = []
    for m in keep:
        acc, w = [0.0] * 4, 0.0
        for j in order:
            if j == m or loop_kernel_iou(rows[m], rows[j], f) >= vote:
                acc = [u + s[j] * float(v) for u, v in zip(acc, rows[j])]
                w += s[j]
        fused.append([u / w for u in acc] if w > 0 else [float(v) for v in rows[m]])
    return keep, fused


def loop_wbf(boxes, scores, labels, thr, skip, conf_type):
    """ensemble_boxes' WBF for one model, per label, in float64 Python. Returns (first index, box, score) rows."""
    rows = [[float(v) for v in r] for r in boxes.tolist()]
    s, lab = scores.double().tolist(), labels.tolist()
    out = []
    for g in sorted(set(lab)):
        order = sorted((i for i in range(len(rows)) if lab[i] == g), key=lambda i: (-s[i], i))
        clusters = []  # [first, fused box, weighted sums, weight, plain sums, count, max score]
        for i in order:
            b = rows[i]
            if s[i] < skip or (b[2] - b[0]) * (b[3] - b[1]) == 0.0:
                continue
            best, best_iou = -1, thr
            for c, cl in enumerate(clusters):
                o = loop_kernel_iou([np.float64(v) for v in cl[1]], [np.float64(v) for v in b], np.float64)
                if o > best_iou:
                    best, best_iou = c, o
            if best < 0:
                clusters.append([i, list(b), [s[i] * v for v in b], s[i], list(b), 1, s[i]])
                continue
            cl = clusters[best]
            cl[2] = [u + s[i] * v for u, v in zip(cl[2], b)]
            cl[3] += s[i]
            cl[4] = [u + v for u, v in zip(cl[4], b)]
            cl[5] += 1
            cl[6] = max(cl[6], s[i])
            cl[1] = [u / cl[3] for u in cl[2]] if cl[3] > 0 else [u / cl[5] for u in cl[4]]
        for cl in clusters:
            out.append((cl[0], cl[1], cl[3] / cl[5] if conf_type == "avg" else cl[6]))
    out.sort(key=lambda r: (-r[2], r[0]))
    return out


# ------------------------------------------------------------------------------------------------ generators
def chain(n, dtype=torch.float64):
    """n boxes in a row, each overlapping the next by IoU 0.6 and no other; scores decreasing along the row. Greedy
    NMS keeps every other box; Cluster-NMS's iteration settles one box per iteration (a chain of depth n)."""
    x = torch.arange(n, dtype=torch.float64) * 2.5
    boxes = torch.stack([x, torch.zeros(n, dtype=torch.float64), x + 10, torch.full((n,), 10.0, dtype=torch.float64)],
                        1)
    return boxes.to(dtype), torch.linspace(1.0, 0.5, n, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------- DIoU-NMS
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thr,beta", sample([(0.0, 1.0), (0.5, 1.0), (0.5, 0.6), (0.7, 0.6), (1.0, 1.0)], 2))
def test_diou_nms_equals_plain_loop(impl, dtype, ties, thr, beta):
    boxes, scores, _ = clustered(150, 12, dtype, seed=int(thr * 10) + (1 if ties else 0), ties=ties)
    keep = diou_nms(boxes, scores, thr, beta, impl=impl)
    assert keep.dtype == torch.long
    assert keep.tolist() == loop_diou_nms(boxes, scores, thr, beta)
    if 0 < thr < 1:  # the distance term matters on these boxes: more survive than under greedy NMS
        assert len(keep) > len(torchvision.ops.nms(boxes, scores, thr))


def test_diou_nms_known_pair():
    # IoU 80/120 = 0.667; centres 2 px apart, enclosing box 12 x 10: DIoU = 0.667 - 4/244 = 0.650.
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10.0]])
    scores = torch.tensor([0.9, 0.8])
    assert diou_nms(boxes, scores, 0.66).tolist() == [0, 1]  # greedy NMS would suppress box 1
    assert torchvision.ops.nms(boxes, scores, 0.66).tolist() == [0]
    assert diou_nms(boxes, scores, 0.64).tolist() == [0]
    assert diou_nms(boxes, scores, 0.655, beta=2.0).tolist() == [0]  # (4/244)^2: penalty 0.0003


@pytest.mark.parametrize("dtype", DTYPES)
def test_diou_nms_large_beta_is_greedy_nms(dtype):
    # rho < c for two distinct boxes, so (rho^2/c^2)^beta -> 0: DIoU-NMS tends to greedy NMS
    boxes, scores, _ = clustered(2000, 120, dtype, seed=5)
    assert torch.equal(diou_nms(boxes, scores, 0.5, beta=1e6), torchvision.ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_diou_equals_per_group_calls(impl):
    boxes, scores, cls = clustered(400, 30, torch.float32, seed=7, n_classes=4)
    got = batched_diou_nms(boxes, scores, cls, 0.5, 0.6, impl=impl)
    want = torch.cat([torch.nonzero(cls == c)[:, 0][diou_nms(boxes[cls == c], scores[cls == c], 0.5, 0.6)]
                      for c in torch.unique(cls)])
    want = want[torch.sort(scores[want], descending=True, stable=True).indices]  # tied scores: index order
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert got.tolist() == sorted(got.tolist(), key=lambda i: (-float(scores[i]), i))


# ------------------------------------------------------------------------------------------------- Matrix NMS
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,sigma", sample([("gaussian", 2.0), ("linear", 2.0), ("gaussian", 0.5)], 2))
@pytest.mark.parametrize("ties", [False, True])
def test_matrix_nms_equals_plain_loop(impl, dtype, kernel, sigma, ties):
    boxes, scores, _ = clustered(120, 10, dtype, seed=3, ties=ties)
    boxes[5] = boxes[4]  # a duplicate: linear compensation 1 - 1 = 0 for the boxes below it
    got = matrix_nms(boxes, scores, kernel, sigma, impl=impl)
    close(got, loop_matrix_nms(boxes, scores, kernel, sigma), dtype)
    assert bool((got <= scores).all()) and float((got < 0.9 * scores).float().mean()) > 0.2  # duplicates decay


def test_matrix_nms_compensation():
    # B is nearly a duplicate of A (IoU 0.9) and C overlaps both. B's decay of C is divided by B's own decay
    # f(IoU_AB), so C is decayed once, by A, not twice (as a product of decays would): the compensation term.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [0, 3, 10, 13]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    iou = torchvision.ops.box_iou(boxes, boxes)
    ab, ac, bc = float(iou[0, 1]), float(iou[0, 2]), float(iou[1, 2])
    assert (ab, ac, bc) == pytest.approx((0.9, 70 / 130, 60 / 130))
    got = matrix_nms(boxes, scores, "gaussian", 2.0)
    want = [0.9, 0.8 * math.exp(-2 * ab * ab),
            0.7 * min(math.exp(-2 * ac * ac), math.exp(-2 * bc * bc) / math.exp(-2 * ab * ab))]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert want[2] == pytest.approx(0.7 * math.exp(-2 * ac * ac))  # B's term is > 1: no decay from B
    lin = matrix_nms(boxes, scores, "linear")
    assert lin.tolist() == pytest.approx([0.9, 0.8 * (1 - ab), 0.7 * min(1 - ac, (1 - bc) / (1 - ab))], rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_matrix_decays_within_groups_only(impl):
    boxes, scores, cls = clustered(300, 25, torch.float64, seed=8, n_classes=3)
    got = batched_matrix_nms(boxes, scores, cls, impl=impl)
    for c in torch.unique(cls):
        m = cls == c
        close(got[m], matrix_nms(boxes[m], scores[m]), torch.float64)


# ------------------------------------------------------------------------------------------------ Cluster-NMS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_cluster_nms_plain_equals_greedy_nms(dtype, ties, thr):
    boxes, scores, _ = clustered(3000, 200, dtype, seed=11, ties=ties)
    for impl, n in (("cpp", 3000), ("reference", 800)):  # the reference iterates dense n x n matrices
        boxes, scores = boxes[:n], scores[:n]
        keep, s2 = cluster_nms(boxes, scores, thr, impl=impl)
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr))
        assert torch.equal(s2, scores[keep])


def test_cluster_diou_equals_diou_nms():
    boxes, scores, _ = clustered(1500, 100, torch.float32, seed=12)
    keep, _ = cluster_nms(boxes, scores, 0.5, distance=True, beta=0.9)
    assert torch.equal(keep, diou_nms(boxes, scores, 0.5, beta=0.9))


# ordered so that the fast lane's sample (every other one) has plain, spm alone, distance alone and all three
VARIANTS = [dict(spm=bool(spm), distance=bool(d), weighted=bool(w)) for spm, d, w in
            [(0, 0, 0), (1, 1, 0), (1, 0, 0), (0, 1, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1), (0, 0, 1)]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sample(VARIANTS, 2, ids=["+".join(k for k, on in v.items() if on) or "plain"
                                                              for v in VARIANTS]))
def test_cluster_nms_variants_equal_plain_loop(impl, dtype, variant):
    boxes, scores, _ = clustered(90, 8, dtype, seed=13, spread=0.08)  # tight clusters: IoU > 0.8 neighbours
    got = cluster_nms(boxes, scores, 0.5, **variant, impl=impl)
    keep, reported, fused = loop_cluster_nms(boxes, scores, 0.5, **variant)
    assert got[0].tolist() == keep
    close(got[1], reported, dtype)
    if variant["weighted"]:
        close(got[2], fused, dtype, atol=1e-9)
        assert not torch.equal(got[2], boxes[got[0]])  # neighbours above 0.8 exist: boxes moved
    else:
        assert len(got) == 2
    if variant["spm"]:
        assert len(keep) > len(torchvision.ops.nms(boxes, scores, 0.5))  # soft: suppressed boxes may stay


@pytest.mark.parametrize("impl", IMPLS)
def test_cluster_nms_iteration_cap(impl):
    # A chain 300 deep: after the paper's 200 iterations the boxes past the 200th are not settled (as in the reference
    # code); more iterations reach greedy NMS.
    boxes, scores = chain(300)
    greedy = torchvision.ops.nms(boxes, scores, 0.5)
    assert greedy.tolist() == list(range(0, 300, 2))
    capped, _ = cluster_nms(boxes, scores, 0.5, impl=impl)
    assert capped[:100].tolist() == greedy[:100].tolist() and not torch.equal(capped, greedy)
    assert torch.equal(cluster_nms(boxes, scores, 0.5, max_iterations=400, impl=impl)[0], greedy)
    # the capped iterate itself, against the loop (a shorter chain keeps the loop quick)
    boxes, scores = chain(40)
    for cap in (1, 7, 25):
        got = cluster_nms(boxes, scores, 0.5, max_iterations=cap, impl=impl)[0]
        assert got.tolist() == loop_cluster_nms(boxes, scores, 0.5, max_iterations=cap)[0]
        assert (got.tolist() == greedy[:20].tolist()) == (cap >= 39)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_cluster_equals_per_group_calls(impl):
    boxes, scores, cls = clustered(400, 30, torch.float64, seed=14, n_classes=4, spread=0.08)
    keep, s2, b2 = batched_cluster_nms(boxes, scores, cls, 0.5, spm=True, distance=True, weighted=True, impl=impl)
    for c in torch.unique(cls):
        idx = torch.nonzero(cls == c)[:, 0]
        k, s, b = cluster_nms(boxes[idx], scores[idx], 0.5, True, True, True, impl=impl)
        mine = cls[keep] == c
        assert keep[mine].tolist() == idx[k].tolist()
        assert torch.equal(s2[mine], s) and torch.equal(b2[mine], b)
    assert keep.tolist() == sorted(keep.tolist(), key=lambda i: (-float(scores[i]), i))


# ------------------------------------------------------------------------------------------------- box voting
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("thr,vote", [(0.5, 0.8), (0.7, 0.5), (0.3, 1.0)])
def test_box_voting_equals_plain_loop(impl, dtype, thr, vote):
    boxes, scores, _ = clustered(150, 10, dtype, seed=15, spread=0.08)
    keep, fused = box_voting(boxes, scores, thr, vote, impl=impl)
    want_keep, want_fused = loop_box_voting(boxes, scores, thr, vote)
    assert keep.tolist() == want_keep
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr))
    close(fused, want_fused, dtype, atol=1e-9)
    moved = (fused - boxes[keep]).abs().amax(1) > 1e-3
    assert bool(moved.any()) == (vote < 1.0)  # vote 1.0: only exact duplicates (none here) vote


def test_box_voting_known_values():
    # kept box A (score 0.6) and B (0.2, IoU 0.9 with A, suppressed): A -> (0.6 A + 0.2 B) / 0.8; C alone stays.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30.0]], dtype=torch.float64)
    scores = torch.tensor([0.6, 0.2, 0.5], dtype=torch.float64)
    keep, fused = box_voting(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2]
    assert fused.tolist() == [[0, 0, 10, (0.6 * 10 + 0.2 * 9) / 0.8], [20, 20, 30, 30]]


def test_box_voting_votes_with_every_box_of_the_group():
    # D (score 0.6) is suppressed by A (IoU 0.515) yet overlaps kept box C by 0.96: it votes for C (Detectron).
    boxes = torch.tensor([[0, 0, 10, 10], [3.4, 0, 13.4, 10], [3.2, 0, 13.2, 10]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.6], dtype=torch.float64)
    iou = torchvision.ops.box_iou(boxes, boxes)
    assert float(iou[0, 1]) <= 0.5 < float(iou[0, 2]) and float(iou[1, 2]) >= 0.8
    keep, fused = box_voting(boxes, scores, 0.5, 0.8)
    assert keep.tolist() == [0, 1]
    assert torch.equal(fused[0], boxes[0])  # nothing overlaps A by 0.8
    torch.testing.assert_close(fused[1], (0.8 * boxes[1] + 0.6 * boxes[2]) / 1.4, rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_box_voting_votes_within_groups(impl):
    boxes, scores, cls = clustered(300, 20, torch.float64, seed=16, n_classes=3, spread=0.08)
    keep, fused = batched_box_voting(boxes, scores, cls, 0.5, impl=impl)
    for c in torch.unique(cls):
        idx = torch.nonzero(cls == c)[:, 0]
        k, b = box_voting(boxes[idx], scores[idx], 0.5, impl=impl)
        mine = cls[keep] == c
        assert keep[mine].tolist() == idx[k].tolist() and torch.equal(fused[mine], b)


# --------------------------------------------------------------------------------------- Weighted Boxes Fusion
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conf_type", ["avg", "max"])
@pytest.mark.parametrize("thr,skip", sample([(0.55, 0.0), (0.3, 0.2), (0.8, 0.0)], 2))
def test_wbf_equals_plain_loop(impl, dtype, conf_type, thr, skip):
    boxes, scores, cls = clustered(200, 15, dtype, seed=17, n_classes=3)
    boxes[7, 2] = boxes[7, 0]  # zero width: left out, as ensemble_boxes does
    got_boxes, got_scores, got_labels = weighted_boxes_fusion(boxes, scores, cls, thr, skip, conf_type, impl=impl)
    want = loop_wbf(boxes, scores, cls, thr, skip, conf_type)
    assert got_labels.tolist() == [int(cls[r[0]]) for r in want]
    close(got_boxes, [r[1] for r in want], dtype, atol=1e-9)
    close(got_scores, [r[2] for r in want], dtype)
    index, _, _ = batched_weighted_boxes_fusion(boxes, scores, cls, thr, skip, conf_type, impl=impl)
    assert index.tolist() == [r[0] for r in want] and 7 not in index.tolist()


def _realistic(n, centres, classes, seed):
    """Pre-NMS-like boxes in an 800 x 1216 image (the NMS benchmark's recipe), float64 pixels, distinct scores."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(centres, dtype=torch.float64).uniform_(math.log(16), math.log(400), generator=g))
    ctr = torch.rand(centres, 2, generator=g, dtype=torch.float64) * torch.tensor([1216.0, 800.0])
    which = torch.randint(0, centres, (n,), generator=g)
    jit = torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.12
    wh = side[which, None] * torch.exp(jit[:, 2:])
    xy = ctr[which] + jit[:, :2] * side[which, None]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, 1216)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, 800)
    labels = torch.randint(0, classes, (centres,), generator=g)[which]
    return boxes, torch.rand(n, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("conf_type", sample(["avg", "max"], 2))
@pytest.mark.parametrize("dtype", DTYPES)
def test_wbf_matches_ensemble_boxes(conf_type, dtype):
    import ensemble_boxes  # in the [test] extras
    boxes, scores, labels = _realistic(3000, 180, 3, seed=18)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    scale = torch.tensor([1216.0, 800.0, 1216.0, 800.0], dtype=torch.float64)
    got_boxes, got_scores, got_labels = weighted_boxes_fusion(boxes, scores, labels, 0.55, 0.0, conf_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "zero area box skipped" notes
        want_boxes, want_scores, want_labels = ensemble_boxes.weighted_boxes_fusion(
            [(boxes.double() / scale).numpy()], [scores.double().numpy()], [labels.numpy()],
            iou_thr=0.55, skip_box_thr=0.0, conf_type=conf_type)
    assert len(got_boxes) == len(want_boxes) and 300 < len(want_boxes) < 2000
    assert got_labels.tolist() == want_labels.astype(np.int64).tolist()
    np.testing.assert_allclose(got_scores.double().numpy(), want_scores, rtol=1e-6, atol=0)
    np.testing.assert_allclose((got_boxes.double() / scale).numpy(), want_boxes, rtol=0, atol=1e-5)


def test_wbf_known_cluster():
    # three boxes of one object fuse into their score-weighted mean; the far box stays alone.
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [50, 50, 60, 60.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.6, 0.3, 0.5], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 1])
    b, s, lab = weighted_boxes_fusion(boxes, scores, labels)
    want = (0.9 * boxes[0] + 0.6 * boxes[1] + 0.3 * boxes[2]) / 1.8
    torch.testing.assert_close(b[0], want, rtol=1e-12, atol=0)
    assert b[1].tolist() == [50, 50, 60, 60] and s.tolist() == pytest.approx([0.6, 0.5]) and lab.tolist() == [1, 1]
    assert weighted_boxes_fusion(boxes, scores, labels, conf_type="max")[1].tolist() == [0.9, 0.5]
    assert len(weighted_boxes_fusion(boxes, scores, torch.tensor([1, 2, 3, 1]))[0]) == 4  # labels never fuse


# -------------------------------------------------------------------------------------------- degenerate input
ALL_OPS = {
    "diou": lambda b, s, impl: (diou_nms(b, s, 0.5, impl=impl),),
    "batched_diou": lambda b, s, impl: (batched_diou_nms(b, s, torch.arange(len(s)) % 3, 0.5, impl=impl),),
    "matrix": lambda b, s, impl: (matrix_nms(b, s, impl=impl),),
    "matrix_linear": lambda b, s, impl: (batched_matrix_nms(b, s, torch.arange(len(s)) % 3, "linear", impl=impl),),
    "cluster": lambda b, s, impl: cluster_nms(b, s, 0.5, impl=impl),
    "cluster_all": lambda b, s, impl: batched_cluster_nms(b, s, torch.arange(len(s)) % 3, 0.5, True, True, True,
                                                          impl=impl),
    "voting": lambda b, s, impl: box_voting(b, s, 0.5, impl=impl),
    "wbf": lambda b, s, impl: weighted_boxes_fusion(b, s, torch.arange(len(s)) % 3, impl=impl),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_single_box(impl, op, dtype):
    for out in ALL_OPS[op](torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), impl):
        assert out.shape[0] == 0 and (out.dtype == torch.long or out.dtype == dtype)
    one = torch.tensor([[1, 2, 3, 4]], dtype=dtype)
    out = ALL_OPS[op](one, torch.tensor([0.5], dtype=dtype), impl)
    flat = [t.tolist() for t in out]
    assert [[1, 2, 3, 4]] in flat or [0] in flat or [0.5] in flat
    for t in out:
        assert t.shape[0] == 1 and t.tolist() in ([0], [0.5], [[1, 2, 3, 4]])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_area_boxes_overlap_nothing(impl):
    # An empty box has IoU 0 or 0/0 = NaN with everything: it neither suppresses, decays, votes nor fuses.
    boxes = torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 0], [0, 0, 10, 10], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert diou_nms(boxes, scores, 0.5, impl=impl).tolist() == [0, 1, 2, 3]
    assert cluster_nms(boxes, scores, 0.5, impl=impl)[0].tolist() == [0, 1, 2, 3]
    decayed = matrix_nms(boxes, scores, impl=impl)
    assert torch.equal(decayed[:4], scores[:4]) and float(decayed[4]) == pytest.approx(0.5 * math.exp(-2.0))
    keep, fused = box_voting(boxes, scores, 0.5, impl=impl)
    assert keep.tolist() == [0, 1, 2, 3] and torch.equal(fused, boxes[:4])  # box 3's twin votes: same box
    b, s, _ = weighted_boxes_fusion(boxes, scores, torch.zeros(5, dtype=torch.long), impl=impl)
    assert b.tolist() == [[0, 0, 10, 10]] and s.tolist() == pytest.approx([0.55])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_scores_keep_boxes_where_weights_vanish(impl):
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.5], [0, 0, 9.5, 10]], dtype=torch.float64)
    scores = torch.zeros(3, dtype=torch.float64)
    keep, fused = box_voting(boxes, scores, 0.5, impl=impl)
    assert keep.tolist() == [0] and torch.equal(fused, boxes[:1])
    keep, _, fused = cluster_nms(boxes, scores, 0.5, weighted=True, impl=impl)
    assert keep.tolist() == [0] and torch.equal(fused, boxes[:1])
    b, s, _ = weighted_boxes_fusion(boxes, scores, torch.zeros(3, dtype=torch.long), impl=impl)
    torch.testing.assert_close(b[0], boxes.mean(0), rtol=1e-12, atol=0)  # no weights: the plain mean
    assert s.tolist() == [0.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_rank_by_index(impl):
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10.5, 10], [30, 30, 40, 40.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert diou_nms(boxes, scores, 0.5, impl=impl).tolist() == [0, 3]
    assert cluster_nms(boxes, scores, 0.5, impl=impl)[0].tolist() == [0, 3]
    assert box_voting(boxes, scores, 0.5, impl=impl)[0].tolist() == [0, 3]
    assert float(matrix_nms(boxes, scores, impl=impl)[0]) == 0.5  # box 0 ranks first: not decayed
    index, _, _ = batched_weighted_boxes_fusion(boxes, scores, None, impl=impl)
    assert index.tolist() == [0, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_scores_and_coordinates_raise_one_clear_line(impl):
    boxes, scores, cls = clustered(10, 3, torch.float32, seed=0)
    bad_scores = scores.clone()
    bad_scores[4] = float("nan")
    bad_boxes = boxes.clone()
    bad_boxes[6, 2] = float("nan")
    inf_boxes = boxes.clone()
    inf_boxes[2, 0] = float("-inf")
    for fn in ALL_OPS.values():
        with pytest.raises(ValueError, match=r"scores contains NaN \(first at index 4\)") as e:
            fn(boxes, bad_scores, impl)
        assert "\n" not in str(e.value)
        for b, row in ((bad_boxes, 6), (inf_boxes, 2)):
            with pytest.raises(ValueError, match=rf"boxes must be finite .* at row {row}$") as e:
                fn(b, scores, impl)
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("call,match", [
    (lambda b, s: box_voting(b, -s, 0.5), "voting weights: they must be finite and >= 0, got -"),
    (lambda b, s: cluster_nms(b, s - 1, 0.5, weighted=True), "weights of the weighted coordinates"),
    (lambda b, s: weighted_boxes_fusion(b, s.index_fill(0, torch.tensor([2]), math.inf), s.long(), 0.5),
     "fusion weights: they must be finite, got inf at index 2"),
    (lambda b, s: diou_nms(b, s, 1.5), "iou_threshold must be >= 0 and <= 1"),
    (lambda b, s: diou_nms(b, s, 0.5, beta=0), "beta must be > 0"),
    (lambda b, s: diou_nms(b, s, 0.5, beta=math.inf), "beta must be a finite number > 0"),
    (lambda b, s: matrix_nms(b, s, "box"), "kernel must be one of 'gaussian', 'linear'"),
    (lambda b, s: matrix_nms(b, s, sigma=-1), "sigma must be > 0"),
    (lambda b, s: cluster_nms(b, s, 0.5, spm="yes"), "spm must be True or False"),
    (lambda b, s: cluster_nms(b, s, 0.5, sigma=0.0), "sigma must be > 0"),
    (lambda b, s: cluster_nms(b, s, 0.5, score_threshold=math.nan), "score_threshold"),
    (lambda b, s: cluster_nms(b, s, 0.5, weight_threshold=2), "weight_threshold must be >= 0 and <= 1"),
    (lambda b, s: cluster_nms(b, s, 0.5, max_iterations=0), "max_iterations must be an integer >= 1"),
    (lambda b, s: box_voting(b, s, 0.5, vote_threshold=0.0), "vote_threshold must be > 0 and <= 1"),
    (lambda b, s: weighted_boxes_fusion(b, s, s, 0.5), "labels must hold integer category ids"),
    (lambda b, s: weighted_boxes_fusion(b, s, s.long(), conf_type="box_and_model_avg"), "conf_type must be one of"),
    (lambda b, s: weighted_boxes_fusion(b, s, s.long(), skip_box_threshold=-0.1), "skip_box_threshold must be >= 0"),
    (lambda b, s: batched_diou_nms(b, s, s, 0.5), "idxs must hold integer category ids"),
    (lambda b, s: diou_nms(b[:, :3], s, 0.5), r"Tensor\[N, 4\]"),
    (lambda b, s: diou_nms(b, s[:-1], 0.5), "N = 10"),
    (lambda b, s: diou_nms(b, s, 0.5, impl="gpu"), "impl must be one of"),
    (lambda b, s: matrix_nms(b, s, impl="cuda"), "impl='cuda': the post-processing ops have no CUDA kernels"),
])
def test_bad_input_is_one_clear_value_error(call, match):
    boxes, scores, _ = clustered(10, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match) as e:
        call(boxes, scores)
    assert "\n" not in str(e.value)


def test_kernels_check_their_input_when_called_directly():
    # torch.ops.iouctl.* bypasses the Python checks: NaN must still not reach std::sort, nor a bad shape be read.
    b = torch.rand(5, 4)
    s = torch.tensor([0.1, float("nan"), 0.3, 0.2, 0.5])
    ops = torch.ops.iouctl
    with pytest.raises(ValueError, match="NaN"):
        ops.diou_nms(b, s, None, 0.5, 1.0)
    with pytest.raises(ValueError, match="boxes must be Tensor"):
        ops.matrix_nms(torch.rand(5, 3), s, None, "gaussian", 2.0)
    with pytest.raises(ValueError, match="idxs"):
        ops.box_voting(b, b[:, 0], torch.zeros(4, dtype=torch.long), 0.5, 0.8)
    with pytest.raises(ValueError, match="max_iterations"):
        ops.cluster_nms(b, b[:, 0], None, 0.5, False, False, False, 0.2, 0.6, 0.8, 0.01, 0)
    with pytest.raises(ValueError, match="conf_type"):
        ops.weighted_boxes_fusion(b, b[:, 0], None, 0.55, 0.0, "sum")


# ------------------------------------------------------------------------------ fuzz, determinism, registration
_coord = st.sampled_from([0.0, 1.0, 2.0, 2.5, 5.0, 10.0, 10.5, 20.0, -3.0])


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(0, 16), dtype=st.sampled_from(DTYPES), thr=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_fuzz_no_crash_and_kernel_equals_reference(data, n, dtype, thr):
    # coarse coordinates: duplicates, empty and inverted boxes and exact IoU ties are common
    boxes = torch.tensor(data.draw(st.lists(st.lists(_coord, min_size=4, max_size=4), min_size=n, max_size=n)),
                         dtype=dtype).reshape(n, 4)
    scores = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n)),
                          dtype=dtype)
    cls = torch.tensor(data.draw(st.lists(st.integers(-1, 1), min_size=n, max_size=n)), dtype=torch.long)
    variant = data.draw(st.sampled_from(VARIANTS))
    for fn in (lambda impl: (batched_diou_nms(boxes, scores, cls, thr, 1.0, impl=impl),),
               lambda impl: (batched_matrix_nms(boxes, scores, cls, "linear", impl=impl),),
               lambda impl: batched_cluster_nms(boxes, scores, cls, thr, **variant, beta=1.0, impl=impl),
               lambda impl: batched_box_voting(boxes, scores, cls, thr, 0.5, impl=impl),
               lambda impl: batched_weighted_boxes_fusion(boxes, scores, cls, thr, 0.0, "avg", impl=impl)):
        got, want = fn("cpp"), fn("reference")
        assert got[0].tolist() == want[0].tolist()
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=RTOL[dtype], atol=1e-12)
        assert len(set(got[0].tolist())) == len(got[0]) or got[0].dtype != torch.long
    assert batched_diou_nms(boxes, scores, None, thr, 1.0).tolist() == loop_diou_nms(boxes, scores, thr, 1.0)
    close(matrix_nms(boxes, scores), loop_matrix_nms(boxes, scores, "gaussian", 2.0), dtype)


def test_results_do_not_depend_on_thread_count():
    # 2 groups x ~6000 boxes: enough pairwise work that the kernels run the groups in parallel
    boxes, scores, cls = clustered(12000, 700, torch.float32, seed=3, ties=True, n_classes=2)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append([(batched_diou_nms(boxes, scores, cls, 0.5, 0.6),),
                         (batched_matrix_nms(boxes, scores, cls),),
                         batched_cluster_nms(boxes, scores, cls, 0.5, True, True, True),
                         batched_box_voting(boxes, scores, cls, 0.5),
                         batched_weighted_boxes_fusion(boxes, scores, cls)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(dtype):
    boxes, scores, _ = clustered(200, 15, torch.float32, seed=6, spread=0.08)
    low, low_s = boxes.to(dtype), scores.to(dtype)
    assert torch.equal(diou_nms(low, low_s, 0.5), diou_nms(low.float(), low_s.float(), 0.5))
    keep, fused = box_voting(low, low_s, 0.5)
    want_keep, want_fused = box_voting(low.float(), low_s.float(), 0.5)
    assert torch.equal(keep, want_keep) and fused.dtype == dtype and torch.equal(fused, want_fused.to(dtype))
    assert matrix_nms(low, low_s).dtype == dtype


def test_requires_grad_and_noncontiguous_inputs():
    boxes, scores, _ = clustered(120, 8, torch.float64, seed=12, spread=0.08)
    wide = torch.zeros(120, 8, dtype=torch.float64)
    wide[:, ::2] = boxes  # a strided view
    strided = wide[:, ::2].requires_grad_(False)
    leaf = boxes.clone().requires_grad_(True)
    for b in (strided, leaf):
        keep, fused = box_voting(b, scores, 0.5)
        want = box_voting(boxes, scores, 0.5)
        assert torch.equal(keep, want[0]) and torch.equal(fused, want[1]) and not fused.requires_grad


@pytest.mark.parametrize("op,args", [
    ("diou_nms", lambda b, s, c: (b, s, c, 0.5, 0.6)),
    ("matrix_nms", lambda b, s, c: (b, s, None, "gaussian", 2.0)),
    ("cluster_nms", lambda b, s, c: (b, s, c, 0.5, True, True, True, 0.2, 0.6, 0.8, 0.01, 200)),
    ("box_voting", lambda b, s, c: (b, s, None, 0.5, 0.8)),
    ("weighted_boxes_fusion", lambda b, s, c: (b, s, c, 0.55, 0.0, "avg")),
])
def test_opcheck(op, args):
    diou_nms(torch.rand(2, 4), torch.rand(2), 0.5)  # loads the library and registers the fake kernels
    boxes, scores, cls = clustered(40, 4, torch.float32, seed=13, n_classes=2)
    result = torch.library.opcheck(getattr(torch.ops.iouctl, op).default, args(boxes, scores, cls))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.cuda
def test_cuda_tensors_run_the_cpu_kernel_on_a_host_copy():
    boxes, scores, cls = clustered(2000, 150, torch.float32, seed=14, n_classes=5, spread=0.08)
    dev = [t.cuda() for t in (boxes, scores, cls)]
    cases = [(batched_diou_nms, (0.5,)), (batched_matrix_nms, ()), (batched_box_voting, (0.5,)),
             (batched_weighted_boxes_fusion, ()), (batched_cluster_nms, (0.5, True, True, True))]
    for fn, extra in cases:
        want = fn(boxes, scores, cls, *extra)
        for impl in ("auto", "reference"):
            got = fn(*dev, *extra, impl=impl)
            got = got if isinstance(got, tuple) else (got,)
            want_t = want if isinstance(want, tuple) else (want,)
            assert all(g.device.type == "cuda" for g in got)
            assert got[0].cpu().tolist() == want_t[0].tolist()
            for g, w in zip(got[1:], want_t[1:]):
                torch.testing.assert_close(g.cpu(), w, rtol=2.4e-7, atol=1e-4)
