"""Box IoU: one function per backend, one rule.

Boxes are (x1, y1, x2, y2) with area (x2 - x1) * (y2 - y1), no +1 (torchvision's convention).

The rule. A box with x2 <= x1 or y2 <= y1 is empty, and an empty box overlaps nothing: its IoU with any box is 0,
also with an identical empty box, whose union is 0 (torchvision.ops.box_iou gives 0 / 0 = NaN there, and a
negative area for x2 < x1). Every other pair has IoU = inter / ((area1 + area2) - inter), term for term as
torchvision.ops.box_iou, so valid boxes get the same bits. A NaN coordinate gives NaN.

Backends:
- torch: ``box_iou`` (every pair, Tensor[N, M]) and ``paired_box_iou`` (row i with row i, Tensor[P]); both
  differentiable, with finite gradients on empty boxes.
- numpy: ``paired_box_iou_np`` (also cocoeval's crowd overlap).
- kernel: ``iouctl::box_iou`` in kernels/nms/nms_math.h, one function for the CPU and CUDA kernels of every op
  library; its term-for-term PyTorch mirror for the references is ``iouctl.ops.reference.kernel_box_iou``. It is the
  expression above without the rule (torchvision's nms, bit for bit): an empty box gives 0, -0 or 0 / 0 = NaN, and
  every kernel rule reads those as no overlap (``iou > thr``, Soft-NMS's ``iou > 0``, voting's ``iou >= thr`` are
  false for NaN), so the kernels decide as the rule says.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["box_iou", "paired_box_iou", "paired_box_iou_np"]


def _area(boxes: Tensor) -> Tensor:
    """Tensor[..., 4] -> Tensor[...]: 0 for an empty (or inverted) box."""
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(dim=-1)


def _inter(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection areas of broadcastable Tensor[..., 4] boxes -> Tensor[...]."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    return (rb - lt).clamp(min=0).prod(dim=-1)


def _ratio(inter: Tensor, union: Tensor) -> Tensor:
    # union <= 0 only when inter = 0 (an empty box): dividing by 1 there gives the rule's 0, lets NaN through, and
    # keeps the division finite, so autograd sees no 0 / 0 (torch.where would leak its NaN gradient).
    return inter / torch.where(union > 0, union, torch.ones_like(union))


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair of boxes, under the module's rule.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): x1, y1, x2, y2, floating point.
    Returns:
        Tensor[N, M] in the boxes' (promoted) dtype; equal to torchvision.ops.box_iou wherever that is not NaN.
    """
    inter = _inter(boxes1[:, None, :], boxes2[None, :, :])
    return _ratio(inter, (_area(boxes1)[:, None] + _area(boxes2)[None, :]) - inter)


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of boxes1[i] with boxes2[i], under the module's rule.

    Args:
        boxes1, boxes2 (Tensor[P, 4]): x1, y1, x2, y2, floating point.
    Returns:
        Tensor[P]: the diagonal of ``box_iou(boxes1, boxes2)``, without the P x P matrix.
    """
    inter = _inter(boxes1, boxes2)
    return _ratio(inter, (_area(boxes1) + _area(boxes2)) - inter)


def paired_box_iou_np(boxes1: np.ndarray, boxes2: np.ndarray, crowd: bool = False) -> np.ndarray:
    """``paired_box_iou`` for numpy arrays, on coordinate columns (several times faster than on [P, 2] slices).

    Args:
        boxes1, boxes2 (ndarray[P, 4]): x1, y1, x2, y2.
        crowd: boxes2 are crowd regions: the overlap is intersection / area of boxes1 (cocoeval's iscrowd rule),
            0 for an empty boxes1.
    Returns:
        ndarray[P] in the arrays' (promoted) dtype.
    """
    a, b = boxes1, boxes2
    inter = ((np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
             * (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0))
    union = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    if not crowd:
        union = (union + (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)) - inter
    return inter / np.where(union > 0, union, 1)
