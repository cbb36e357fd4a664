"""The NMS arms that came after greedy NMS (config group `nms/`): DIoU-NMS, Matrix NMS, Cluster-NMS (+SPM, +D, +W),
box voting and Weighted Boxes Fusion, on cached raw detections (ops: iouctl.ops.postprocess).

Each arm works per (image, class), exactly, in one kernel call for all images, ranks by `score` (cls, the predicted
IoU, or the fused cls^a * IoU^(1-a) of the model that made the detections) and keeps the `max_per_image` best
reported scores of each image. Arms that move boxes (box voting, Cluster-NMS +W, WBF) return KeptBoxes: the kept rows,
their reported scores and their new boxes (iouctl.postprocess.suppression).
"""
from __future__ import annotations

import torch
from torch import Tensor

from iouctl.data.detections import Detections, rank_per_image
from iouctl.postprocess.suppression import Kept, KeptBoxes, _check_arm, _PerImageNMS, group_ids, ranking_score


def _nms_error(fn, *args) -> tuple:
    """Run an op's argument check, naming the config key (`nms.<key>`) in its one-line ValueError."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"nms.{e}") from None


def _settings(arm, **defaults) -> str:
    """",key=value" for each setting that differs from its default: arms of a grid that sweeps it get distinct names."""
    return "".join(f",{k}={getattr(arm, k):g}" for k, d in defaults.items() if getattr(arm, k) != d)


class _BoxArm(_PerImageNMS):
    """An arm whose `_groups` returns (kept rows, reported scores, new boxes)."""

    @property
    def moves_boxes(self) -> bool:
        """Whether the kept detections get new boxes (the grid must then score the returned boxes, not the rows')."""
        return True

    def keep(self, dets: Detections) -> Kept:
        """Per (image, class) in one kernel call; then the `max_per_image` best reported scores of each image, image
        by image, best first. A KeptBoxes when the arm moves boxes, else a Kept."""
        if len(dets) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=dets.device)
            return KeptBoxes(empty, torch.zeros(0, device=dets.device), torch.zeros(0, 4, device=dets.device))
        k, s, b = self._groups(dets, group_ids(dets))
        order, rank = rank_per_image(dets.image_ids[k], s)
        order = order[rank < self.max_per_image]
        if not self.moves_boxes:
            return Kept(k[order], s[order])
        return KeptBoxes(k[order], s[order], b[order])


class DIoUNMS(_PerImageNMS):
    """DIoU-NMS (Zheng et al. AAAI 2020) per class, ranked by `score`: greedy NMS whose rule subtracts the centre-
    distance penalty (rho^2/c^2)^beta from the IoU; reports the ranking score."""

    def __init__(self, iou_threshold: float = 0.5, beta: float = 1.0, score: str = "cls",
                 max_per_image: int = 100) -> None:
        from iouctl.ops.postprocess import check_beta

        _check_arm(iou_threshold, max_per_image, score)
        self.beta = _nms_error(check_beta, beta)
        self.iou_threshold, self.score, self.max_per_image = iou_threshold, score, max_per_image

    @property
    def name(self) -> str:
        return f"diou[{self.score}]@{self.iou_threshold:g}" + _settings(self, beta=1.0)

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor]:
        from iouctl.ops.postprocess import batched_diou_nms

        s = ranking_score(dets, self.score)
        keep = batched_diou_nms(dets.boxes, s, groups, self.iou_threshold, self.beta)
        return keep, s[keep]


class MatrixNMS(_PerImageNMS):
    """Matrix NMS (SOLOv2) for boxes per class: every detection's `score` decays at once by the higher-ranked boxes
    of its class (gaussian, sigma 2, or linear); nothing is removed, the decayed score is reported and ranks the
    `max_per_image` kept per image."""

    def __init__(self, kernel: str = "gaussian", sigma: float = 2.0, score: str = "cls",
                 max_per_image: int = 100) -> None:
        from iouctl.ops.postprocess import check_matrix_args

        _check_arm(0.5, max_per_image, score)  # Matrix NMS has no IoU threshold: 0.5 only passes the shared check
        self.kernel, self.sigma = _nms_error(check_matrix_args, kernel, sigma)
        self.score, self.max_per_image = score, max_per_image

    @property
    def name(self) -> str:
        return f"matrix-{self.kernel}[{self.score}]" + (_settings(self, sigma=2.0) if self.kernel == "gaussian" else "")

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor]:
        from iouctl.ops.postprocess import batched_matrix_nms

        s = ranking_score(dets, self.score)
        decayed = batched_matrix_nms(dets.boxes, s, groups, self.kernel, self.sigma)
        return torch.arange(len(dets), device=dets.device), decayed


