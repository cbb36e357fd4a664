"""Plain-loop box IoU, the tests' oracles: scalar Python on one pair of boxes, independent of iouctl.ops.boxes,
iouctl.ops.reference and the kernels (no tensor arithmetic, no shared code)."""
from __future__ import annotations

import math

import numpy as np
import torch

NP = {torch.float32: np.float32, torch.float64: np.float64}  # the numpy scalar type a loop computes in, per box dtype


def loop_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes in float64 under iouctl.ops.boxes' rule, written from its definition:
    an empty box (x2 <= x1 or y2 <= y1) overlaps nothing; otherwise intersection / union."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if any(math.isnan(v) for v in a + b):
        return math.nan
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def numpy_rows(boxes: torch.Tensor) -> list[list]:
    """Tensor[N, 4] (float32 or float64) -> N rows of 4 numpy scalars of that dtype, for ``loop_kernel_iou``."""
    f = NP[boxes.dtype]
    return [[f(v) for v in row] for row in boxes.tolist()]


def loop_kernel_iou(a, b, f) -> float:
    """iouctl::box_iou on two boxes given as numpy scalars of type f (numpy rounds every float32 operation to float32,
    as the kernel does): std::max/std::min semantics (box a first), torchvision's term order, signed areas, no
    zero-union rule (two empty boxes give 0 / 0 = NaN). Returned as a Python float (exact: float32 -> float64)."""
    def mx(p, q):
        return q if p < q else p

    def mn(p, q):
        return q if q < p else p

    zero = f(0)
    with np.errstate(all="ignore"):  # 0 / 0, and inf/NaN coordinates, are part of the tests
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        w = mx(zero, mn(a[2], b[2]) - mx(a[0], b[0]))
        h = mx(zero, mn(a[3], b[3]) - mx(a[1], b[1]))
        inter = w * h
        return float(inter / (area_a + area_b - inter))
