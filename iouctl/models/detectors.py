"""Detector builders, one per config option of `model/` (the detectors themselves arrive with the training issue).

The signatures are the contract the configs are checked against; until the models exist, building one stops with one
clear line instead of a traceback.
"""
from __future__ import annotations

from typing import Optional, Sequence

from iouctl.errors import NotAvailableYet

_MISSING = "the detectors (retina, iou_retina, faster_rcnn, iou_net) are not implemented yet in this version of iouctl"


def retinanet(backbone: str, pretrained: Optional[str], min_size: int, max_size: int, anchor_sizes: Sequence[int],
              aspect_ratios: Sequence[float], detections_per_img: int, iou_head: bool, iou_loss_weight: float,
              score_thresh: float, topk_candidates: int, cls_weight: float, detach_iou_target: bool,
              num_classes: Optional[int] = None):
    """RetinaNet (iou_head=False) or IoU-aware RetinaNet (iou_head=True)."""
    raise NotAvailableYet(_MISSING)


def faster_rcnn(backbone: str, pretrained: Optional[str], min_size: int, max_size: int, anchor_sizes: Sequence[int],
                aspect_ratios: Sequence[float], detections_per_img: int, iou_head: bool, iou_loss_weight: float,
                box_score_thresh: float, iou_loss: str, jitter_per_gt: int, iou_bins: int,
                num_classes: Optional[int] = None, pool=None):
    """FPN Faster R-CNN (iou_head=False) or IoU-Net (iou_head=True)."""
    raise NotAvailableYet(_MISSING)