class ClusterNMS(_BoxArm):
    """Cluster-NMS (Zheng et al. 2021) per class, ranked by `score`: plain (= greedy NMS), +SPM (soft score penalty,
    reports the decayed score), +D (distance: DIoU suppression, or with SPM a distance term in the penalty), +W
    (kept boxes move to the weighted mean of their neighbours with overlap > weight_threshold)."""

    def __init__(self, iou_threshold: float = 0.5, spm: bool = False, distance: bool = False, weighted: bool = False,
                 sigma: float = 0.2, beta: float = 0.6, weight_threshold: float = 0.8, score_threshold: float = 0.01,
                 max_iterations: int = 200, score: str = "cls", max_per_image: int = 100) -> None:
        from iouctl.ops.postprocess import check_cluster_args

        _check_arm(iou_threshold, max_per_image, score)
        (self.iou_threshold, self.spm, self.distance, self.weighted, self.sigma, self.score_threshold, self.beta,
         self.weight_threshold, self.max_iterations) = _nms_error(
            check_cluster_args, iou_threshold, spm, distance, weighted, sigma, score_threshold, beta,
            weight_threshold, max_iterations)
        self.score, self.max_per_image = score, max_per_image

    @property
    def moves_boxes(self) -> bool:
        return self.weighted

    @property
    def name(self) -> str:
        variant = "".join(f"+{v}" for v, on in (("spm", self.spm), ("d", self.distance), ("w", self.weighted)) if on)
        defaults = dict(max_iterations=200)
        if self.spm:
            defaults.update(sigma=0.2, score_threshold=0.01)
        if self.distance:
            defaults.update(beta=0.6)
        if self.weighted:
            defaults.update(weight_threshold=0.8)
        return f"cluster{variant}[{self.score}]@{self.iou_threshold:g}" + _settings(self, **defaults)

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from iouctl.ops.postprocess import batched_cluster_nms

        s = ranking_score(dets, self.score)
        out = batched_cluster_nms(dets.boxes, s, groups, self.iou_threshold, self.spm, self.distance, self.weighted,
                                  self.sigma, self.score_threshold, beta=self.beta,
                                  weight_threshold=self.weight_threshold, max_iterations=self.max_iterations)
        return out if self.weighted else (out[0], out[1], dets.boxes[out[0]])


class BoxVoting(_BoxArm):
    """Greedy NMS with box voting (Gidaris & Komodakis 2015; Detectron's BBOX_VOTE) per class, ranked by `score`:
    each kept box becomes the `score`-weighted mean of its class's boxes overlapping it by >= vote_threshold; reports
    the ranking score."""

    def __init__(self, iou_threshold: float = 0.5, vote_threshold: float = 0.8, score: str = "cls",
                 max_per_image: int = 100) -> None:
        from iouctl.ops.postprocess import check_vote_threshold

        _check_arm(iou_threshold, max_per_image, score)
        self.vote_threshold = _nms_error(check_vote_threshold, vote_threshold)
        self.iou_threshold, self.score, self.max_per_image = iou_threshold, score, max_per_image

    @property
    def name(self) -> str:
        return f"box-voting[{self.score}]@{self.iou_threshold:g}" + _settings(self, vote_threshold=0.8)

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from iouctl.ops.postprocess import batched_box_voting

        s = ranking_score(dets, self.score)
        keep, boxes = batched_box_voting(dets.boxes, s, groups, self.iou_threshold, self.vote_threshold)
        return keep, s[keep], boxes


class WeightedBoxesFusion(_BoxArm):
    """Weighted Boxes Fusion (Solovyev et al. 2021) of one model's detections per class, ranked and weighted by
    `score`: every cluster of boxes (IoU > iou_threshold with its fused box) becomes one detection with the
    score-weighted mean box and the mean (avg) or max of the scores, reported; it keeps its best box's row."""

    def __init__(self, iou_threshold: float = 0.55, skip_box_threshold: float = 0.0, conf_type: str = "avg",
                 score: str = "cls", max_per_image: int = 100) -> None:
        from iouctl.ops.postprocess import check_wbf_args

        _check_arm(iou_threshold, max_per_image, score)
        _, self.skip_box_threshold, self.conf_type = _nms_error(check_wbf_args, iou_threshold, skip_box_threshold,
                                                                conf_type)
        self.iou_threshold, self.score, self.max_per_image = iou_threshold, score, max_per_image

    @property
    def name(self) -> str:
        return f"wbf-{self.conf_type}[{self.score}]@{self.iou_threshold:g}" + _settings(self, skip_box_threshold=0.0)

    def _groups(self, dets: Detections, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from iouctl.ops.postprocess import batched_weighted_boxes_fusion

        s = ranking_score(dets, self.score)
        index, boxes, scores = batched_weighted_boxes_fusion(dets.boxes, s, groups, self.iou_threshold,
                                                             self.skip_box_threshold, self.conf_type)
        return index, scores, boxes
