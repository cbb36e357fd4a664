"""Box IoU, one function per backend (iouctl.ops.boxes: torch and numpy; iouctl::box_iou in the kernels and its
PyTorch mirror iouctl.ops.reference.kernel_box_iou), against plain float64 loops, torchvision, and each other.

Tolerances:
- float64 against the float64 loop: exact. The loop (tests/box_loops.py) is written from the rule, but on a valid pair
  it performs the same IEEE operations in the same order (torchvision's term order), so the bits agree.
- float32 against the float64 loop: rtol 1e-6. Each coordinate difference, product, sum and the division rounds once
  to float32 (u = 2^-24 relative); the union is at least half of area1 + area2, so its error is amplified by at most
  3: about 14 u = 8.3e-7 in all, under 1e-6.
- against torchvision.ops.box_iou and the kernels on valid boxes: exact, in float32 and float64 (same expression).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iouctl.ops import _extension
from iouctl.ops.boxes import box_iou, paired_box_iou, paired_box_iou_np
from iouctl.ops.nms import batched_soft_nms
from iouctl.ops.reference import kernel_box_iou
from tests.box_loops import NP, loop_iou, loop_kernel_iou, numpy_rows

DTYPES = [torch.float32, torch.float64]
RTOL = {torch.float32: 1e-6, torch.float64: 0.0}

# Degenerate boxes the rule speaks of, each paired below with every other row.
DEGENERATE = [
    [2.0, 3.0, 2.0, 9.0],    # zero width (a vertical segment)
    [2.0, 3.0, 2.0, 9.0],    # the same segment again: union 0
    [4.0, 4.0, 4.0, 4.0],    # a point
    [4.0, 4.0, 4.0, 4.0],    # the same point
    [6.0, 1.0, 3.0, 8.0],    # inverted: x2 < x1 (empty, not a box of width 3)
    [1.0, 8.0, 7.0, 2.0],    # inverted: y2 < y1
    [7.0, 9.0, 1.0, 2.0],    # inverted on both axes (a positive signed area)
    [0.0, 0.0, 10.0, 10.0],  # valid ones: overlapping, touching, contained, identical
    [10.0, 0.0, 20.0, 10.0],
    [2.0, 2.0, 5.0, 5.0],
    [0.0, 0.0, 10.0, 10.0],
]


def random_boxes(n: int, seed: int, dtype=torch.float64, grid: float | None = None) -> torch.Tensor:
    """Valid boxes Tensor[n, 4] in a 100 x 100 field, sides in (0.5, 40]; on multiples of ``grid`` if given."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 80
    wh = 0.5 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 39.5
    b = torch.cat([xy, xy + wh], 1)
    if grid is not None:
        b = (b / grid).round() * grid
    return b.to(dtype)


def loop_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[loop_iou(p, q) for q in b.tolist()] for p in a.tolist()], dtype=torch.float64)


def assert_iou(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=RTOL[dtype], atol=0.0, equal_nan=True)


