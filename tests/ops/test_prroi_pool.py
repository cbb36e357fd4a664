"""Precise RoI Pooling: kernels vs the float64 separable reference, gradients, golden values, degenerate input."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iouctl.ops import PrRoIPool, _extension, prroi_pool
from iouctl.ops.reference import hat_antiderivative, prroi_pool_reference
from tests.lanes import sample

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
# "direct": CPU tensors through impl="direct", the CUDA kernels' element bodies run by the CPU build
DEVICES = ["cpu", "direct", CUDA]


def kernel_impl(device: str) -> str:
    return {"cuda": "cuda", "direct": "direct"}.get(device, "cpp")


def dev(device: str) -> str:
    return "cpu" if device == "direct" else device


def oracle(x: torch.Tensor, rois: torch.Tensor, size, scale: float) -> torch.Tensor:
    """The reference in float64 on CPU, from exactly the values the kernel sees."""
    ph, pw = (size, size) if isinstance(size, int) else size
    return prroi_pool_reference(x.detach().double().cpu(), rois.detach().double().cpu(), ph, pw, scale)


def make_rois(gen: torch.Generator, N: int, H: int, W: int, K: int, scale: float = 1.0) -> torch.Tensor:
    """[K, 5] boxes in image coordinates, cycling through: inside, partly outside, sub-pixel, larger than the map,
    inverted, zero-size."""
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
    rows = []
    for k in range(K):
        kind = k % 6
        if kind == 0:  # inside
            x1, y1 = u(1).item() * (W - 2), u(1).item() * (H - 2)
            x2, y2 = x1 + 0.3 + u(1).item() * (W - 1 - x1), y1 + 0.3 + u(1).item() * (H - 1 - y1)
        elif kind == 1:  # partly outside, across any border
            x1, y1 = -3 + u(1).item() * (W + 3), -3 + u(1).item() * (H + 3)
            x2, y2 = x1 + 0.5 + 4 * u(1).item(), y1 + 0.5 + 4 * u(1).item()
        elif kind == 2:  # sub-pixel
            x1, y1 = -1 + u(1).item() * (W + 1), -1 + u(1).item() * (H + 1)
            x2, y2 = x1 + 0.02 + 0.8 * u(1).item(), y1 + 0.02 + 0.8 * u(1).item()
        elif kind == 3:  # larger than the map
            x1, y1 = -4 - 3 * u(1).item(), -4 - 3 * u(1).item()
            x2, y2 = W + 3 + 3 * u(1).item(), H + 3 + 3 * u(1).item()
        elif kind == 4:  # inverted
            x2, y2 = u(1).item() * W, u(1).item() * H
            x1, y1 = x2 + 0.5 + u(1).item(), y2 + 0.5 * u(1).item()
        else:  # zero width
            x1, y1 = u(1).item() * W, u(1).item() * H
            x2, y2 = x1, y1 + 2
        b = int(torch.randint(0, N, (1,), generator=gen))
        rows.append([b, x1 / scale, y1 / scale, x2 / scale, y2 / scale])
    return torch.tensor(rows, dtype=torch.float64)


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": wide[..., ::2],  # every other column of a wider map: no unit stride at all
    }


# ---- golden values and identities (docs/PAPERS.md) ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_golden_2x2(device, impl):
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], device=dev(device), requires_grad=True)
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], device=dev(device))
    out = prroi_pool(x, rois, 2, impl=kernel_impl(device) if impl == "kernel" else "reference")
    expected = torch.tensor([[[[1.75, 2.25], [2.75, 3.25]]]], device=dev(device))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    # per axis the two half-cell bins give each cell weight 3/8 + 1/8 = 1/2 in total; / bin area 1/4 -> 1
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_bins_equal_avg_pool(device, dtype):
    # integer-aligned 1x1 bins: the integral of a bilinear cell is the mean of its 4 corners
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, 9, generator=gen, dtype=dtype).to(dev(device))
    rois = torch.tensor([[n, 0, 0, 8, 5] for n in (2, 0, 1)], dtype=dtype, device=dev(device))
    out = prroi_pool(x, rois, (5, 8), impl=kernel_impl(device))
    expected = F.avg_pool2d(x, kernel_size=2, stride=1)[[2, 0, 1]]
    tol = 1e-6 if dtype == torch.float32 else 1e-12  # float32: output rounding of O(1) values
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)


def test_hat_antiderivative_values():
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 7.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 0.125, 0.5, 0.875, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(hat_antiderivative(t), expected, rtol=0, atol=1e-15)


def test_matches_torchvision_roi_align_dense_sampling():
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 12, 14, generator=gen, dtype=torch.float64)
    # inside [0, W-1] x [0, H-1] (beyond the last row/column roi_align repeats the border instead of fading to 0)
    # and wider than one cell (roi_align with aligned=False clamps sizes below 1)
    xy = 1 + 3 * torch.rand(20, 2, generator=gen, dtype=torch.float64)
    wh = 1.5 + 4.5 * torch.rand(20, 2, generator=gen, dtype=torch.float64)
    rois = torch.cat([torch.randint(0, 2, (20, 1), generator=gen).double(), xy, xy + wh], 1)
    out = prroi_pool(x, rois, (3, 4), impl="cpp")
    ra = torchvision.ops.roi_align(x, rois, (3, 4), spatial_scale=1.0, sampling_ratio=64, aligned=False)
    # roi_align's 64x64 midpoint samples per bin approximate the exact integral (error O(1/64^2) per kink)
    assert (out - ra).abs().max().item() <= 2e-3


# ---- equality with the reference ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_matches_reference(device, dtype, layout):
    gen = torch.Generator().manual_seed(3)
    N, C, H, W, scale = 2, 5, 9, 13, 0.5
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) * 3 + 1
    x = layouts(x.to(dtype).to(dev(device)))[layout]
    rois = make_rois(gen, N, H, W, 48, scale).to(dtype).to(dev(device))
    out = prroi_pool(x, rois, (3, 4), scale, impl=kernel_impl(device))
    ref = oracle(x, rois, (3, 4), scale)
    assert out.shape == (48, C, 3, 4) and out.dtype == dtype
    # float32: 1e-5 of the output scale (issue target); the CPU kernel accumulates in float64 so it rounds only once,
    # the CUDA math (cuda, direct) sums <~100 float32 terms of the output's scale.
    # float64: prefix-sum cancellation ~1e-16 * |P| (|P| <= H W max|x|) / smallest bin area (~1e-3) -> 1e-10
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    scale_ = ref.abs().max().item()
    assert (out.double().cpu() - ref).abs().max().item() <= tol * scale_


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(4)
    N, C, H, W, scale = 2, 3, 8, 11, 2.0
    x0 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    rois0 = make_rois(gen, N, H, W, 30, scale)
    g = torch.randn(30, C, 2, 3, generator=gen, dtype=torch.float64)
    x = x0.to(dtype).to(dev(device)).requires_grad_()
    rois = rois0.to(dtype).to(dev(device)).requires_grad_()
    prroi_pool(x, rois, (2, 3), scale, impl=kernel_impl(device)).backward(g.to(dtype).to(dev(device)))
    xr = x.detach().double().cpu().requires_grad_()
    rr = rois.detach().double().cpu().requires_grad_()
    prroi_pool_reference(xr, rr, 2, 3, scale).backward(g)
    # float32: gradients are float64 sums rounded once (CPU) or float32 sums of <~100 terms (CUDA): 1e-5 of scale
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    for got, want in ((x.grad, xr.grad), (rois.grad, rr.grad)):
        assert (got.double().cpu() - want).abs().max().item() <= tol * want.abs().max().item()
    assert torch.all(rois.grad[:, 0] == 0)  # the batch index gets no gradient


def test_float32_long_prefix_sums_keep_precision():
    # a large map with a large mean is where float32 prefix sums would cancel: tiny bins far from the origin
    gen = torch.Generator().manual_seed(5)
    x = (100 + torch.randn(1, 2, 300, 400, generator=gen)).float()
    xy = torch.tensor([[390.3, 290.7], [395.01, 296.2], [200.5, 150.25], [0.1, 0.2]], dtype=torch.float64)
    wh = torch.tensor([[0.05, 0.03], [0.7, 0.4], [0.01, 0.02], [0.2, 0.1]], dtype=torch.float64)
    rois = torch.cat([torch.zeros(4, 1, dtype=torch.float64), xy, xy + wh], 1).float()
    out = prroi_pool(x, rois, 2, impl="cpp")
    ref = oracle(x, rois, 2, 1.0)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def exact_prroi(x: torch.Tensor, rois: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """PrRoI in exact rational arithmetic, by plain loops over the definition (an oracle free of rounding)."""
    from fractions import Fraction as Fr

    def G(t):  # antiderivative of the hat
        return Fr(0) if t <= -1 else (t + 1) ** 2 / 2 if t < 0 else 1 - (1 - t) ** 2 / 2 if t < 1 else Fr(1)

    _, C, H, W = x.shape
    out = torch.zeros(len(rois), C, ph, pw, dtype=torch.float64)
    for k, row in enumerate(rois.tolist()):
        n, x1, y1, x2, y2 = int(row[0]), *(Fr(v) for v in row[1:])
        bw, bh = (x2 - x1) / pw, (y2 - y1) / ph
        for c in range(C):
            f = [[Fr(v) for v in r] for r in x[n, c].tolist()]
            for p in range(ph):
                wy = [G(y1 + (p + 1) * bh - j) - G(y1 + p * bh - j) for j in range(H)]
                for q in range(pw):
                    wx = [G(x1 + (q + 1) * bw - i) - G(x1 + q * bw - i) for i in range(W)]
                    total = sum(wy[j] * wx[i] * f[j][i] for j in range(H) for i in range(W) if wy[j] and wx[i])
                    out[k, c, p, q] = float(total / (bw * bh))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_thin_bins_stay_exact(device):
    # bins far thinner than a cell: the prefix-sum corner formula would cancel here (error ~ eps * sum|x| / area)
    gen = torch.Generator().manual_seed(14)
    x = 10 + torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64)  # an offset makes cancellation worse
    # dyadic thin sides keep the bin edges exact in float64 (a rounded edge would move a 1e-13-wide bin by 0.1%)
    rois = torch.tensor([[0, 0.0, 0.0, 1.0, 2.0**-36], [0, 3.25, 2.5, 3.25 + 2.0**-30, 4.75],
                         [0, 1.0, 1.0, 1.0 + 2.0**-44, 1.5], [0, 2.2, 0.3, 2.23, 3.9], [0, -0.999, 3.0, 4.5, 3.004]],
                        dtype=torch.float64)
    out = prroi_pool(x.to(dev(device)), rois.to(dev(device)), 2, impl=kernel_impl(device)).cpu()
    exact = exact_prroi(x, rois, 2, 2)
    # a few float64 roundings of O(10) values on a well-conditioned path: 1e-12 relative
    assert (out - exact).abs().max().item() <= 1e-12 * exact.abs().max().item()


@pytest.mark.parametrize("impl", ["cpp", "direct"])
def test_gradcheck_thin_bins_float64(impl):
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    batch = torch.zeros(3, 1, dtype=torch.float64)
    coords = torch.tensor([[0.3, 0.6, 0.32, 2.9], [1.1, 1.7, 3.6, 1.71], [2.5, 0.5, 2.51, 0.505]],
                          dtype=torch.float64, requires_grad=True)  # bins of 0.005-0.01 cells: the direct path
    f = lambda a, b: prroi_pool(a, torch.cat([batch, b], 1), 2, impl=impl)
    assert torch.autograd.gradcheck(f, (x, coords), eps=1e-7, atol=1e-6)


def test_box_list_form_and_module():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 7, 8, generator=gen)
    boxes = [torch.tensor([[0.0, 1.0, 5.0, 6.0], [2.0, 2.0, 3.5, 4.0]]), torch.tensor([[1.0, 0.5, 7.0, 3.0]])]
    rois = torch.tensor([[0, 0.0, 1.0, 5.0, 6.0], [0, 2.0, 2.0, 3.5, 4.0], [1, 1.0, 0.5, 7.0, 3.0]])
    a = prroi_pool(x, boxes, (2, 3), 0.5)
    b = PrRoIPool((2, 3), 0.5)(x, rois)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.double(), oracle(x, rois, (2, 3), 0.5), rtol=0, atol=1e-5)
    assert prroi_pool(x, [], 2).shape == (0, 3, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_cpu(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 6, 7, generator=gen).to(dtype).requires_grad_()
    rois = torch.tensor([[0, 0.5, 0.5, 5.0, 4.0], [0, 2.0, 1.0, 3.0, 5.5]], dtype=dtype, requires_grad=True)
    out = prroi_pool(x, rois, 2)
    assert out.dtype == dtype
    ref = oracle(x, rois, 2, 1.0)
    # computed in float32 from the same low-precision values; only the final rounding to dtype differs
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max().item() <= 2 * eps * ref.abs().max().item()
    out.sum().backward()
    assert x.grad.dtype == dtype and rois.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


# ---- the CUDA math on the CPU (impl="direct") ----

def _run(x: torch.Tensor, rois: torch.Tensor, size, scale: float, impl: str, g: torch.Tensor):
    """(output, input gradient, box gradient) of one implementation, in float64 on the CPU."""
    xx, rr = x.detach().clone().requires_grad_(), rois.detach().clone().requires_grad_()
    out = prroi_pool(xx, rr, size, scale, impl=impl)
    out.backward(g.to(out.dtype).to(out.device))
    return out.detach().double().cpu(), xx.grad.double().cpu(), rr.grad.double().cpu()


def thin_rois(gen: torch.Generator, N: int, K: int, dtype: torch.dtype, side: float) -> torch.Tensor:
    """[K, 5] boxes exact in ``dtype``, in image coordinates within [4, side]: even rows ordinary, odd rows a few
    ulps of ``dtype`` wide or tall (with spatial_scale 1/16 and 7 bins, bins of ~1e-4 .. 1e-2 cells)."""
    bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    u = torch.rand(K, 4, generator=gen, dtype=torch.float64)
    x1 = (4 + u[:, 0] * (side - 12)).to(dtype).double()
    y1 = (4 + u[:, 1] * (side - 12)).to(dtype).double()
    x2 = (x1 + 2 + u[:, 2] * (side - 4 - x1)).to(dtype).double()
    y2 = (y1 + 2 + u[:, 3] * (side - 4 - y1)).to(dtype).double()
    ulp = lambda v: torch.exp2(torch.floor(torch.log2(v)) - bits)
    steps = torch.randint(1, 4, (K,), generator=gen).double()
    thin = torch.arange(K) % 2 == 1
    wide = torch.arange(K) % 4 == 1  # thin rows alternate: thin in x, then thin in y
    x2 = torch.where(thin & wide, x1 + steps * ulp(x1), x2)
    y2 = torch.where(thin & ~wide, y1 + steps * ulp(y1), y2)
    batch = torch.randint(0, N, (K, 1), generator=gen).double()
    rois = torch.cat([batch, x1[:, None], y1[:, None], x2[:, None], y2[:, None]], 1)
    assert torch.equal(rois.to(dtype).double(), rois)  # exact in dtype: "the same rounded inputs"
    return rois


def per_roi_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """max |got - want| over a RoI's box gradient, relative to that RoI's max |want| (Tensor[K])."""
    return (got - want)[:, 1:].abs().amax(1) / want[:, 1:].abs().amax(1)


@pytest.mark.parametrize("device", ["direct", CUDA])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_gradients_of_thin_boxes_in_low_precision(device, dtype):
    # Refinement follows the box gradient, in half precision under AMP: within 1e-2 of float64 evaluated at the very
    # same rounded inputs, RoI by RoI, also for boxes a few ulps wide (bins of ~1e-4 cell at stride 16).
    gen = torch.Generator().manual_seed(21)
    N, C, H, W, scale = 2, 4, 12, 14, 1 / 16
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype).double()
    rois = thin_rois(gen, N, 24, dtype, 16 * 12)
    g = torch.randn(24, C, 7, 7, generator=gen, dtype=torch.float64).to(dtype).double()
    want = _run(x, rois, 7, scale, "reference", g)
    got = _run(x.to(dev(device), dtype), rois.to(dev(device), dtype), 7, scale, kernel_impl(device), g)
    # 1e-2 (issue target); the gradient's own rounding to dtype is 2^-8 (bfloat16) or 2^-11 (float16). (Not for
    # float32 boxes a few ulps wide: bins of ~1e-8 cell, where the float64 reference itself errs by ~1e-3.)
    err = per_roi_error(got[2], want[2])
    assert err.max().item() <= 1e-2, err
    # The test can tell: the form the CUDA kernel used before (the saved output times 1/w instead of the bin average
    # recomputed in float) would move the x1 gradient of a thin RoI by sum g (out_saved - out) / (x2 - x1).
    out_saved = want[0].to(dtype).double()
    shift = (g * (out_saved - want[0])).sum((1, 2, 3)) / (rois[:, 3] - rois[:, 1])
    assert (shift.abs() / want[2][:, 1:].abs().amax(1)).max().item() > 1e-2
    eps = torch.finfo(dtype).eps  # forward: float32 sums, one rounding to dtype
    assert (got[0] - want[0]).abs().max().item() <= 2 * eps * want[0].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_equals_direct(dtype):
    # the CPU default (prefix sums) and the CUDA math (direct) on the same inputs, ordinary and thin boxes
    gen = torch.Generator().manual_seed(22)
    N, C, H, W = 2, 3, 10, 12
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    rois = torch.cat([make_rois(gen, N, H, W, 36, 0.5), thin_rois(gen, N, 12, torch.float32, 2 * 11)]).to(dtype)
    g = torch.randn(48, C, 3, 3, generator=gen, dtype=torch.float64)
    a, b = _run(x, rois, 3, 0.5, "cpp", g), _run(x, rois, 3, 0.5, "direct", g)
    # float32: both within ~1e-6 of float64 (float32 sums vs float64 sums); float64: prefix-sum cancellation 1e-10
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for got, want in zip(b, a):
        assert (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("impl", ["cpp", "direct"])
def test_gradcheck_float64(impl):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    batch = torch.tensor([[0.0], [1.0], [1.0]], dtype=torch.float64)
    coords = torch.tensor([[0.3, 0.6, 4.2, 3.9], [-1.3, 2.2, 3.1, 6.4], [2.25, 1.7, 2.9, 2.2]],
                          dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs every input entry: keep the (non-differentiable) batch index out of its reach
    f = lambda a, b: prroi_pool(a, torch.cat([batch, b], 1), (2, 3), 0.9, impl=impl)
    assert torch.autograd.gradcheck(f, (x, coords), eps=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_direct_opcheck(dtype):
    prroi_pool(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1, impl="direct")  # loads and registers
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 6, generator=gen).to(dtype).requires_grad_()
    rois = torch.tensor([[1, 0.3, 0.6, 4.2, 3.9], [0, -1.0, 2.0, 3.0, 6.0]], dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.iouctl._prroi_pool_direct.default, (x, rois, 2, 3, 0.75))
    out = torch.ops.iouctl._prroi_pool_direct(x, rois, 2, 3, 0.75).detach()
    assert out.dtype == dtype
    torch.library.opcheck(torch.ops.iouctl._prroi_pool_direct_backward.default,
                          (torch.randn_like(out), x.detach(), rois.detach(), out, 2, 3, 0.75, True, True))


# ---- autocast ----

def test_autocast_pools_in_float32_and_returns_the_input_dtype():
    # as torchvision's roi_align under autocast: inputs cast to float32 (boxes keep their float32 precision), the
    # result in the input's dtype, for the Python function and for the op called directly
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(1, 4, 8, 9, generator=gen).bfloat16()
    rois = torch.tensor([[0, 0.3, 0.61, 6.17, 5.3], [0, 2.01, 1.0, 2.02, 6.5]])  # not exact in bfloat16
    expected = prroi_pool(x.float(), rois, 2, impl="cpp").bfloat16()
    assert not torch.equal(expected, prroi_pool(x.float(), rois.bfloat16().float(), 2, impl="cpp").bfloat16())
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prroi_pool(xg, rois, 2)  # mixed dtypes: allowed under autocast only
        op_out = torch.ops.iouctl.prroi_pool(x, rois.bfloat16(), 2, 2, 1.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert torch.equal(op_out, prroi_pool(x.float(), rois.bfloat16().float(), 2, impl="cpp").bfloat16())
    out.float().sum().backward()
    assert xg.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float32 or float64"):  # without autocast the CPU kernel refuses bfloat16
        torch.ops.iouctl.prroi_pool(x, rois.bfloat16(), 2, 2, 1.0)
    with pytest.raises(ValueError, match="same dtype"):
        prroi_pool(x, rois, 2)


# ---- autograd plumbing ----

def test_gradcheck_reference_float64():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    batch = torch.zeros(2, 1, dtype=torch.float64)
    coords = torch.tensor([[0.3, 0.6, 3.2, 2.9], [-0.7, 1.2, 2.1, 4.4]], dtype=torch.float64, requires_grad=True)
    f = lambda a, b: prroi_pool(a, torch.cat([batch, b], 1), 2, impl="reference")
    assert torch.autograd.gradcheck(f, (x, coords), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", sample([torch.float64, torch.float32], 2))
def test_opcheck(dtype):
    _extension.select_impl("prroi_pool", "cpp", "cpu")
    from iouctl.ops.prroi_pool import _register

    _register()
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=dtype, requires_grad=True)
    rois = torch.tensor([[1, 0.3, 0.6, 4.2, 3.9], [0, -1.0, 2.0, 3.0, 6.0]], dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.iouctl.prroi_pool.default, (x, rois, 2, 3, 0.75))
    out = torch.ops.iouctl.prroi_pool(x, rois, 2, 3, 0.75).detach()
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.iouctl._prroi_pool_backward.default,
                          (grad, x.detach(), rois.detach(), out, 2, 3, 0.75, True, True))


def test_torch_compile_traces_the_op_in_one_graph():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 3.0], [0, 1.0, 0.2, 2.0, 4.5]], dtype=torch.float64, requires_grad=True)
    f = torch.compile(lambda a, b: prroi_pool(a, b, 2) * 2, backend="aot_eager", fullgraph=True)
    out = f(x, rois)
    out.sum().backward()
    xe, re = x.detach().requires_grad_(), rois.detach().requires_grad_()
    eager = prroi_pool(xe, re, 2) * 2
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)  # same kernels, same order: bitwise equal
    torch.testing.assert_close(x.grad, xe.grad, rtol=0, atol=0)
    torch.testing.assert_close(rois.grad, re.grad, rtol=0, atol=0)


def test_double_backward_raises_clearly():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 2.5, 3.0]], dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(prroi_pool(x, rois, 2, impl="cpp").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_only_requested_gradients():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 4.0]], dtype=torch.float64, requires_grad=True)
    out = prroi_pool(x, rois, 2, impl="cpp")
    out.sum().backward()
    rr = rois.detach().requires_grad_()
    prroi_pool_reference(x, rr, 2, 2).sum().backward()
    torch.testing.assert_close(rois.grad, rr.grad, rtol=1e-9, atol=1e-12)  # float64 sums, one rounding
    assert x.grad is None


# ---- degenerate input ----

def _coord():
    finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
    near = st.floats(-3, 12, allow_nan=False)
    huge = st.sampled_from([1e30, -1e30, 3e38, -3e38, 1e-30])
    special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 8.0, -1.0])
    return st.one_of(near, near, finite, huge, special)


@pytest.mark.parametrize("impl", ["cpp", "direct", "reference"])
@pytest.mark.parametrize("side", [1.401298464324817e-45, 1e-36, 1e-31])
def test_a_bin_area_float_cannot_hold_is_empty_on_every_path(impl, side):
    """A box of height `side` (a subnormal float32 among them) has a bin area below 1e-30 cells^2: float accumulation
    (the CUDA kernel's and the direct path's) would divide 0 by 0, so every path outputs 0 and zero gradients, as for
    a zero-height box. A box with a bin area above the bound is pooled (next test)."""
    x = (torch.arange(2 * 3 * 7 * 8, dtype=torch.float32).reshape(2, 3, 7, 8) / 100).requires_grad_()
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, side]]).requires_grad_()
    out = prroi_pool(x, rois, (2, 3), impl=impl)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(rois.grad, torch.zeros_like(rois))


@pytest.mark.parametrize("impl", ["cpp", "direct"])
def test_a_thin_box_above_the_bound_is_pooled(impl):
    """Height 1e-20 px (bin area ~1.7e-21 cells^2, 2x3 bins): pooled, as the limit of the bin averages, the average of
    the line y = 0 over each bin: plane[c, 0, x] = (56 c + x) / 100, so bin q of [0, 1] averages (56 c + (q + 0.5) / 3)
    / 100. (The pure-PyTorch reference integrates by differences of prefix integrals and loses such a bin to
    cancellation: 0.)"""
    x = torch.arange(2 * 3 * 7 * 8, dtype=torch.float32).reshape(2, 3, 7, 8) / 100
    got = prroi_pool(x, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1e-20]]), (2, 3), impl=impl).double()
    c, q = torch.arange(3, dtype=torch.float64).view(3, 1, 1), torch.arange(3, dtype=torch.float64).view(1, 1, 3)
    want = ((56 * c + (q + 0.5) / 3) / 100).expand(3, 2, 3).unsqueeze(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # float32 inputs and accumulation


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes=st.lists(st.tuples(st.integers(0, 1), _coord(), _coord(), _coord(), _coord()), min_size=1,
                      max_size=64),
       degenerate_pair=st.booleans())
@pytest.mark.parametrize("impl", sample(["cpp", "direct"], 2))
def test_degenerate_boxes_never_crash(impl, boxes, degenerate_pair):
    x = torch.arange(2 * 3 * 7 * 8, dtype=torch.float32).reshape(2, 3, 7, 8) / 100
    rois = torch.tensor(boxes, dtype=torch.float32)
    if degenerate_pair:  # zero-size boxes exactly on a cell
        rois[::2, 3:] = rois[::2, 1:3]
    rois.requires_grad_()
    xg = x.clone().requires_grad_()
    out = prroi_pool(xg, rois, (2, 3), impl=impl)
    finite = torch.isfinite(rois.detach()[:, 1:]).all(1)
    has_nan = torch.isnan(rois.detach()[:, 1:]).any(1)
    assert torch.isfinite(out[finite]).all()
    assert torch.isnan(out[has_nan]).all()
    ref = oracle(xg, rois, (2, 3), 1.0)
    # Bins of area >= 1e-6 cells^2: float32 output rounding of values <= max|x| (~3.4), 1e-5 absolute. Thinner bins
    # are ill-conditioned for any float64 method: the kernel's prefix sums err by ~eps64 * sum|x| / area and the
    # oracle's G differences by ~eps64 / bin side, so there only the average's bound is checked: it lies in
    # [min(0, min x), max(0, max x)] since the map is 0 outside.
    r = rois.detach().double()
    area = (r[:, 3] - r[:, 1]) / 3 * (r[:, 4] - r[:, 2]) / 2
    sane = finite & (area >= 1e-6)
    torch.testing.assert_close(out[sane].double(), ref[sane], rtol=0, atol=1e-5)
    assert torch.isnan(ref[has_nan]).all()
    lo, hi = min(0.0, x.min().item()), max(0.0, x.max().item())
    assert torch.all(out[finite] >= lo - 1e-3) and torch.all(out[finite] <= hi + 1e-3)
    out[~has_nan].sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert torch.isfinite(rois.grad[finite]).all()


@pytest.mark.parametrize("impl", ["cpp", "direct"])
def test_empty_inputs(impl):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = prroi_pool(x, torch.zeros(0, 5), 2, impl=impl)
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    flat = torch.randn(1, 2, 0, 5)  # a map with no rows is all zeros
    assert torch.equal(prroi_pool(flat, torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]]), 2, impl=impl),
                       torch.zeros(1, 2, 2, 2))
    empty_c = prroi_pool(torch.randn(1, 0, 4, 4), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]]), 2, impl=impl)
    assert empty_c.shape == (1, 0, 2, 2)


# ---- bad input: one clear line each ----

@pytest.mark.parametrize("impl", ["cpp", "direct", "reference"])
@pytest.mark.parametrize("batch", [2.0, -1.0, 0.5, math.nan])
def test_bad_batch_index(impl, batch):
    x = torch.randn(2, 1, 4, 4)
    rois = torch.tensor([[0, 0.0, 0.0, 1.0, 1.0], [batch, 0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"rois\[1, 0\] \(batch index\).*integer in \[0, 2\)"):
        prroi_pool(x, rois, 2, impl=impl)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3, 4, 4), torch.zeros(1, 5), 2), r"input must be Tensor\[N, C, H, W\]"),
    ((torch.randn(1, 1, 4, 4), torch.zeros(1, 3), 2), r"boxes must be Tensor\[K, 5\].*shape \(1, 3\)"),
    ((torch.randn(1, 1, 4, 4), torch.zeros(1, 4), 2), r"boxes must be Tensor\[K, 5\].*shape \(1, 4\)"),
    ((torch.randn(1, 1, 4, 4), [torch.zeros(1, 5)], 2), r"boxes\[0\] must be Tensor\[L, 4\]"),
    ((torch.randn(1, 1, 4, 4), torch.zeros(1, 5, dtype=torch.float64), 2), "same dtype"),
    ((torch.randn(1, 1, 4, 4), torch.zeros(1, 5, device="meta"), 2), "one device"),
    ((torch.randn(1, 1, 4, 4), torch.zeros(1, 5), 0), "output_size must be a positive int"),
    ((torch.randn(1, 1, 4, 4), torch.zeros(1, 5), (2, 2, 2)), "output_size must be a positive int"),
    ((torch.randn(1, 1, 4, 4).long(), torch.zeros(1, 5).long(), 2), "input must be float16"),
])
def test_bad_input_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        prroi_pool(*args)


def test_bad_scale_and_impl():
    x, rois = torch.randn(1, 1, 4, 4), torch.zeros(1, 5)
    with pytest.raises(ValueError, match="spatial_scale must be a finite number > 0"):
        prroi_pool(x, rois, 2, spatial_scale=math.inf)
    with pytest.raises(ValueError, match="impl must be one of auto, cpp, cuda, reference, direct"):
        prroi_pool(x, rois, 2, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of auto, cpp, cuda, reference, direct"):
        PrRoIPool(2, impl="triton")
    with pytest.raises(ValueError, match="impl='cuda' runs on CUDA tensors but the input is on cpu"):
        prroi_pool(x, rois, 2, impl="cuda")
    with pytest.raises(ValueError, match="impl='direct' runs on CPU tensors but the input is on meta"):
        prroi_pool(x.to("meta"), rois.to("meta"), 2, impl="direct")


def test_op_called_directly_checks_its_input():
    _extension.select_impl("prroi_pool", "cpp", "cpu")
    with pytest.raises(ValueError, match="rois must be"):
        torch.ops.iouctl.prroi_pool(torch.randn(1, 1, 3, 3), torch.zeros(2, 4), 2, 2, 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        torch.ops.iouctl.prroi_pool(torch.randn(1, 1, 3, 3).half(), torch.zeros(2, 5), 2, 2, 1.0)


# ---- build and fallback ----

def test_auto_uses_the_compiled_kernel_on_cpu():
    assert _extension.select_impl("prroi_pool", "auto", "cpu") == "cpp"
    assert _extension.has_kernel("iouctl::prroi_pool", "cpu")
    assert _extension.select_impl("prroi_pool", "reference", "cpu") == "reference"


@pytest.mark.slow
def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    kernels = tmp_path / "kernels" / "broken_op"
    kernels.mkdir(parents=True)
    (kernels / "broken_op.cpp").write_text("#include <torch/library.h>\nthis is not C++;\n")
    monkeypatch.setattr(_extension, "kernels_dir", lambda: tmp_path / "kernels")
    monkeypatch.setenv("IOUCTL_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(_extension.KernelBuildWarning, match="Build log: .*build.log") as rec:
        assert _extension.select_impl("broken_op", "auto", "cpu") == "reference"
    assert len(rec) == 1
    assert "this is not C++" in _extension.build_log("broken_op").read_text()  # the compiler's complaint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        with pytest.raises(RuntimeError, match="failed to build; see .*build.log"):
            _extension.select_impl("broken_op", "cpp", "cpu")


@pytest.mark.slow
def test_parallel_builds_share_one_cache(tmp_path):
    # two processes race to build the same library into an empty cache: both must load a working op
    op = tmp_path / "kernels" / "race_op"
    op.mkdir(parents=True)
    (op / "race_op.cpp").write_text(textwrap.dedent("""
        #include <torch/library.h>
        at::Tensor race_twice(const at::Tensor& x) { return x.add(x); }
        TORCH_LIBRARY_FRAGMENT(iouctl, m) { m.def("race_twice(Tensor x) -> Tensor"); }
        TORCH_LIBRARY_IMPL(iouctl, CPU, m) { m.impl("race_twice", &race_twice); }
    """))
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from iouctl.ops import _extension
        _extension.kernels_dir = lambda: Path({str(tmp_path / "kernels")!r})
        assert _extension.load_library("race_op")
        print(float(torch.ops.iouctl.race_twice(torch.tensor(3.0))))
    """)
    env = {**os.environ, "IOUCTL_KERNEL_CACHE": str(tmp_path / "cache")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "6.0"
    builds = list((tmp_path / "cache").iterdir())
    assert len(builds) == 1 and (builds[0] / "built.ok").is_file()


# ---- CUDA ----

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu_kernel(dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 10, 12, generator=gen).to(dtype)
    rois = make_rois(gen, 2, 10, 12, 60, 0.5).to(dtype)
    g = torch.randn(60, 4, 3, 3, generator=gen).to(dtype)
    res = {}
    for dev, impl in (("cpu", "cpp"), ("cuda", "cuda")):
        xx = x.to(dev).requires_grad_()
        rr = rois.to(dev).requires_grad_()
        out = prroi_pool(xx, rr, 3, 0.5, impl=impl)
        out.backward(g.to(dev))
        res[dev] = [t.double().cpu() for t in (out, xx.grad, rr.grad)]
    tol = 1e-5 if dtype == torch.float32 else 1e-10  # float32 sums on the GPU; float64 rounding otherwise
    for a, b in zip(res["cpu"], res["cuda"]):
        assert (a - b).abs().max().item() <= tol * max(a.abs().max().item(), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 8, 9, 9, generator=gen)
    rois = make_rois(gen, 1, 9, 9, 24)
    out = prroi_pool(x.cuda().to(dtype), rois.cuda().to(dtype), 2, impl="cuda")
    assert out.dtype == dtype
    ref = oracle(x.to(dtype), rois.to(dtype), 2, 1.0)
    eps = torch.finfo(dtype).eps  # float32 accumulation: only the output rounding to dtype is left
    assert (out.double().cpu() - ref).abs().max().item() <= 4 * eps * max(ref.abs().max().item(), 1.0)


@pytest.mark.cuda
def test_cuda_non_default_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0]])
    out = prroi_pool(x.to("cuda:1"), rois.to("cuda:1"), 2, impl="cuda")
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), prroi_pool(x, rois, 2, impl="cpp"), rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_equals_direct(dtype):
    # the same element bodies on both: CUDA differs from the CPU loops only by FMA contraction, atomics order and the
    # reduction order
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 6, 12, 14, generator=gen).to(dtype)
    rois = torch.cat([make_rois(gen, 2, 12, 14, 30, 1 / 16), thin_rois(gen, 2, 10, dtype, 16 * 12)]).to(dtype)
    g = torch.randn(40, 6, 7, 7, generator=gen, dtype=torch.float64)
    a = _run(x, rois, 7, 1 / 16, "direct", g)
    b = _run(x.cuda(), rois.cuda(), 7, 1 / 16, "cuda", g)
    eps = torch.finfo(dtype).eps
    # half outputs: one rounding each, which a last-bit difference in float32 may flip: 2 eps; float32 sums of ~50
    # terms: 1e-5 (issue target); float64: 1e-10
    tol = 2 * eps if eps > 1e-4 else (1e-5 if dtype == torch.float32 else 1e-10)
    for got, want in zip(b[:2], a[:2]):
        assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    live = a[2][:, 1:].abs().amax(1) > 0
    assert per_roi_error(b[2][live], a[2][live]).max().item() <= max(tol, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [2.0, -1.0, 0.5, math.nan])
