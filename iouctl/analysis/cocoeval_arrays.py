"""cocoeval's box evaluation on arrays: the numbers of faster-coco-eval, bit for bit, without a dict per detection.

faster-coco-eval spends most of an evaluation building and walking Python dicts (loadRes, its index, one IoU call per
image and class); here the same steps run on the detections table: IoUs with cocoeval's expression (maskApi's
``bbIou`` on the [x, y, w, h] boxes loadRes would store), the greedy matching per image and class and the
precision/recall accumulation in C++ (kernels/coco_eval/, the same loops as faster-coco-eval's), and the summary with
cocoeval's own numpy means. Checked equal to faster-coco-eval bit for bit (every stat and the precision/recall tables)
and to pycocotools to its epsilon in tests/analysis/test_cocoeval_arrays.py.

The ground truth's side (every annotation, crowd regions included, in cocoeval's order; ignore flags per area
range) is built once per GroundTruth and shared by every evaluation, e.g. by the forked workers of nms-ablate.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iouctl.analysis.coco_eval import IOU_THRESHOLDS
from iouctl.analysis.errors import RECALL_THRESHOLDS as REC_THRS, _index_of, _ranges, _rank_within
from iouctl.analysis.groundtruth import GroundTruth
from iouctl.data.detections import Detections

# cocoeval's parameters (faster-coco-eval's Params.setDetParams / pycocotools' Params): the IoU and recall
# thresholds are the ones the rest of iouctl.analysis uses, built as cocoeval builds them.
IOU_THRS = np.asarray(IOU_THRESHOLDS)
MAX_DETS = [1, 10, 100]
AREA_RNG = np.asarray([[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]], dtype=np.float64)
AREA_LBL = ["all", "small", "medium", "large"]


@dataclass
class GTArrays:
    """Every annotation of a GroundTruth (crowd included), sorted by (image, class) as ``g.keys``, annotation order
    within: what cocoeval matches against."""

    keys: np.ndarray     # int64 [G]: image_index * K + category_index
    xywh: np.ndarray     # float64 [G, 4]: the annotation's bbox
    crowd: np.ndarray    # bool [G]
    ignore: np.ndarray   # bool [A, G]: crowd, or area outside the area range (cocoeval's gtIgnore)
    num_gt: np.ndarray   # int64 [K, A]: ground truths not ignored, per class and area range


_GT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gt_arrays(g: GroundTruth) -> GTArrays:
    """The GTArrays of ``g``, built once per GroundTruth."""
    if g not in _GT:
        anns = g.dataset["annotations"]
        K = len(g.category_ids)
        if anns:
            img = torch.tensor([a["image_id"] for a in anns], dtype=torch.int64)
            cat = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
            keys = g.key(img, cat).numpy()
            xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            area = np.asarray([a["area"] for a in anns], dtype=np.float64)
            crowd = np.asarray([bool(a["iscrowd"]) for a in anns])
        else:
            keys, xywh = np.zeros(0, np.int64), np.zeros((0, 4))
            area, crowd = np.zeros(0), np.zeros(0, bool)
        order = np.argsort(keys, kind="stable")
        keys, xywh, area, crowd = keys[order], xywh[order], area[order], crowd[order]
        ignore = crowd[None, :] | (area[None, :] < AREA_RNG[:, :1]) | (area[None, :] > AREA_RNG[:, 1:])
        num_gt = np.stack([np.bincount(keys[~ig] % K, minlength=K) for ig in ignore], 1).astype(np.int64)
        _GT[g] = GTArrays(keys, xywh, crowd, ignore, num_gt.reshape(K, len(AREA_RNG)))
    return _GT[g]


def bb_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """maskApi's ``bbIou`` (pycocotools, faster-coco-eval) of paired [x, y, w, h] boxes, float64 [P, 4] each, the same
    operations in the same order: intersection over the union, or over the detection's area for crowd regions
    (bool [P]); 0 without overlap."""
    da = dt[:, 2] * dt[:, 3]
    ga = gt[:, 2] * gt[:, 3]
    w = np.minimum(dt[:, 2] + dt[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 3] + dt[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(dt[:, 1], gt[:, 1])
    i = w * h
    u = np.where(crowd, da, da + ga - i)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((w <= 0) | (h <= 0), 0.0, i / u)


def evaluate_arrays(g: GroundTruth, dets: Detections, scores: Tensor | None = None) -> dict[str, Any]:
    """cocoeval's bbox evaluation of ``dets`` (N detections, labels = COCO category ids; ``scores`` Tensor[N]
    replaces ``dets.scores``): the dict of ``iouctl.analysis.evaluate``, equal to its faster-coco-eval backend's bit
    for bit. Needs the coco_eval kernels (``iouctl.ops.coco_eval.available()``)."""
    from iouctl.analysis.coco_eval import summarize_eval

    precision, recall = eval_tables(g, dets, scores)
    return summarize_eval(_stats(precision, recall), precision)


def eval_tables(g: GroundTruth, dets: Detections, scores: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cocoeval's ``eval["precision"]`` (float64[T=10, R=101, K, A=4, M=3]) and ``eval["recall"]`` ([T, K, A, M]) of
    ``dets`` (as ``evaluate_arrays``)."""
    from iouctl.ops.coco_eval import coco_accumulate, coco_match

    ga = gt_arrays(g)
    K = len(g.category_ids)
    # what loadRes stores: the score as float64, the box as [x, y, w, h] in float64 (Detections.to_coco_results)
    s = dets._score_arg(scores, "evaluate").detach().cpu().to(torch.float64).numpy()
    xywh = dets.boxes.detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
    xywh[:, 2:] -= xywh[:, :2]
    image_ids, labels = dets.image_ids.cpu().numpy(), dets.labels.cpu().numpy()
    img = _index_of(g.image_ids.numpy(), image_ids)
    cls = _index_of(g.category_ids.numpy(), labels)
    if (img < 0).any() or (cls < 0).any():
        g.check_ids(dets.image_ids, dets.labels, "detections")  # raises, naming the unknown ids
    key = img * K + cls
    rank = _rank_within(key, -s)
    keep = np.flatnonzero(rank < MAX_DETS[-1])  # cocoeval evaluates the best maxDets[-1] of each image and class
    # matching order: (image, class), then rank (< MAX_DETS[-1], so one integer key holds both)
    keep = keep[np.argsort(key[keep] * MAX_DETS[-1] + rank[keep], kind="stable")]
    s, xywh, img, cls, key, rank = s[keep], xywh[keep], img[keep], cls[keep], key[keep], rank[keep]
    n = len(keep)
    # pairs with every annotation of the detection's image and class, crowd regions included
    lo, hi = np.searchsorted(ga.keys, key, "left"), np.searchsorted(ga.keys, key, "right")
    cnt = hi - lo
    pair_gt = _ranges(lo, cnt)
    pair_det = np.repeat(np.arange(n), cnt)
    iou = bb_iou(xywh[pair_det], ga.xywh[pair_gt], ga.crowd[pair_gt])
    pair_offsets = np.r_[0, np.cumsum(cnt)]
    group_offsets = np.r_[np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if n else np.zeros(0, np.int64), n]
    area = xywh[:, 2] * xywh[:, 3]
    outside = (area[None, :] < AREA_RNG[:, :1]) | (area[None, :] > AREA_RNG[:, 1:])
    match, ignored = coco_match(iou, pair_gt, pair_offsets, group_offsets, ga.ignore, ga.crowd, outside, IOU_THRS)
    tp, fp = (match >= 0) & ~ignored, (match < 0) & ~ignored
    # accumulation order per class: score descending, then image, then rank (faster-coco-eval's stable sort of the
    # per-image lists); the matching order is (image, class, rank), so a stable sort by score, then by class, gives it
    order = np.argsort(-s, kind="stable")
    order = order[np.argsort(cls[order], kind="stable")]
    class_offsets = np.r_[0, np.cumsum(np.bincount(cls, minlength=K))]
    return coco_accumulate(tp[:, :, order], fp[:, :, order], class_offsets, rank[order], ga.num_gt, REC_THRS,
                           MAX_DETS)