# ------------------------------------------------------------------------------------------- torch and numpy
@pytest.mark.parametrize("dtype", DTYPES)
def test_box_iou_equals_the_plain_loop(dtype):
    a = torch.cat([random_boxes(40, 0, dtype), torch.tensor(DEGENERATE, dtype=dtype)])
    b = torch.cat([random_boxes(30, 1, dtype), torch.tensor(DEGENERATE, dtype=dtype)])
    want = loop_matrix(a, b)
    assert (want > 0).sum() > 100 and (want == 0).sum() > 100  # both kinds of pair are exercised
    assert_iou(box_iou(a, b), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_forms_equal_the_plain_loop(dtype):
    a = torch.cat([random_boxes(200, 2, dtype), torch.tensor(DEGENERATE, dtype=dtype)])
    b = torch.cat([random_boxes(200, 3, dtype), torch.tensor(DEGENERATE[::-1], dtype=dtype)])
    b[:100] = a[:100] + torch.randn(100, 4, generator=torch.Generator().manual_seed(4), dtype=dtype)  # overlapping
    want = torch.tensor([loop_iou(p, q) for p, q in zip(a.tolist(), b.tolist())], dtype=torch.float64)
    assert (want > 0.3).sum() > 50
    assert_iou(paired_box_iou(a, b), want, dtype)
    got_np = paired_box_iou_np(a.numpy(), b.numpy())
    assert got_np.dtype == NP[dtype]
    assert_iou(torch.from_numpy(got_np), want, dtype)


def test_the_zero_union_rule_on_each_degenerate_case():
    d = torch.tensor(DEGENERATE, dtype=torch.float64)
    got = box_iou(d, d)
    # every pair with an empty box (rows 0-6) is 0, identical empty boxes included; torchvision gives NaN there
    assert torch.equal(got[:7], torch.zeros(7, len(d), dtype=torch.float64))
    assert torch.equal(got[:, :7], torch.zeros(len(d), 7, dtype=torch.float64))
    tv = torchvision.ops.box_iou(d, d)
    assert tv[0, 1].isnan() and tv[2, 3].isnan()
    # valid rows: 100 / 100, touching 0, contained 9 / 100, identical 1
    assert got[7, 7] == 1 and got[7, 8] == 0 and got[7, 9] == 0.09 and got[7, 10] == 1
    np_got = np.stack([paired_box_iou_np(d.numpy(), np.roll(d.numpy(), -k, 0)) for k in range(len(d))])
    want = np.stack([got.numpy()[np.arange(len(d)), (np.arange(len(d)) + k) % len(d)] for k in range(len(d))])
    assert np.array_equal(np_got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_torchvision_bit_for_bit_on_valid_boxes(dtype):
    a, b = random_boxes(300, 5, dtype), random_boxes(200, 6, dtype)
    tv = torchvision.ops.box_iou(a, b)
    assert (tv > 0).sum() > 1000
    assert torch.equal(box_iou(a, b), tv)
    assert torch.equal(paired_box_iou(a, b[:1].expand(300, 4)), tv[:, 0])
    assert np.array_equal(paired_box_iou_np(a.numpy(), b[:1].expand(300, 4).numpy()), tv[:, 0].numpy())


def test_equals_torchvision_wherever_torchvision_is_not_nan():
    a = torch.cat([random_boxes(30, 7), torch.tensor(DEGENERATE, dtype=torch.float64)])
    tv, got = torchvision.ops.box_iou(a, a), box_iou(a, a)
    assert tv.isnan().any()
    finite = ~tv.isnan()
    assert torch.equal(got[finite], tv[finite])  # -0.0 == 0.0: torchvision's negative areas only flip a zero's sign
    assert torch.equal(got[~finite], torch.zeros_like(got[~finite]))


coord = st.integers(-20, 20).map(lambda v: v / 4)  # quarter pixels: ties, touching edges and empty boxes are common


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(coord, coord, coord, coord), min_size=2, max_size=6))
def test_hypothesis_any_boxes_follow_the_loop(rows):
    b = torch.tensor(rows, dtype=torch.float64)
    got = box_iou(b, b)
    assert torch.equal(got, loop_matrix(b, b))
    assert ((got >= 0) & (got <= 1)).all()
    assert torch.equal(got, got.T)
    n = len(rows)
    i, j = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    assert torch.equal(paired_box_iou(b[i], b[j]), got.flatten())
    assert np.array_equal(paired_box_iou_np(b[i].numpy(), b[j].numpy()), got.flatten().numpy())