def test_cuda_bad_batch_index_raises(batch):
    x = torch.randn(2, 1, 4, 4, device="cuda")
    rois = torch.tensor([[0, 0.0, 0.0, 1.0, 1.0], [batch, 0.0, 0.0, 1.0, 1.0]], device="cuda")
    with pytest.raises(ValueError, match=r"rois\[1, 0\] \(batch index\).*integer in \[0, 2\)"):
        prroi_pool(x, rois, 2, impl="cuda")


@pytest.mark.cuda
def test_cuda_deterministic_mode_refuses_the_atomic_input_gradient():
    x = torch.randn(1, 2, 6, 6, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0]], device="cuda", requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        out = prroi_pool(x, rois, 2, impl="cuda")
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
        # the box gradient alone is a block reduction: deterministic, allowed
        (gr,) = torch.autograd.grad(prroi_pool(x.detach(), rois, 2, impl="cuda").sum(), rois)
        (gr2,) = torch.autograd.grad(prroi_pool(x.detach(), rois, 2, impl="cuda").sum(), rois)
        assert torch.equal(gr, gr2)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
def test_cuda_autocast_pools_in_float32():
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(1, 4, 8, 9, generator=gen).cuda()
    rois = torch.tensor([[0, 0.3, 0.61, 6.17, 5.3], [0, 2.01, 1.0, 2.02, 6.5]], device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        feat = x.half()
        out = prroi_pool(feat, rois, 2)
        ra = torchvision.ops.roi_align(feat, rois, 2, 1.0, aligned=False)
    assert out.dtype == ra.dtype == torch.float16
    assert torch.equal(out, prroi_pool(feat.float(), rois, 2, impl="cuda").half())


@pytest.mark.cuda
def test_cuda_forward_reads_back_once_backward_never():
    x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    rois = torch.tensor([[1, 0.5, 0.5, 4.0, 5.0], [0, 1.0, 2.0, 7.0, 3.0]], device="cuda", requires_grad=True)
    prroi_pool(x, rois, 2, impl="cuda").sum().backward()  # warm-up
    torch.cuda.synchronize()
    counts = []
    for step in ("forward", "backward"):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                if step == "forward":
                    out = prroi_pool(x, rois, 2, impl="cuda")
                else:
                    out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in seen))
    assert counts == [1, 0]  # the batch-index flag; nothing in the backward


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_opcheck(dtype):
    prroi_pool(torch.zeros(1, 1, 2, 2, device="cuda"), torch.zeros(1, 5, device="cuda"), 1)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 6, generator=gen).to(dtype).cuda().requires_grad_()
    rois = torch.tensor([[1, 0.3, 0.6, 4.2, 3.9], [0, -1.0, 2.0, 3.0, 6.0]], dtype=dtype, device="cuda",
                        requires_grad=True)
    torch.library.opcheck(torch.ops.iouctl.prroi_pool.default, (x, rois, 2, 3, 0.75))
    out = torch.ops.iouctl.prroi_pool(x, rois, 2, 3, 0.75).detach()
    torch.library.opcheck(torch.ops.iouctl._prroi_pool_backward.default,
                          (torch.randn_like(out), x.detach(), rois.detach(), out, 2, 3, 0.75, False, True))


