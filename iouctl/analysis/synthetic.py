"""Synthetic raw detections for a COCO ground truth: a stand-in detector for tests and for nms-ablate.

The noise model mimics what IoU-Net measured on real detectors (Fig. 2): classification scores follow the
*object* (how easy it is to recognise) and only weakly the box quality, while a predicted IoU follows the box
quality closely. Per non-crowd GT box: ``per_gt`` jittered copies with IoUs spread over ``iou_range``;
a fraction relabelled to a wrong class; plus background boxes scattered over each image.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from iouctl.analysis.correlation import true_iou
from iouctl.analysis.groundtruth import GroundTruth, load_gt
from iouctl.data.detections import Detections
from iouctl.ops.boxes import paired_box_iou_np

KIND_JITTERED, KIND_WRONG_CLASS, KIND_BACKGROUND = 0, 1, 2
# Predicted IoU of a background box = its true IoU + U(a, b): IoU heads never see negatives in training,
# so their predictions there run high (users' reports on the IoU-aware RetinaNet).
BACKGROUND_PRED_BIAS = (0.1, 0.7)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def synthesize_detections(
    gt: str | os.PathLike | GroundTruth,
    seed: int = 0,
    per_gt: int = 16,
    iou_range: tuple[float, float] = (0.3, 0.98),
    iou_beta: tuple[float, float] = (2.0, 1.2),
    wrong_class_frac: float = 0.05,
    background_per_image: float = 4.0,
    cls_iou_weight: float = 1.0,
    iou_noise: float = 0.1,
    return_kind: bool = False,
) -> Detections | tuple[Detections, Tensor]:
    """Deterministic (given ``seed``) raw detections with cls scores and predicted IoUs.

    Args:
        gt: COCO ground-truth json path or GroundTruth.
        per_gt: jittered boxes per non-crowd GT box; their IoU with it is lo + (hi - lo) * Beta(*iou_beta)
            over ``iou_range`` (exact before clipping to the image). Beta(2, 1.2) puts the median near 0.75,
            as a trained regressor does; Beta(1, 1) is uniform.
        wrong_class_frac: fraction of jittered boxes given another category (needs >= 2 categories).
        background_per_image: mean (Poisson) number of random boxes per image.
        cls_iou_weight: slope of the cls logit in the box's IoU (the object term has slope 1.2 per sd).
        iou_noise: sd of the Gaussian noise on predicted IoU (clipped to [0, 1]).
        return_kind: also return Tensor[N] int64: 0 jittered, 1 wrong class, 2 background.
    Returns:
        Detections with ``ious`` set, rows sorted by image id (stable); meta holds the settings.
    """
    lo, hi = iou_range
    if not 0.14 <= lo < hi < 1.0:
        raise ValueError(f"synthesize_detections: iou_range must satisfy 0.14 <= lo < hi < 1, got {iou_range}")
    if per_gt < 0 or background_per_image < 0 or not 0.0 <= wrong_class_frac <= 1.0 or iou_noise < 0:
        raise ValueError(
            "synthesize_detections: per_gt, background_per_image, iou_noise must be >= 0 and wrong_class_frac in [0, 1]"
        )
    if len(iou_beta) != 2 or min(iou_beta) <= 0:
        raise ValueError(f"synthesize_detections: iou_beta must be two positive Beta shape parameters, got {iou_beta}")
    g = load_gt(gt)
    rng = np.random.default_rng(seed)
    cats = g.category_ids.numpy()
    sizes = {img["id"]: (float(img["width"]), float(img["height"])) for img in g.dataset["images"]}
    anns = [a for a in g.dataset["annotations"] if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    # ---- jittered copies of each GT box, IoU set by bisection along a random (shift, log-scale) direction
    G = len(anns)
    src = np.repeat(np.arange(G), per_gt)
    gxywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)[src]
    gxyxy = np.concatenate([gxywh[:, :2], gxywh[:, :2] + gxywh[:, 2:]], 1)
    target = lo + (hi - lo) * rng.beta(iou_beta[0], iou_beta[1], size=len(src))
    u = rng.normal(size=(len(src), 4))
    u /= np.linalg.norm(u, axis=1, keepdims=True).clip(min=1e-12)
    cxcy = gxywh[:, :2] + gxywh[:, 2:] / 2

    def box_at(m: np.ndarray) -> np.ndarray:
        c = cxcy + m[:, None] * u[:, :2] * gxywh[:, 2:]
        wh = gxywh[:, 2:] * np.exp(m[:, None] * u[:, 2:])
        return np.concatenate([c - wh / 2, c + wh / 2], 1)

    # IoU(0) = 1 and IoU(8) <= e^-2 = 0.135 for any unit direction (2-D IoU <= the 1-D IoU of either axis:
    # a log-scale component >= 0.25 caps it at e^-2; otherwise a shift component > 0.66 separates the boxes),
    # so bisection on the continuous IoU(m) - target finds a root for any target > 0.135.
    a_m, b_m = np.zeros(len(src)), np.full(len(src), 8.0)
    for _ in range(32):  # interval 8 / 2^32: IoU within ~1e-8 of its target
        mid = (a_m + b_m) / 2
        above = paired_box_iou_np(box_at(mid), gxyxy) > target
        a_m, b_m = np.where(above, mid, a_m), np.where(above, b_m, mid)
    boxes = box_at((a_m + b_m) / 2)
    img_ids = np.array([a["image_id"] for a in anns], dtype=np.int64).reshape(-1)[src]
    labels = np.array([a["category_id"] for a in anns], dtype=np.int64).reshape(-1)[src]
    wh_img = np.array([sizes[i] for i in img_ids], dtype=np.float64).reshape(-1, 2)
    boxes = np.clip(boxes, 0, np.concatenate([wh_img, wh_img], 1))
    loc_iou = paired_box_iou_np(boxes, gxyxy)  # quality w.r.t. the object the box was made from (clipping may lower it)

    kind = np.full(len(src), KIND_JITTERED, dtype=np.int64)
    if len(cats) > 1 and len(src):
        wrong = rng.random(len(src)) < wrong_class_frac
        shift = rng.integers(1, len(cats), size=len(src))
        idx = np.searchsorted(cats, labels)
        labels = np.where(wrong, cats[(idx + shift) % len(cats)], labels)
        kind[wrong] = KIND_WRONG_CLASS

    # Classification: mostly "how recognisable is this object" (shared by all its boxes), weakly box quality.
    ease = rng.normal(size=G)[src]
    cls_logit = 0.5 + 1.2 * ease + cls_iou_weight * (loc_iou - 0.65) + rng.normal(0, 0.8, len(src))
    cls_logit = np.where(kind == KIND_WRONG_CLASS, cls_logit - 1.5, cls_logit)
    pred_iou = loc_iou + rng.normal(0, iou_noise, len(src))

    # ---- background boxes
    bg_img, bg_box = [], []
    for img_id, (w, h) in sizes.items():
        k = int(rng.poisson(background_per_image)) if len(cats) else 0  # no category, no label to give
        bw = w * np.exp(rng.uniform(np.log(0.05), np.log(0.5), k))
        bh = h * np.exp(rng.uniform(np.log(0.05), np.log(0.5), k))
        x1 = rng.uniform(0, 1, k) * (w - bw)
        y1 = rng.uniform(0, 1, k) * (h - bh)
        bg_img.append(np.full(k, img_id, dtype=np.int64))
        bg_box.append(np.stack([x1, y1, x1 + bw, y1 + bh], 1))
    bg_img_a = np.concatenate(bg_img) if bg_img else np.zeros(0, np.int64)
    bg_box_a = np.concatenate(bg_box) if bg_box else np.zeros((0, 4))
    nb = len(bg_img_a)
    bg_lab = cats[rng.integers(0, len(cats), nb)] if nb else np.zeros(0, np.int64)
    bg_det = Detections(
        torch.from_numpy(bg_img_a), torch.from_numpy(bg_box_a), torch.from_numpy(bg_lab), torch.zeros(nb)
    )
    bg_loc = true_iou(g, bg_det).numpy() if nb else np.zeros(0)
    bg_cls_logit = -1.0 + rng.normal(0, 1.2, nb)
    bg_pred = bg_loc + rng.uniform(*BACKGROUND_PRED_BIAS, nb)

    all_img = np.concatenate([img_ids, bg_img_a])
    order = np.argsort(all_img, kind="stable")
    dets = Detections(
        torch.from_numpy(all_img[order]),
        torch.from_numpy(np.concatenate([boxes, bg_box_a])[order]),
        torch.from_numpy(np.concatenate([labels, bg_lab])[order]),
        torch.from_numpy(_sigmoid(np.concatenate([cls_logit, bg_cls_logit]))[order]),
        torch.from_numpy(np.clip(np.concatenate([pred_iou, bg_pred]), 0.0, 1.0)[order]),
        meta={
            "model": "synthetic",
            "dataset": g.name,
            "seed": seed,
            "per_gt": per_gt,
            "iou_range": [lo, hi],
            "iou_beta": list(iou_beta),
            "wrong_class_frac": wrong_class_frac,
            "background_per_image": background_per_image,
            "cls_iou_weight": cls_iou_weight,
            "iou_noise": iou_noise,
        },
    )
    if return_kind:
        kinds = np.concatenate([kind, np.full(nb, KIND_BACKGROUND, dtype=np.int64)])[order]
        return dets, torch.from_numpy(kinds)
    return dets
