"""Ops: the Python face of the C++/CUDA kernels in ``kernels/`` and their pure-PyTorch references.

Importing this package builds nothing: a kernel library is compiled (and cached) on the first call that needs it.
"""
from iouctl.ops.nms import (
    batched_iou_guided_nms, batched_nms, batched_soft_nms, iou_aware_score, iou_guided_nms, nms, soft_nms,
)
from iouctl.ops.prroi_pool import PrRoIPool, prroi_pool

__all__ = [
    "PrRoIPool", "prroi_pool", "iou_guided_nms", "batched_iou_guided_nms", "soft_nms", "batched_soft_nms",
    "iou_aware_score", "nms", "batched_nms",
]