@pytest.mark.cuda
def test_cuda_torch_compile():
    x = torch.randn(1, 2, 5, 6, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 3.0], [0, 1.0, 0.2, 2.0, 4.5]], device="cuda", requires_grad=True)
    f = torch.compile(lambda a, b: prroi_pool(a, b, 2) * 2, fullgraph=True)
    out = f(x, rois)
    out.sum().backward()
    xe, re = x.detach().requires_grad_(), rois.detach().requires_grad_()
    eager = prroi_pool(xe, re, 2) * 2
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(rois.grad, re.grad, rtol=1e-5, atol=1e-6)


# ---- the bench-pool engine (iouctl/engine/bench_pool.py) ----

class FakeRun:
    """The slice of iouctl.runs.Run that engine functions use, recording what they hand over."""

    def __init__(self, root):
        import io

        from rich.console import Console

        self.dir = root
        self.console = Console(file=io.StringIO(), width=200, force_terminal=False)
        self.metrics, self.tables, self.images = [], {}, {}

    def log(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def path(self, *parts):
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, relpath, obj):
        from iouctl.fileio import atomic_write_json

        return atomic_write_json(self.path(relpath), obj)

    def write_text(self, relpath, text):
        return self.path(relpath).write_text(text)

    def log_table(self, name, columns, rows):
        self.tables[name] = (columns, rows)

    def log_image(self, name, png_path):
        self.images[name] = png_path

    def progress(self, transient=False):
        from rich.progress import Progress

        return Progress(console=self.console, transient=transient)


