"""NMS arms on cached raw detections (config group `nms/`): greedy by any score, IoU-guided (IoU-Net Alg. 1), Soft-NMS.

Every arm works per image and per class, exactly (no coordinate-offset trick), in one kernel call for all images.
An arm returns the rows it keeps and the score it reports for each: the ranking score for greedy and Soft-NMS
(decayed for Soft-NMS), the cluster's best classification score for IoU-guided NMS.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from iouctl.data.detections import Detections, rank_per_image
from iouctl.errors import IouctlError

SCORES = ("cls", "iou", "fused")


class NoPredictedIoU(IouctlError):
    """IoU-based arms on detections of a model without an IoU head."""


def ranking_score(dets: Detections, score: str) -> Tensor:
    """The score an arm ranks by: cls, the predicted IoU, or the fused cls^a * IoU^(1-a) (IoU-aware detector), with a
    the cls_weight of the model that made the detections (`dets.cls_weight`)."""
    if score not in SCORES:
        raise ValueError(f"nms.score={score!r} is not valid; choose one of {', '.join(SCORES)}")
    if score == "cls":
        return dets.scores
    if dets.ious is None:
        model = dets.meta.get("model", "this model")
        raise NoPredictedIoU(f"score={score!r} needs predicted IoUs, but the detections of {model} have none (no IoU "
                             f"head); use a model with one (iou_retina, iou_net) or score=cls")
    if score == "iou":
        return dets.ious
    from iouctl.ops import iou_aware_score

    return iou_aware_score(dets.scores, dets.ious, cls_weight=dets.cls_weight)


def all_scores(dets: Detections) -> dict[str, Tensor]:
    """Every ranking score the detections carry: cls, plus iou and fused when they have predicted IoUs."""
    return {s: ranking_score(dets, s) for s in (SCORES if dets.has_ious else ("cls",))}


_GROUPS: dict[int, tuple] = {}  # id(image_ids tensor) -> (its weakref, labels weakref, versions, groups)


def group_ids(dets: Detections) -> Tensor:
    """Tensor[N] int64: the (image, class) group of each row, numbered in (image id, label) order.

    Every arm of a grid needs the same groups: they are cached per ``dets.image_ids`` tensor while it and
    ``dets.labels`` are the same, unmodified tensors (an ablation of 41 arms on 5M COCO-sized rows sorted them
    41 times). Two 1-d uniques and one of their combined key: ``unique(dim=0)`` of the (image, label) pairs gives
    the same numbering at several times the cost."""
    img_t, lab_t = dets.image_ids, dets.labels
    hit = _GROUPS.get(id(img_t))
    if hit is not None and hit[0]() is img_t and hit[1]() is lab_t and hit[2] == (img_t._version, lab_t._version):
        return hit[3]
    img = torch.unique(img_t, return_inverse=True)[1]
    labels, lab = torch.unique(lab_t, return_inverse=True)
    groups = torch.unique(img * max(1, len(labels)) + lab, return_inverse=True)[1]
    key = id(img_t)
    # the entry leaves with its image_ids tensor (tensors compare element-wise: no WeakKeyDictionary)
    _GROUPS[key] = (weakref.ref(img_t, lambda _: _GROUPS.pop(key, None)), weakref.ref(lab_t),
                    (img_t._version, lab_t._version), groups)
    return groups


@dataclass
class Kept:
    index: Tensor   # int64 [K] rows of the input detections, image by image, best reported score first
    scores: Tensor  # float32 [K] the score each kept detection reports

    def apply(self, dets: Detections) -> Detections:
        out = dets.select(self.index)
        out.scores = self.scores.to(out.scores.dtype)
        return out


@dataclass
class KeptBoxes(Kept):
    """Kept rows (``index``), reported ``scores`` and the new boxes (float32 [K, 4] xyxy) that replace theirs."""

    boxes: Tensor = None

    def apply(self, dets: Detections) -> Detections:
        out = super().apply(dets)
        return Detections(out.image_ids, self.boxes.to(out.boxes.dtype), out.labels, out.scores, out.ious, out.meta)


def _check_arm(iou_threshold: float, max_per_image: int, score: str = "cls") -> None:
    from iouctl.ops.nms import check_real

    check_real(iou_threshold, "nms.iou_threshold", 0.0, 1.0)
    if score not in SCORES:
        raise ValueError(f"nms.score={score!r} is not valid; choose one of {', '.join(SCORES)}")
    if isinstance(max_per_image, bool) or not isinstance(max_per_image, int) or max_per_image < 1:
        raise ValueError(f"nms.max_per_image must be an integer >= 1, got {max_per_image!r}")


class _PerImageNMS:
    max_per_image: int
    score: str = "cls"

    @property
    def needs_iou(self) -> bool:
        """Whether the arm reads predicted IoUs (so it cannot run on a model without an IoU head)."""
        return self.score != "cls"

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor]:
        """(kept rows, reported scores) of the arm run independently within each group id."""
        raise NotImplementedError

    def keep(self, dets: Detections) -> Kept:
        """Run the arm per (image, class) in one kernel call; then the `max_per_image` best reported scores of each
        image, image by image, best first."""
        if len(dets) == 0:
            return Kept(torch.zeros(0, dtype=torch.int64, device=dets.device), torch.zeros(0, device=dets.device))
        k, s = self._groups(dets, group_ids(dets))
        order, rank = rank_per_image(dets.image_ids[k], s)
        order = order[rank < self.max_per_image]
        return Kept(k[order], s[order])

    def __call__(self, dets: Detections) -> Detections:
        return self.keep(dets).apply(dets)


class GreedyNMS(_PerImageNMS):
    """Greedy NMS per class, ranked by `score` (cls: the usual baseline); reports the ranking score."""

    def __init__(self, iou_threshold: float = 0.5, score: str = "cls", max_per_image: int = 100) -> None:
        _check_arm(iou_threshold, max_per_image, score)
        self.iou_threshold, self.score, self.max_per_image = iou_threshold, score, max_per_image

    @property
    def name(self) -> str:
        return f"greedy[{self.score}]@{self.iou_threshold:g}"

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor]:
        from iouctl.ops import batched_nms

        s = ranking_score(dets, self.score)
        keep = batched_nms(dets.boxes, s, groups, self.iou_threshold)
        return keep, s[keep]


class IoUGuidedNMS(_PerImageNMS):
    """IoU-Net Alg. 1: rank by predicted IoU, each kept box reports the best cls score of the boxes it suppressed."""

    score = "iou"

    def __init__(self, iou_threshold: float = 0.5, max_per_image: int = 100) -> None:
        _check_arm(iou_threshold, max_per_image)
        self.iou_threshold, self.max_per_image = iou_threshold, max_per_image

    @property
    def name(self) -> str:
        return f"iou-guided@{self.iou_threshold:g}"

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor]:
        from iouctl.ops import batched_iou_guided_nms

        ious = ranking_score(dets, "iou")
        return batched_iou_guided_nms(dets.boxes, dets.scores, ious, groups, self.iou_threshold)


class SoftNMS(_PerImageNMS):
    """Soft-NMS (Bodla et al.) per class on the ranking score; reports the decayed score. The gaussian decay has no
    IoU threshold (iou_threshold is used by the linear decay only)."""

    def __init__(self, method: str = "gaussian", sigma: float = 0.5, iou_threshold: float = 0.3,
                 score_threshold: float = 0.001, score: str = "cls", max_per_image: int = 100) -> None:
        from iouctl.ops.nms import check_soft_args

        try:
            check_soft_args(method, sigma, iou_threshold, score_threshold)
        except ValueError as e:
            raise ValueError(f"nms.{e}") from None
        _check_arm(iou_threshold, max_per_image, score)
        self.method, self.sigma, self.iou_threshold, self.score_threshold = method, sigma, iou_threshold, score_threshold
        self.score, self.max_per_image = score, max_per_image

    @property
    def name(self) -> str:
        return f"soft-{self.method}[{self.score}]" + (f"@{self.iou_threshold:g}" if self.method == "linear" else "")

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor]:
        from iouctl.ops import batched_soft_nms

        s = ranking_score(dets, self.score)
        return batched_soft_nms(dets.boxes, s, groups, method=self.method, sigma=self.sigma,
                                iou_threshold=self.iou_threshold, score_threshold=self.score_threshold)