def _summarize(precision: np.ndarray, recall: np.ndarray, ap: bool, iou_thr: float | None = None,
               area: str = "all", max_dets: int = 100) -> float:
    """cocoeval's ``_summarize``, the same numpy expression (so the same rounding)."""
    aind, mind = AREA_LBL.index(area), MAX_DETS.index(max_dets)
    s = precision if ap else recall
    if iou_thr is not None:
        s = s[np.where(iou_thr == IOU_THRS)[0]]
    s = s[:, :, :, aind, mind] if ap else s[:, :, aind, mind]
    return -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])


def _stats(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """cocoeval's 12 summary stats (AP, AP50, AP75, AP_S/M/L, AR1/10/100, AR_S/M/L)."""
    stats = np.zeros(12)
    stats[0] = _summarize(precision, recall, True)
    stats[1] = _summarize(precision, recall, True, iou_thr=0.5)
    stats[2] = _summarize(precision, recall, True, iou_thr=0.75)
    for i, lbl in enumerate(AREA_LBL[1:]):
        stats[3 + i] = _summarize(precision, recall, True, area=lbl)
    for i, m in enumerate(MAX_DETS):
        stats[6 + i] = _summarize(precision, recall, False, max_dets=m)
    for i, lbl in enumerate(AREA_LBL[1:]):
        stats[9 + i] = _summarize(precision, recall, False, area=lbl)
    return stats


__all__ = ["GTArrays", "bb_iou", "eval_tables", "evaluate_arrays", "gt_arrays"]