def test_nan_coordinates_give_nan_not_zero():
    a = torch.tensor([[0.0, 0.0, math.nan, 4.0], [0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    got = box_iou(a, b)[:, 0]
    assert got[0].isnan() and got[1] == 0.25
    assert math.isnan(loop_iou(a[0].tolist(), b[0].tolist()))
    assert np.isnan(paired_box_iou_np(a.numpy(), b.expand(2, 4).numpy())[0])


def test_crowd_overlap_is_intersection_over_the_first_box():
    dets = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [3, 3, 3, 8], [8, 2, 2, 9], [20, 20, 30, 30]], dtype=np.float64)
    crowd = np.array([[5, 0, 20, 20]] * 5, dtype=np.float64)
    # cocoeval's iscrowd rule: |d & g| / |d|; an empty detection overlaps nothing
    want = np.array([50 / 100, 100 / 100, 0.0, 0.0, 0.0])
    assert np.array_equal(paired_box_iou_np(dets, crowd, crowd=True), want)


def test_gradients_match_float64_finite_differences_and_stay_finite_on_empty_boxes():
    a = random_boxes(6, 8).requires_grad_()
    b = (a.detach() + torch.randn(6, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)) \
        .requires_grad_()
    assert (paired_box_iou(a, b) > 0).all()  # no pair sits on the kink at IoU 0
    assert torch.autograd.gradcheck(paired_box_iou, (a, b))
    assert torch.autograd.gradcheck(box_iou, (a, b))
    d = torch.tensor(DEGENERATE[:4], dtype=torch.float64, requires_grad=True)
    e = torch.tensor(DEGENERATE[1:5], dtype=torch.float64, requires_grad=True)
    paired_box_iou(d, e).sum().backward()
    assert torch.isfinite(d.grad).all() and torch.isfinite(e.grad).all()


# ------------------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_mirror_equals_the_kernel_loop_and_reads_as_the_rule(dtype):
    a = torch.cat([random_boxes(25, 10, dtype), torch.tensor(DEGENERATE, dtype=dtype)])
    f = NP[dtype]
    rows = numpy_rows(a)
    want = torch.tensor([[loop_kernel_iou(p, q, f) for q in rows] for p in rows], dtype=torch.float64)
    got = kernel_box_iou(a, a)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any()  # the kernels keep 0 / 0 (torchvision's nms bit for bit) ...
    assert torch.equal(got.nan_to_num(nan=0.0), box_iou(a, a))  # ... which every kernel rule reads as no overlap


def kernel_iou_by_soft_nms(a: torch.Tensor, b: torch.Tensor, impl: str, device: str = "cpu") -> torch.Tensor:
    """The IoU of a[p] with b[p] as a kernel computes it, read from linear Soft-NMS: in group p, a[p] (score 1) is
    selected first and decays b[p] (score 1/2) to (1 - IoU) / 2 when IoU > 0, in float64. Halving and 1 - x are
    exact for IoU >= 2^-29, so 1 - 2 * score gives the kernel's IoU back exactly (0 for no overlap)."""
    p = len(a)
    boxes = torch.stack([a, b], 1).reshape(-1, 4).to(device)
    scores = torch.tensor([1.0, 0.5], dtype=torch.float64).repeat(p).to(device)
    idxs = torch.arange(p).repeat_interleave(2).to(device)
    keep, new = batched_soft_nms(boxes, scores, idxs, "linear", 0.5, iou_threshold=0.0, score_threshold=0.0,
                                 impl=impl)
    assert keep.device.type == device
    second = torch.full((2 * p,), math.nan, dtype=torch.float64)
    second[keep.cpu()] = new.cpu()
    assert torch.equal(second[0::2], torch.ones(p, dtype=torch.float64))  # each group's first box, undecayed
    return 1.0 - 2.0 * second[1::2]


@pytest.mark.parametrize("impl", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_iou_equals_paired_box_iou(impl, dtype):
    assert _extension.load_library("nms"), f"the NMS kernels failed to build; see {_extension.build_log('nms')}"
    a = random_boxes(120, 11, dtype, grid=0.125)  # eighth pixels: every IoU is 0 or well above 2^-29
    b = torch.cat([a[:60] + torch.randn(60, 4, generator=torch.Generator().manual_seed(12), dtype=dtype),
                   random_boxes(60, 13, dtype, grid=0.125)])
    d = torch.tensor(DEGENERATE, dtype=dtype)
    a, b = torch.cat([a, d, d]), torch.cat([b, d, d.roll(1, 0)])  # degenerate pairs, identical ones included
    got = kernel_iou_by_soft_nms(a, b, impl)
    want = paired_box_iou(a, b)
    assert (want > 0.5).sum() > 20 and (want == 0).sum() > 20
    if dtype == torch.float32:
        assert torch.equal(got, want.double())  # the kernel's float32 IoU, bit for bit
    else:  # 1 - (1 - x) loses the bits of x below 2^-53: 2 ulp of 1
        torch.testing.assert_close(got, want, rtol=0, atol=2.3e-16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cuda_kernels_iou_equals_paired_box_iou(dtype):
    assert _extension.load_library("nms")
    a = random_boxes(300, 14, dtype, grid=0.125)
    b = a + torch.randn(300, 4, generator=torch.Generator().manual_seed(15), dtype=dtype)
    got = kernel_iou_by_soft_nms(a, b, "cuda", device="cuda")
    want = paired_box_iou(a, b)
    if dtype == torch.float32:
        assert torch.equal(got, want.double())
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=2.3e-16)
