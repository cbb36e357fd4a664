"""NMS family: C++ kernels and PyTorch references against plain Python loops, torchvision, and each other.

The oracles below are written independently of both implementations: plain loops over numpy scalars of the box
dtype (numpy rounds every float32 operation to float32, as the kernel does), comparing the overlap with the threshold
in float64 (as torchvision's kernel does). Because the IoU expression and the comparison are the same, keep sets and
Soft-NMS scores are compared *exactly*; there is no tolerance to justify except in ``iou_aware_score``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iouctl.ops.nms import (
    batched_iou_guided_nms,
    batched_nms,
    batched_soft_nms,
    iou_aware_score,
    iou_guided_nms,
    nms,
    soft_nms,
)
from tests.box_loops import NP, loop_kernel_iou, numpy_rows
from tests.ops.common import DTYPES, IMPLS, clustered, require_library
from tests.lanes import sample

_built = require_library("nms")


# ----------------------------------------------------------------------------------------------- plain loops
def loop_iou_guided(boxes, scores, ious, thr):
    """IoU-Net Algorithm 1, literally: returns (keep, cluster scores) as Python lists."""
    f = NP[boxes.dtype]
    rows, cls, rank = numpy_rows(boxes), scores.double().tolist(), ious.double().tolist()
    remaining = sorted(range(len(rows)), key=lambda i: (-rank[i], i))
    keep, cluster = [], []
    while remaining:
        m, rest = remaining[0], remaining[1:]
        s = cls[m]
        survivors = []
        for j in rest:
            if float(loop_kernel_iou(rows[m], rows[j], f)) > thr:
                s = max(s, cls[j])
            else:
                survivors.append(j)
        keep.append(m)
        cluster.append(s)
        remaining = survivors
    return keep, cluster


def loop_soft(boxes, scores, method, sigma, thr, score_threshold):
    """Soft-NMS literally: pick the max (lowest index among ties), decay the rest, drop under the threshold."""
    f = NP[boxes.dtype]
    rows, s = numpy_rows(boxes), scores.double().tolist()
    alive = [i for i in range(len(rows)) if s[i] >= score_threshold]
    keep, kept = [], []
    while alive:
        m = max(alive, key=lambda i: (s[i], -i))
        keep.append(m)
        kept.append(s[m])
        alive.remove(m)
        nxt = []
        for j in alive:
            o = float(loop_kernel_iou(rows[m], rows[j], f))
            if method == "gaussian":
                w = math.exp(-(o * o) / sigma) if o > 0 else 1.0
            else:
                w = 1.0 - o if o > thr else 1.0
            s[j] = s[j] * w
            if s[j] >= score_threshold:
                nxt.append(j)
        alive = nxt
    return keep, kept


def per_class(fn, idxs, rank_of, *args):
    """Run a single-class loop on each category; merge by decreasing merge key, ties by increasing index."""
    keep, vals = [], []
    for c in sorted(set(idxs.tolist())):
        members = [i for i, v in enumerate(idxs.tolist()) if v == c]
        sel = torch.tensor(members)
        k, v = fn(*[a[sel] if isinstance(a, torch.Tensor) else a for a in args])
        keep += [members[i] for i in k]
        vals += v
    key = rank_of(keep, vals)
    order = sorted(range(len(keep)), key=lambda q: (-key[q], keep[q]))
    return [keep[q] for q in order], [vals[q] for q in order]


# ------------------------------------------------------------------------------------------------ generators
def uniform(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], 1).to(dtype)
    return boxes, torch.rand(n, generator=g).to(dtype), torch.rand(n, generator=g).to(dtype)


CASES = [  # (name, n, ties)
    ("clustered", 150, False),
    ("clustered-ties", 150, True),
]


# -------------------------------------------------------------------------------------------- IoU-guided NMS
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,n,ties", CASES)
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_iou_guided_equals_plain_loop(impl, dtype, name, n, ties, thr):
    boxes, scores, ious, _ = clustered(n, 12, dtype, seed=n + int(thr * 10), ties=ties, with_ious=True)
    keep, cluster = iou_guided_nms(boxes, scores, ious, thr, impl=impl)
    want_keep, want_cluster = loop_iou_guided(boxes, scores, ious, thr)
    assert keep.tolist() == want_keep
    assert cluster.dtype == scores.dtype
    assert cluster.tolist() == torch.tensor(want_cluster, dtype=torch.float64).to(dtype).tolist()
    if thr < 1.0 and not ties:
        assert len(keep) < n  # the clusters really overlap: the test exercises suppression


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_guided_uniform_boxes(impl, dtype):
    boxes, scores, ious = uniform(120, dtype, seed=3)
    keep, cluster = iou_guided_nms(boxes, scores, ious, 0.4, impl=impl)
    want_keep, want_cluster = loop_iou_guided(boxes, scores, ious, 0.4)
    assert keep.tolist() == want_keep
    assert cluster.tolist() == torch.tensor(want_cluster, dtype=torch.float64).to(dtype).tolist()


def test_cluster_score_is_max_of_suppressed_cls():
    # Box 1 has the best IoU, box 0 the best cls score and is suppressed by 1: box 1 inherits 0.9 (Alg. 1).
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60], [0, 0, 10, 12.0]])
    scores = torch.tensor([0.9, 0.2, 0.3, 0.5])
    ious = torch.tensor([0.6, 0.95, 0.7, 0.1])
    keep, cluster = iou_guided_nms(boxes, scores, ious, 0.5)
    assert keep.tolist() == [1, 2]
    assert torch.equal(cluster, scores[[0, 2]])  # box 1's cluster {1, 0, 3} has best cls 0.9 (box 0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_greedy_equals_torchvision(dtype, ties):
    boxes, scores, _, _ = clustered(3000, 200, dtype, seed=11, ties=ties, with_ious=True)
    for thr in (0.3, 0.5, 0.7):
        want = torchvision.ops.nms(boxes, scores, thr)
        assert torch.equal(nms(boxes, scores, thr), want)
        assert torch.equal(nms(boxes, scores, thr, impl="reference"), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_iou_guided_equals_per_class_loop(impl, dtype):
    boxes, scores, ious, cls = clustered(160, 16, dtype, seed=5, ties=True, n_classes=4, with_ious=True)
    keep, cluster = batched_iou_guided_nms(boxes, scores, ious, cls, 0.5, impl=impl)
    rank = ious.double().tolist()
    want_keep, want_cluster = per_class(lambda b, s, i: loop_iou_guided(b, s, i, 0.5), cls,
                                        lambda k, v: [rank[i] for i in k], boxes, scores, ious)
    assert keep.tolist() == want_keep
    assert cluster.tolist() == torch.tensor(want_cluster, dtype=torch.float64).to(dtype).tolist()


def test_batched_at_scale_equals_single_class_calls():
    # 20k float32 boxes, 80 classes (the benchmark's shape): the batched kernel == one kernel call per class.
    boxes, scores, ious, cls = clustered(20000, 1500, torch.float32, seed=8, n_classes=80, with_ious=True)
    keep, cluster = batched_iou_guided_nms(boxes, scores, ious, cls, 0.5)
    parts_k, parts_c = [], []
    for c in cls.unique():
        m = (cls == c).nonzero().flatten()
        k, cs = iou_guided_nms(boxes[m], scores[m], ious[m], 0.5)
        parts_k.append(m[k])
        parts_c.append(cs)
    k_all, c_all = torch.cat(parts_k), torch.cat(parts_c)
    order = sorted(range(len(k_all)), key=lambda q: (-float(ious[k_all[q]]), int(k_all[q])))
    assert keep.tolist() == k_all[order].tolist()
    assert torch.equal(cluster, c_all[order])
    # torchvision agrees on the kept set (its final sort is not stable, so only the set is compared)
    assert set(batched_nms(boxes, ious, cls, 0.5).tolist()) == set(
        torchvision.ops.batched_nms(boxes, ious, cls, 0.5).tolist())


def test_batched_exact_where_coordinate_offsets_are_not():
    # Two classes with identical boxes at huge coordinates: per-class NMS must keep one box per class. The offset
    # trick (add class * (max coordinate + 1)) loses the sub-unit differences in float32 at this magnitude.
    base = torch.tensor([[1.0e6, 1.0e6, 1.0e6 + 2.0, 1.0e6 + 2.0], [1.0e6 + 1.0, 1.0e6, 1.0e6 + 3.0, 1.0e6 + 2.0]])
    boxes = torch.cat([base, base])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    cls = torch.tensor([0, 0, 1, 1])
    # IoU of the two boxes of a class is 1/3 < 0.5: both survive in each class
    assert batched_nms(boxes, scores, cls, 0.5).tolist() == [0, 1, 2, 3]
    assert batched_nms(boxes, scores, cls, 0.5, impl="reference").tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------- Soft-NMS
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("name,n,ties", CASES)
def test_soft_nms_equals_plain_loop(impl, dtype, method, name, n, ties):
    boxes, scores, _, _ = clustered(n, 10, dtype, seed=21 + n, ties=ties, with_ious=True)
    keep, new = soft_nms(boxes, scores, method=method, sigma=0.5, iou_threshold=0.3, score_threshold=0.05, impl=impl)
    want_keep, want_new = loop_soft(boxes, scores, method, 0.5, 0.3, 0.05)
    assert keep.tolist() == want_keep
    assert new.dtype == scores.dtype
    assert new.tolist() == torch.tensor(want_new, dtype=torch.float64).to(dtype).tolist()
    assert 0 < len(keep) < n  # some boxes decayed under the threshold
    assert all(a >= b for a, b in zip(want_new, want_new[1:]))  # selection order = non-increasing score


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_thresholds_and_sigma(method):
    boxes, scores, _, _ = clustered(100, 6, torch.float64, seed=2, with_ious=True)
    for sigma, thr, st_ in [(0.1, 0.0, 0.0), (2.0, 0.9, 0.3), (0.5, 1.0, 0.0)]:
        keep, new = soft_nms(boxes, scores, method, sigma, thr, st_)
        wk, wn = loop_soft(boxes, scores, method, sigma, thr, st_)
        assert keep.tolist() == wk and new.tolist() == wn


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_negative_scores(method):
    # A decay would raise a negative score; score_threshold >= 0 drops them first, so the kernel's order holds.
    boxes, scores, _, _ = clustered(80, 5, torch.float64, seed=21, with_ious=True)
    scores = scores * 2 - 1
    keep, new = soft_nms(boxes, scores, method, 0.5, 0.3, 0.0)
    wk, wn = loop_soft(boxes, scores, method, 0.5, 0.3, 0.0)
    assert keep.tolist() == wk and new.tolist() == wn and bool((new >= 0).all())
    with pytest.raises(ValueError, match="score_threshold must be >= 0"):
        soft_nms(boxes, scores, method, 0.5, 0.3, -1.0)


def test_soft_nms_known_values():
    # Two boxes with IoU 81/119; gaussian decays the second by exp(-IoU^2/0.5), linear by (1 - IoU).
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    iou = 81 / 119
    keep, new = soft_nms(boxes, scores, "gaussian", 0.5, 0.3, 0.001)
    assert keep.tolist() == [0, 2, 1]
    assert new.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-iou * iou / 0.5)], rel=1e-15)
    keep, new = soft_nms(boxes, scores, "linear", 0.5, 0.3, 0.001)
    assert new.tolist() == pytest.approx([0.9, 0.7, 0.8 * (1 - iou)], rel=1e-15)
    keep, new = soft_nms(boxes, scores, "linear", 0.5, 0.7, 0.001)  # IoU 0.68 <= 0.7: no decay
    assert keep.tolist() == [0, 1, 2] and new.tolist() == [0.9, 0.8, 0.7]


def _with_degenerate_leaders(boxes, scores):
    """Give the top scores to odd boxes, so they are selected early: inverted, zero-size, NaN, inf, huge."""
    nan, inf = float("nan"), float("inf")
    odd = [[50, 50, 40, 40], [60, 60, 60, 60], [nan, 10, 20, 30], [10, 10, inf, 30], [-1e30, -1e30, 1e30, 1e30],
           [100, 100, 100, 140], [-inf, -inf, inf, inf]]
    for k, row in enumerate(odd):
        boxes[k] = torch.tensor(row, dtype=boxes.dtype)
        scores[k] = 0.999 - 0.001 * k
    return boxes, scores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sample(["linear", "gaussian"], 2))
def test_soft_nms_many_blocks(dtype, method):
    # The kernel visits only blocks of 64 boxes (Morton order) whose rectangle meets the selected box; the reference
    # and the loop scan everything, so equality here checks that the skipping is exact.
    boxes, scores, _, cls = clustered(1500, 90, dtype, seed=31, n_classes=3, with_ious=True)
    boxes, scores = _with_degenerate_leaders(boxes, scores)
    got = soft_nms(boxes, scores, method, 0.5, 0.3, 0.01)
    want = soft_nms(boxes, scores, method, 0.5, 0.3, 0.01, impl="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = batched_soft_nms(boxes, scores, cls, method, 0.5, 0.3, 0.01)
    want = batched_soft_nms(boxes, scores, cls, method, 0.5, 0.3, 0.01, impl="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    keep, new = soft_nms(boxes[:300], scores[:300], method, 0.5, 0.3, 0.01)
    wk, wn = loop_soft(boxes[:300], scores[:300], method, 0.5, 0.3, 0.01)
    assert keep.tolist() == wk and new.tolist() == torch.tensor(wn, dtype=torch.float64).to(dtype).tolist()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_batched_soft_nms_equals_per_class_loop(impl, method):
    boxes, scores, _, cls = clustered(150, 14, torch.float32, seed=9, ties=True, n_classes=3, with_ious=True)
    keep, new = batched_soft_nms(boxes, scores, cls, method, 0.5, 0.3, 0.02, impl=impl)
    want_keep, want_new = per_class(lambda b, s: loop_soft(b, s, method, 0.5, 0.3, 0.02), cls,
                                    lambda k, v: v, boxes, scores)
    assert keep.tolist() == want_keep
    assert new.tolist() == torch.tensor(want_new, dtype=torch.float64).float().tolist()


def test_batched_soft_with_one_class_is_soft():
    boxes, scores, _, _ = clustered(300, 20, torch.float32, seed=4, with_ious=True)
    a = soft_nms(boxes, scores)
    b = batched_soft_nms(boxes, scores, torch.full((300,), 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------- iou_aware_score
def test_iou_aware_score_formula():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 3, generator=g, dtype=torch.float64)
    q = torch.rand(50, 1, generator=g, dtype=torch.float64)
    for a in (0.0, 0.3, 0.5, 1.0):
        got = iou_aware_score(p, q, cls_weight=a)
        want = [[math.pow(p[i, c].item(), a) * math.pow(q[i, 0].item(), 1 - a) for c in range(3)] for i in range(50)]
        # float64 pow in two libraries (torch vs libm): a few ulp, 1e-14 relative is generous and still exact enough
        assert got.tolist() == [pytest.approx(r, rel=1e-14, abs=0) for r in want]
    assert torch.equal(iou_aware_score(p, q, 1.0), p)  # all weight on cls: the cls score itself
    assert torch.equal(iou_aware_score(p, q, 0.0), q.expand(50, 3))


def test_iou_aware_score_clamps_and_keeps_nan():
    p = torch.tensor([0.25, 1.2, -0.1, float("nan")])
    q = torch.tensor([1.02, 0.25, 0.5, 0.5])
    got = iou_aware_score(p, q, 0.5)
    assert got[:3].tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-7)  # float32 sqrt: 1 ulp
    assert math.isnan(got[3])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_iou_aware_score_rejects_bad_weight(bad):
    with pytest.raises(ValueError, match="cls_weight"):
        iou_aware_score(torch.rand(3), torch.rand(3), cls_weight=bad)


def test_iou_aware_score_rejects_bad_tensors():
    with pytest.raises(ValueError, match="broadcastable"):
        iou_aware_score(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="floating"):
        iou_aware_score(torch.ones(3, dtype=torch.long), torch.rand(3))


# -------------------------------------------------------------------------------------------- degenerate input
ALL_OPS = {
    "iou_guided": lambda b, s, impl: iou_guided_nms(b, s, s.flip(0), 0.5, impl=impl),
    "batched_iou_guided": lambda b, s, impl: batched_iou_guided_nms(
        b, s, s.flip(0), torch.arange(len(s)) % 3, 0.5, impl=impl),
    "soft": lambda b, s, impl: soft_nms(b, s, impl=impl),
    "batched_soft": lambda b, s, impl: batched_soft_nms(b, s, torch.arange(len(s)) % 3, impl=impl),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_single_box(impl, op, dtype):
    keep, vals = ALL_OPS[op](torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), impl)
    assert keep.shape == (0,) and keep.dtype == torch.long and vals.shape == (0,) and vals.dtype == dtype
    keep, vals = ALL_OPS[op](torch.tensor([[1, 2, 3, 4]], dtype=dtype), torch.tensor([0.5], dtype=dtype), impl)
    assert keep.tolist() == [0] and vals.tolist() == [0.5]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_area_boxes_neither_suppress_nor_are_suppressed(impl):
    # IoU of a zero-area box is 0/0 = NaN, which is not > threshold: as torchvision.ops.nms.
    boxes = torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 0], [0, 0, 10, 10], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert nms(boxes, scores, 0.5, impl=impl).tolist() == [0, 1, 2, 3]
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [0, 1, 2, 3]
    for method in ("linear", "gaussian"):
        keep, new = soft_nms(boxes, scores, method, impl=impl)
        assert torch.equal(new[:4], scores[:4])  # zero-area boxes decay nothing and are not decayed
        # box 4 is box 3's twin (IoU 1): linear decays it to 0 (dropped), gaussian by exp(-1 / 0.5)
        assert keep.tolist() == ([0, 1, 2, 3] if method == "linear" else [0, 1, 2, 3, 4])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_coordinates_match_the_loop(impl, dtype):
    boxes, scores, ious, _ = clustered(60, 5, dtype, seed=1, with_ious=True)
    boxes[3, 0] = float("nan")
    boxes[7] = float("nan")
    boxes[11, 2] = float("inf")
    boxes[13, :2] = float("-inf")
    boxes[17] = torch.tensor([10.0, 10.0, 0.0, 0.0], dtype=dtype)  # inverted
    keep, cluster = iou_guided_nms(boxes, scores, ious, 0.5, impl=impl)
    wk, wc = loop_iou_guided(boxes, scores, ious, 0.5)
    assert keep.tolist() == wk and cluster.tolist() == torch.tensor(wc, dtype=torch.float64).to(dtype).tolist()
    for method in ("linear", "gaussian"):
        keep, new = soft_nms(boxes, scores, method, 0.5, 0.3, 0.01, impl=impl)
        wk, wn = loop_soft(boxes, scores, method, 0.5, 0.3, 0.01)
        assert keep.tolist() == wk and new.tolist() == torch.tensor(wn, dtype=torch.float64).to(dtype).tolist()
    if dtype == torch.float32:
        assert torch.equal(nms(boxes, scores, 0.5, impl=impl), torchvision.ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_scores_raise_one_clear_line(impl):
    boxes, scores, ious, cls = clustered(10, 3, torch.float32, seed=0, with_ious=True)
    scores[4] = float("nan")
    for call in (lambda: iou_guided_nms(boxes, scores, ious, 0.5, impl=impl),
                 lambda: iou_guided_nms(boxes, ious, scores, 0.5, impl=impl),
                 lambda: batched_iou_guided_nms(boxes, ious, scores, cls, 0.5, impl=impl),
                 lambda: nms(boxes, scores, 0.5, impl=impl)):
        with pytest.raises(ValueError, match=r"contains NaN \(first at index 4\)") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="finite"):
        soft_nms(boxes, scores, impl=impl)
    scores[4] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        batched_soft_nms(boxes, scores, cls, impl=impl)


def test_infinite_ranks_are_ordered():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30.0]])
    rank = torch.tensor([float("-inf"), float("inf"), 0.5, float("-inf")])
    keep, cluster = iou_guided_nms(boxes, rank, rank, 0.5)
    assert keep.tolist() == [1, 3] and cluster.tolist() == [float("inf"), float("-inf")]


def test_kernel_refuses_nan_when_called_directly():
    # torch.ops.iouctl.* bypasses the Python checks; NaN must still not reach std::sort.
    b = torch.rand(5, 4)
    s = torch.tensor([0.1, float("nan"), 0.3, 0.2, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.iouctl.iou_guided_nms(b, s, s, 0.5)
    with pytest.raises(ValueError, match="boxes must be Tensor"):
        torch.ops.iouctl.soft_nms(torch.rand(5, 3), s, "linear", 0.5, 0.3, 0.0)
    with pytest.raises(ValueError, match="idxs"):
        torch.ops.iouctl.batched_iou_guided_nms(b, b[:, 0], b[:, 0], torch.zeros(4, dtype=torch.long), 0.5)


@pytest.mark.parametrize("call,match", [
    (lambda: nms(torch.rand(4, 5), torch.rand(4), 0.5), r"Tensor\[N, 4\]"),
    (lambda: nms(torch.ones(4, 4, dtype=torch.long), torch.rand(4), 0.5), "floating point"),
    (lambda: nms(torch.rand(4, 4), torch.rand(3), 0.5), "N = 4"),
    (lambda: nms(torch.rand(4, 4), torch.rand(4, 1), 0.5), "N = 4"),
    (lambda: nms(torch.rand(4, 4), torch.ones(4, dtype=torch.long), 0.5), "floating point"),
    (lambda: nms(torch.rand(4, 4), torch.rand(4), 1.5), r"iou_threshold must be >= 0 and <= 1"),
    (lambda: nms(torch.rand(4, 4), torch.rand(4), float("nan")), "iou_threshold"),
    (lambda: nms(torch.rand(4, 4), torch.rand(4), 0.5, impl="gpu"), "impl must be one of"),
    (lambda: batched_nms(torch.rand(4, 4), torch.rand(4), torch.rand(4), 0.5), "integer category ids"),
    (lambda: batched_nms(torch.rand(4, 4), torch.rand(4), torch.zeros(4, dtype=torch.bool), 0.5), "integer"),
    (lambda: soft_nms(torch.rand(4, 4), torch.rand(4), method="hard"), "method must be one of"),
    (lambda: soft_nms(torch.rand(4, 4), torch.rand(4), sigma=0.0), "sigma must be > 0"),
    (lambda: soft_nms(torch.rand(4, 4), torch.rand(4), sigma=float("inf")), "sigma must be a finite"),
    (lambda: soft_nms(torch.rand(4, 4), torch.rand(4), score_threshold=float("nan")), "score_threshold"),
    (lambda: soft_nms([[0, 0, 1, 1]], torch.rand(1)), "boxes must be a Tensor"),
])
def test_bad_input_is_one_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ fuzz, determinism, registration
_special = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, float("nan"), float("inf"), float("-inf"), 5.0, 5.5])
_coord = st.one_of(st.floats(-50, 50, width=32), _special)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(0, 24), dtype=st.sampled_from(DTYPES),
       thr=st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_fuzz_no_crash_and_kernel_equals_reference(data, n, dtype, thr):
    boxes = torch.tensor(data.draw(st.lists(st.lists(_coord, min_size=4, max_size=4), min_size=n, max_size=n)),
                         dtype=dtype).reshape(n, 4)
    rank = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -2.0, float("inf"), 1e-30]),
                                           min_size=n, max_size=n)), dtype=dtype)
    scores = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)), dtype=dtype)
    cls = torch.tensor(data.draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n)), dtype=torch.long)
    for fn in (lambda impl: iou_guided_nms(boxes, scores, rank, thr, impl=impl),
               lambda impl: batched_iou_guided_nms(boxes, scores, rank, cls, thr, impl=impl),
               lambda impl: soft_nms(boxes, scores, "linear", 0.5, thr, 0.01, impl=impl),
               lambda impl: batched_soft_nms(boxes, scores, cls, "gaussian", 0.3, thr, 0.01, impl=impl)):
        k_cpp, v_cpp = fn("cpp")
        k_ref, v_ref = fn("reference")
        assert k_cpp.tolist() == k_ref.tolist()
        assert v_cpp.tolist() == v_ref.tolist()
        assert len(set(k_cpp.tolist())) == len(k_cpp) and all(0 <= i < n for i in k_cpp.tolist())
    keep, _ = iou_guided_nms(boxes, scores, rank, thr)
    assert keep.tolist() == loop_iou_guided(boxes, scores, rank, thr)[0]


def test_results_do_not_depend_on_thread_count():
    # 2 classes x ~8000 boxes: enough pairwise work that the kernels run the classes in parallel (class_grain)
    boxes, scores, ious, cls = clustered(16000, 1000, torch.float32, seed=3, ties=True, n_classes=2, with_ious=True)
    small = clustered(6000, 500, torch.float32, seed=4, ties=True, n_classes=40, with_ious=True)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append([batched_iou_guided_nms(boxes, scores, ious, cls, 0.5),
                         batched_soft_nms(boxes, scores, cls, "gaussian"),
                         batched_iou_guided_nms(*small, 0.5),
                         soft_nms(boxes[:800], scores[:800], "linear")])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_boxes_computed_in_float32(dtype):
    boxes, scores, ious, _ = clustered(200, 15, torch.float32, seed=6, with_ious=True)
    low = boxes.to(dtype)
    keep, cluster = iou_guided_nms(low, scores.to(dtype), ious, 0.5)
    want_keep, want_cluster = iou_guided_nms(low.float(), scores.to(dtype).float(), ious, 0.5)
    assert torch.equal(keep, want_keep) and cluster.dtype == dtype
    assert torch.equal(cluster.float(), want_cluster)
    assert torch.equal(iou_guided_nms(low, scores.to(dtype), ious, 0.5, impl="reference")[0], keep)


def test_requires_grad_inputs_are_accepted():
    boxes, scores, ious, cls = clustered(50, 5, torch.float32, seed=7, with_ious=True)
    boxes.requires_grad_(True)
    scores.requires_grad_(True)
    keep, cluster = batched_iou_guided_nms(boxes, scores, ious, cls, 0.5)
    assert not cluster.requires_grad
    assert torch.equal(keep, batched_iou_guided_nms(boxes.detach(), scores.detach(), ious, cls, 0.5)[0])
    keep, new = soft_nms(boxes, scores)
    assert not new.requires_grad and torch.equal(keep, soft_nms(boxes.detach(), scores.detach())[0])


def test_noncontiguous_boxes_work():
    boxes, scores, ious, _ = clustered(120, 8, torch.float64, seed=12, with_ious=True)
    wide = torch.zeros(120, 8, dtype=torch.float64)
    wide[:, ::2] = boxes  # a strided view
    keep, cluster = iou_guided_nms(wide[:, ::2], scores, ious, 0.5)
    want = iou_guided_nms(boxes, scores, ious, 0.5)
    assert torch.equal(keep, want[0]) and torch.equal(cluster, want[1])


@pytest.mark.parametrize("op,args", sample([
    ("iou_guided_nms", lambda b, s, c: (b, s, s.flip(0), 0.5)),
    ("batched_iou_guided_nms", lambda b, s, c: (b, s, s.flip(0), c, 0.5)),
    ("soft_nms", lambda b, s, c: (b, s, "gaussian", 0.5, 0.3, 0.001)),
    ("batched_soft_nms", lambda b, s, c: (b, s, c, "linear", 0.5, 0.3, 0.001)),
], 2))
def test_opcheck(op, args):
    nms(torch.rand(2, 4), torch.rand(2), 0.5)  # loads the library and registers the fake kernels
    boxes, scores, _, cls = clustered(40, 4, torch.float32, seed=13, n_classes=2, with_ious=True)
    result = torch.library.opcheck(getattr(torch.ops.iouctl, op).default, args(boxes, scores, cls))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_equals_cpu(dtype, ties):
    # The CUDA kernel uses round-to-nearest intrinsics for the IoU: results equal the CPU kernel's bit for bit.
    boxes, scores, ious, cls = clustered(3000, 200, dtype, seed=14, ties=ties, n_classes=7, with_ious=True)
    boxes, scores = _with_degenerate_leaders(boxes, scores)
    dev = [t.cuda() for t in (boxes, scores, ious, cls)]
    for thr in (0.0, 0.5, 0.7):
        want = batched_iou_guided_nms(boxes, scores, ious, cls, thr)
        got = batched_iou_guided_nms(*dev, thr, impl="cuda")
        assert got[0].device.type == "cuda"
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        want = iou_guided_nms(boxes, scores, ious, thr)
        got = iou_guided_nms(dev[0], dev[1], dev[2], thr, impl="cuda")
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert torch.equal(nms(dev[0], dev[1], 0.5).cpu(), torchvision.ops.nms(boxes, scores, 0.5))
    for method in ("linear", "gaussian"):
        want = batched_soft_nms(boxes, scores, cls, method)
        got = batched_soft_nms(dev[0], dev[1], dev[3], method)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    empty = iou_guided_nms(torch.zeros(0, 4, device="cuda"), torch.zeros(0, device="cuda"),
                           torch.zeros(0, device="cuda"), 0.5)
    assert empty[0].shape == (0,) and empty[0].device.type == "cuda"


def _op_error(device: str, idxs: torch.Tensor) -> str:
    """The message of the kernel (called directly, past the Python checks) for category ids ``idxs`` on ``device``."""
    boxes, scores = torch.rand(4, 4, device=device), torch.rand(4, device=device)
    with pytest.raises(ValueError) as e:
        torch.ops.iouctl.batched_iou_guided_nms(boxes, scores, scores, idxs.to(device), 0.5)
    return str(e.value).splitlines()[0]


def test_kernel_rejects_float_and_bool_category_ids():
    assert "idxs must be an integer tensor of category ids, got Float" in _op_error("cpu", torch.rand(4))
    assert "idxs must be an integer tensor of category ids, got Bool" in _op_error("cpu", torch.zeros(4).bool())


@pytest.mark.cuda
def test_cuda_checks_equal_the_cpu_checks():
    for idxs in (torch.rand(4), torch.zeros(4).bool(), torch.rand(4).double()):
        assert _op_error("cuda", idxs) == _op_error("cpu", idxs)
    with pytest.raises(ValueError, match="boxes must be floating point"):
        torch.ops.iouctl.iou_guided_nms(torch.ones(3, 4, dtype=torch.long, device="cuda"),
                                        torch.rand(3, device="cuda"), torch.rand(3, device="cuda"), 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("n, n_classes", [(40000, 3), (20000, 80), (6000, 1)])
def test_cuda_segmented_nms_at_scale(n, n_classes):
    # above the old 32768-box mask limit, many classes, one class: always on the GPU, equal to the CPU bit for bit
    boxes, scores, ious, cls = clustered(n, n // 15, torch.float32, seed=31, n_classes=n_classes, with_ious=True)
    dev = [t.cuda() for t in (boxes, scores, ious, cls)]
    want = batched_iou_guided_nms(boxes, scores, ious, cls, 0.5)
    got = batched_iou_guided_nms(*dev, 0.5, impl="cuda")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    tv = torchvision.ops.batched_nms(boxes, scores, cls, 0.5)  # its CPU kernel: the same IoU expression as ours
    assert torch.equal(batched_nms(dev[0], dev[1], dev[3], 0.5).cpu(), tv)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_boxes_equal_cpu(dtype):
    boxes, scores, ious, cls = clustered(2000, 120, torch.float32, seed=32, n_classes=5, with_ious=True)
    boxes, scores, ious = boxes.to(dtype), scores.to(dtype), ious.to(dtype)
    want = batched_iou_guided_nms(boxes, scores, ious, cls, 0.6)
    got = batched_iou_guided_nms(*(t.cuda() for t in (boxes, scores, ious, cls)), 0.6, impl="cuda")
    assert got[1].dtype == dtype
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.cuda
def test_cuda_nms_reads_back_once():
    # one device-to-host read (the number of kept boxes); the NaN checks are the Python wrappers'
    import warnings

    boxes, scores, ious, cls = (t.cuda() for t in clustered(3000, 200, torch.float32, seed=33, n_classes=4,
                                                            with_ious=True))
    torch.ops.iouctl.batched_iou_guided_nms(boxes, scores, ious, cls, 0.5)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.ops.iouctl.batched_iou_guided_nms(boxes, scores, ious, cls, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.cuda
def test_cuda_opcheck():
    boxes, scores, _, cls = (t.cuda() for t in clustered(40, 4, torch.float32, seed=34, n_classes=2,
                                                         with_ious=True))
    nms(boxes, scores, 0.5)
    for op, args in (("iou_guided_nms", (boxes, scores, scores.flip(0), 0.5)),
                     ("batched_iou_guided_nms", (boxes, scores, scores.flip(0), cls, 0.5))):
        result = torch.library.opcheck(getattr(torch.ops.iouctl, op).default, args)
        assert set(result.values()) == {"SUCCESS"}, result
