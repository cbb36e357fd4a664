"""Ops: the Python face of the C++/CUDA kernels in ``kernels/`` and their pure-PyTorch references.

Importing this package builds nothing: a kernel library is compiled (and cached) on the first call that needs it.
"""
from iouctl.ops._extension import implementations
from iouctl.ops.boxes import box_iou, paired_box_iou
from iouctl.ops.nms import (
    batched_iou_guided_nms, batched_nms, batched_soft_nms, iou_aware_score, iou_guided_nms, nms, soft_nms,
)
from iouctl.ops.postprocess import (
    batched_box_voting, batched_cluster_nms, batched_diou_nms, batched_matrix_nms, batched_weighted_boxes_fusion,
    box_voting, cluster_nms, diou_nms, matrix_nms, weighted_boxes_fusion,
)
from iouctl.ops.prroi_pool import PrRoIPool, prroi_pool

__all__ = [
    "PrRoIPool", "prroi_pool", "iou_guided_nms", "batched_iou_guided_nms", "soft_nms", "batched_soft_nms",
    "iou_aware_score", "nms", "batched_nms", "implementations", "box_iou", "paired_box_iou",
    "diou_nms", "batched_diou_nms", "matrix_nms", "batched_matrix_nms", "cluster_nms", "batched_cluster_nms",
    "box_voting", "batched_box_voting", "weighted_boxes_fusion", "batched_weighted_boxes_fusion",
]