def test_bench_pool_engine_writes_table_json_plot(tmp_path):
    import json

    from iouctl.engine.bench_pool import IMPLS, run_bench_pool

    run = FakeRun(tmp_path)
    rows = run_bench_pool(run, impls=["all"], devices=["cpu"], feature_shape=(1, 4, 12, 16), stride=4,
                          output_size=3, num_rois=[6], roi_sizes=["mixed", 8, 32], repeats=2, warmup=1, threads=1)
    assert len(rows) == len(IMPLS) * 2 * 3  # impls x phases x sizes
    assert {r["resolved"] for r in rows if r["impl"] == "prroi"} == {"prroi[cpp]"}
    assert {r["resolved"] for r in rows if r["impl"] == "prroi_reference"} == {"prroi[reference]"}
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        if r["impl"] == "roi_align":
            assert r["ratio_to_roi_align"] == 1.0
    saved = json.loads((tmp_path / "bench_pool.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["config"]["threads"] == 1
    assert "cpu/prroi/forward/K=6" in saved["summary"]["max_cost_growth_4x_side"]  # sizes 8 and 32 form a 4x pair
    png = tmp_path / "plots" / "bench_pool.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and run.images["bench_pool"] == png
    columns, table_rows = run.tables["bench_pool"]
    assert len(table_rows) == len(rows) and "ratio_to_roi_align" in columns
    assert len(run.metrics) == len(rows)
    printed = run.console.file.getvalue()
    assert "prroi[cpp]" in printed and "roi_align(sr=2)" in printed and "4x larger RoI sides" in printed


def test_bench_pool_engine_rejects_bad_settings(tmp_path):
    from iouctl.engine.bench_pool import run_bench_pool

    with pytest.raises(ValueError, match="unknown impl 'roi_warp'; valid: all, prroi"):
        run_bench_pool(FakeRun(tmp_path), impls=["roi_warp"], devices=["cpu"])
    with pytest.raises(ValueError, match="unknown device 'tpu'; valid: cpu, cuda, auto"):
        run_bench_pool(FakeRun(tmp_path), impls=["prroi"], devices=["tpu"])
    with pytest.raises(ValueError, match="roi_sizes entries must be positive numbers or 'mixed'"):
        run_bench_pool(FakeRun(tmp_path), impls=["prroi"], devices=["cpu"], roi_sizes=[-3])


def test_bench_pool_cuda_agreement_check():
    # the engine's CUDA-vs-CPU check, fed a stand-in "CUDA" implementation (the reference) on CPU tensors
    from iouctl.engine.bench_pool import _cuda_vs_cpu, make_boxes

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(1, 3, 10, 12, generator=gen)
    data = {s: (make_boxes(8, s, 1, (40, 48), gen), None) for s in ("mixed", 16)}
    stand_in = {"prroi": (lambda a, r: prroi_pool(a, r, 3, 0.25, impl="reference"), "prroi[cuda]")}
    diffs = _cuda_vs_cpu(stand_in, x, x, data, 3, 0.25)
    assert set(diffs) == {"mixed", 16} and all(0 <= d <= 1e-5 for d in diffs.values())  # float32 agreement
    shifted = {"prroi": (lambda a, r: prroi_pool(a, r, 3, 0.25) * 1.01, "prroi[cuda]")}
    assert all(d > 5e-3 for d in _cuda_vs_cpu(shifted, x, x, data, 3, 0.25).values())  # a 1% error is caught
    assert _cuda_vs_cpu({"prroi": (None, "prroi[reference]")}, x, x, data, 3, 0.25) == {}
