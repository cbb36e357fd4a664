"""The detector contract: what every iouctl detector returns and declares, written once.

Every detector (RetinaNet with each quality head, FPN Faster R-CNN, IoU-Net) is an ``nn.Module`` called as

    model(images: list[Tensor[3, H, W]] float in [0, 1],
          targets: list[{"boxes": Tensor[K, 4] float xyxy pixels, "labels": Tensor[K] int64 in [0, num_classes)}]
                   | None)

- train mode (``model.train()``, targets given) -> dict[str, Tensor[]]: named scalar losses, their sum is optimised;
- eval mode -> list (one per image) of raw, pre-NMS detections in the input image's pixels:
  {"boxes": float32 [M, 4], "labels": int64 [M] in [0, num_classes), "scores": float32 [M] in [0, 1]
  (the classification score), "ious": float32 [M] in [0, 1] (only when ``ious_meaning`` is not None)}.
  NMS and score fusion are post-processing (iouctl.postprocess), never the model's.

and declares, as attributes (no caller matches strings on ``_target_``):

- ``quality``: the localization-quality head: "none", "iou", "centerness", "iou_cls" or "qfl" (QUALITIES);
- ``ious_meaning``: what eval's "ious" holds: "iou" (predicted IoU with the ground truth), "centerness" (predicted
  FCOS centre-ness of the anchor), or None (no "ious" entry; for iou_cls and qfl the IoU is inside "scores");
- ``score``: the score its paper ranks NMS by: "cls", "iou" or "fused" (cls^a * ious^(1-a), a = model.cls_weight);
- ``inference``: that post-processing as nms overrides of conf/nms/, e.g. ("nms=greedy", "nms.score=fused");
- ``box_differentiable_iou``: whether ``predict_iou(features, boxes, labels, image_sizes)`` exists and is
  differentiable in the boxes (optimization-based refinement, IoU-Net Alg. 2).

This module imports no torch: composition and the CLI can read QUALITY_HEADS without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

EVAL_KEYS = ("boxes", "labels", "scores")  # always present; "ious" besides when ious_meaning is not None
RANKING_SCORES = ("cls", "iou", "fused")  # iouctl.postprocess.suppression.SCORES


@dataclass(frozen=True)
class QualityHead:
    """What one localization-quality head predicts and how its paper ranks detections."""

    paper: str
    ious_meaning: Optional[str]  # what eval's "ious" holds; None: no such entry
    score: str  # the ranking score of the paper's NMS
    inference: tuple[str, ...]  # that NMS as conf/nms overrides


GREEDY_CLS = ("nms=greedy",)
GREEDY_FUSED = ("nms=greedy", "nms.score=fused")
QUALITY_HEADS: dict[str, QualityHead] = {
    "none": QualityHead("RetinaNet (Lin et al. 2017) / Faster R-CNN", None, "cls", GREEDY_CLS),
    # S = cls^a * IoU^(1-a), a = 0.5 in the official code
    "iou": QualityHead("IoU-aware RetinaNet (Wu et al. 2019, arXiv 1912.05992)", "iou", "fused", GREEDY_FUSED),
    # FCOS ranks by cls * centre-ness: the same order as the fused score with a = 0.5 (its square root)
    "centerness": QualityHead("FCOS (Tian et al. 2019, arXiv 1904.01355); anchor-based as ATSS (arXiv 1912.02424)",
                              "centerness", "fused", GREEDY_FUSED),
    # the classification score is the IoU-aware score: ranked as it is
    "iou_cls": QualityHead("VarifocalNet (Zhang et al. 2021, arXiv 2008.13367)", None, "cls", GREEDY_CLS),
    "qfl": QualityHead("Generalized Focal Loss (Li et al. 2020, arXiv 2006.04388)", None, "cls", GREEDY_CLS),
}
QUALITIES = tuple(QUALITY_HEADS)  # also iouctl.schema.QUALITIES (a test holds them equal)


@runtime_checkable
class Detector(Protocol):
    """The attributes every detector declares (see the module docstring for the call contract)."""

    num_classes: int
    quality: str
    ious_meaning: Optional[str]
    score: str
    inference: tuple[str, ...]
    box_differentiable_iou: bool

    def __call__(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None) -> Any: ...


def describe(model: Detector) -> dict:
    """The contract attributes of a detector as plain values (for a run's record or a report)."""
    return {"class": type(model).__name__, "num_classes": int(model.num_classes), "quality": model.quality,
            "ious_meaning": model.ious_meaning, "score": model.score, "inference": list(model.inference),
            "box_differentiable_iou": bool(model.box_differentiable_iou)}


class ContractError(AssertionError):
    """A detector broke the contract: a bug in the detector, never a user error."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContractError(message)


def check_eval_output(model: Detector, outputs: Any, num_images: int) -> None:
    """Raise ContractError naming the first way `outputs` (eval mode, `num_images` images) breaks the contract."""
    import torch

    _require(isinstance(outputs, list) and len(outputs) == num_images, f"need a list of {num_images} dicts")
    want = set(EVAL_KEYS) | ({"ious"} if model.ious_meaning is not None else set())
    for i, det in enumerate(outputs):
        _require(set(det) == want, f"image {i}: keys {sorted(det)}, the contract says {sorted(want)}")
        m = det["boxes"].shape[0]
        _require(det["boxes"].shape == (m, 4) and det["boxes"].dtype == torch.float32, f"image {i}: boxes")
        _require(det["labels"].shape == (m,) and det["labels"].dtype == torch.int64, f"image {i}: labels")
        _require(not m or 0 <= int(det["labels"].min()) <= int(det["labels"].max()) < model.num_classes,
                 f"image {i}: labels outside [0, {model.num_classes})")
        for key in sorted(want - {"boxes", "labels"}):
            v = det[key]
            _require(v.shape == (m,) and v.dtype == torch.float32, f"image {i}: {key} must be float32 [{m}]")
            _require(bool(((v >= 0) & (v <= 1)).all()), f"image {i}: {key} outside [0, 1]")


def check_train_output(losses: Any) -> None:
    """Raise ContractError unless `losses` (train mode) is a non-empty dict of finite scalar tensors."""
    import torch

    _require(isinstance(losses, dict) and bool(losses), "train mode must return a non-empty dict of losses")
    for name, v in losses.items():
        _require(isinstance(v, torch.Tensor) and v.dim() == 0, f"loss {name!r} must be a scalar tensor")
        _require(bool(torch.isfinite(v)), f"loss {name!r} is {float(v.detach())}")
