"""NMS arms on cached raw detections (config group `nms/`): greedy by any score, IoU-guided (IoU-Net Alg. 1), Soft-NMS.

Every arm works per image and per class, exactly (no coordinate-offset trick), in one kernel call for all images.
An arm returns the rows it keeps and the score it reports for each: the ranking score for greedy and Soft-NMS
(decayed for Soft-NMS), the cluster's best classification score for IoU-guided NMS.
"""
from __future__ import annotations

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


@dataclass
class Kept:
    index: Tensor   # int64 [K] rows of the input detections, image by image, best reported score first
    scores: Tensor  # float32 [K] the score each kept detection reports

    def apply(self, dets: Detections) -> Detections:
        out = dets.select(self.index)
        out.scores = self.scores.to(out.scores.dtype)
        return out


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
        pairs = torch.stack([dets.image_ids, dets.labels], dim=1)
        groups = torch.unique(pairs, dim=0, return_inverse=True)[1]
        k, s = self._groups(dets, groups)
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
