"""RetinaNet with a choice of localization-quality head (`quality`), on torchvision's building blocks.

- none: RetinaNet (Lin et al. 2017): focal loss, smooth-L1 box deltas.
- iou: the IoU-aware RetinaNet (Wu, Li, Wang 2019, arXiv 1912.05992): one 3x3 conv + sigmoid on the last feature of
  the regression tower, one class-agnostic IoU per anchor, BCE against IoU(decoded predicted box, its assigned GT)
  on positive anchors.
- centerness: FCOS's centre-ness (Tian et al. 2019, arXiv 1904.01355) on the same branch, anchor-based as in ATSS
  (Zhang et al. 2020, arXiv 1912.02424): BCE against the centre-ness of the anchor centre in its GT, on positives.
- iou_cls: VarifocalNet's IoU-aware classification score (Zhang et al. 2021, arXiv 2008.13367): the classification
  branch is trained with the varifocal loss against IoU(decoded box, GT) at the GT class of positives, 0 elsewhere.
- qfl: Generalized Focal Loss's quality focal loss (Li et al. 2020, arXiv 2006.04388) with the same joint target.

Only the quality heads differ: anchors, matching and the smooth-L1 box loss are RetinaNet's in all five (VFNet's star
convs and box refinement, GFL's distribution box loss and ATSS's assignment are not part of them).

Eval mode returns RAW detections (no NMS): iouctl's post-processing runs the NMS variants and the score fusion
cls^cls_weight * IoU^(1 - cls_weight) on them. Classes are contiguous indices in [0, num_classes) with no background
column (sigmoid focal loss).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.ops import clip_boxes_to_image

from iouctl.errors import ConfigError
from iouctl.models.backbones import MAX_FPN_LEVELS, fpn_backbone
from iouctl.models.contract import QUALITIES, QUALITY_HEADS
from iouctl.ops.boxes import box_iou, paired_box_iou

MAX_LEVELS = MAX_FPN_LEVELS  # P3..P7, the paper's pyramid
# For anchor_sizes=auto (iouctl.data.stats): P3 first (stride 8); at least P3..P5, so C3..C5 all feed the FPN
ANCHOR_PYRAMID = {"first_stride": 8, "min_levels": 3, "max_levels": MAX_LEVELS}
HEAD_NORMS = ("none", "group")
# positives: the paper (IoU loss on positive anchors only); overlapping: also every other anchor whose decoded box
# overlaps a ground truth by IoU >= 0.5 (target: that IoU, detached), the detections the IoU is judged on
IOU_SUPERVISION = ("positives", "overlapping")
SMOOTH_L1_BETA = 1.0 / 9.0  # Detectron / mmdet-v1 RetinaNet, the code base of Wu et al.
# quality -> (its conv beside the box conv on the regression tower, the head output it writes)
QUALITY_BRANCHES = {"iou": ("iou_pred", "iou_logits"), "centerness": ("centerness_pred", "centerness_logits")}
VFL_ALPHA, VFL_GAMMA = 0.75, 2.0  # VarifocalNet, Sec. 3.2 and its mmdet config
QFL_BETA = 2.0  # Generalized Focal Loss, Sec. 3.3


# --------------------------------------------------------------------------------------------------------------- head
def centerness_target(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS's centre-ness of each anchor centre in its GT box (Tian et al. 2019, eq. 3; anchor-based as ATSS):
    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), l, t, r, b the distances from the anchor centre to the
    GT's left, top, right and bottom sides; 0 for a centre on or outside the box (FCOS has no such positives, IoU
    matching can). anchors, gt_boxes: Tensor[P, 4] xyxy. Returns Tensor[P] in [0, 1], 1 at the box centre."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx], dim=1).clamp(min=0)
    tb = torch.stack([cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy], dim=1).clamp(min=0)
    tiny = torch.finfo(lr.dtype).tiny
    ratio = (lr.amin(dim=1) / lr.amax(dim=1).clamp(min=tiny)) * (tb.amin(dim=1) / tb.amax(dim=1).clamp(min=tiny))
    return ratio.sqrt()


def varifocal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """VarifocalNet's loss (Zhang et al. 2021, eq. 2), element-wise: q * BCE(p, q) where the target q > 0, and
    alpha * p^gamma * BCE(p, 0) where q = 0 (alpha 0.75, gamma 2); p = sigmoid(logits). Tensor[...] -> Tensor[...]."""
    p = torch.sigmoid(logits)
    weight = torch.where(target > 0, target, VFL_ALPHA * p.pow(VFL_GAMMA))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def quality_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Generalized Focal Loss's QFL (Li et al. 2020, eq. 5), element-wise: |y - p|^beta * BCE(p, y), beta 2;
    p = sigmoid(logits), y the soft target in [0, 1]. Tensor[...] -> Tensor[...]."""
    scale = (target - torch.sigmoid(logits)).abs().pow(QFL_BETA)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale


class RetinaHead(nn.Module):
    """RetinaNet's classification and regression towers (torchvision's) and the localization-quality head `quality`
    (see the module docstring): for iou and centerness, one 3x3 conv (in_channels -> A) on the last regression-tower
    feature, one class-agnostic logit per anchor; iou_cls and qfl change the classification loss only.

    forward(features: list[Tensor[N, C, H_l, W_l]]) -> {"cls_logits": Tensor[N, R, K], "bbox_regression":
    Tensor[N, R, 4], and "iou_logits" (iou) or "centerness_logits" (centerness): Tensor[N, R]}, R = sum_l H_l * W_l * A
    in anchor order.

    iou_loss_weight weighs the separate quality branch's loss (iou, centerness); detach_iou_target and
    iou_supervision are the IoU branch's (quality=iou). iou_cls and qfl always detach their IoU target, as their
    papers do.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, quality: str = "none",
                 iou_loss_weight: float = 1.0, detach_iou_target: bool = False, head_norm: str = "none",
                 iou_supervision: str = "positives") -> None:
        super().__init__()
        if quality not in QUALITIES:
            raise ConfigError(f"quality={quality!r}; valid: {', '.join(QUALITIES)}")
        if head_norm not in HEAD_NORMS:
            raise ConfigError(f"head_norm={head_norm!r}; valid: {', '.join(HEAD_NORMS)}")
        if iou_supervision not in IOU_SUPERVISION:
            raise ConfigError(f"iou_supervision={iou_supervision!r}; valid: {', '.join(IOU_SUPERVISION)}")
        self.quality = quality
        self.iou_supervision = iou_supervision
        # GroupNorm with 16 channels per group at most 32 groups: 4 groups for the small backbone's 64 channels
        norm = partial(nn.GroupNorm, max(1, min(32, in_channels // 16))) if head_norm == "group" else None
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes, norm_layer=norm)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.num_anchors = num_anchors
        self.iou_loss_weight = float(iou_loss_weight)
        self.detach_iou_target = bool(detach_iou_target)
        # the branch module keeps its quality's name (iou_pred: the checkpoints and init_from of the IoU head)
        self.branch_name, self.quality_key = QUALITY_BRANCHES.get(quality, (None, None))
        if self.branch_name is not None:
            branch = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
            nn.init.normal_(branch.weight, std=0.01)  # as the box branch (FCOS's centre-ness too); starts at 0.5
            nn.init.zeros_(branch.bias)
            self.add_module(self.branch_name, branch)

    @property
    def quality_pred(self) -> nn.Conv2d | None:
        """The quality branch's conv (iou_pred or centerness_pred), None for the other qualities."""
        return getattr(self, self.branch_name) if self.branch_name is not None else None

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        out = {"cls_logits": self.classification_head(x)}
        regs, quality = [], []
        bbox_reg, a, branch = self.regression_head.bbox_reg, self.num_anchors, self.quality_pred
        if branch is not None:  # both 3x3 convs read the same tower feature: run them as one conv
            weight = torch.cat([bbox_reg.weight, branch.weight])
            bias = torch.cat([bbox_reg.bias, branch.bias])
        for feature in x:
            tower = self.regression_head.conv(feature)
            if branch is not None:
                reg, q = F.conv2d(tower, weight, bias, padding=1).split([4 * a, a], dim=1)
            else:
                reg = bbox_reg(tower)
            n, _, h, w = reg.shape
            # (N, A*4, H, W) -> (N, H*W*A, 4): anchor index (y * W + x) * A + a, AnchorGenerator's order
            regs.append(reg.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
            if branch is not None:
                quality.append(q.permute(0, 2, 3, 1).reshape(n, -1))
        out["bbox_regression"] = torch.cat(regs, dim=1)
        if branch is not None:
            out[self.quality_key] = torch.cat(quality, dim=1)
        return out

    def iou_target(self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, detach: bool | None = None) -> Tensor:
        """IoU(decoded predicted box, assigned GT box). deltas, anchors, gt_boxes: Tensor[P, 4]. Returns Tensor[P];
        differentiable in `deltas` unless `detach` (default: detach_iou_target)."""
        if self.detach_iou_target if detach is None else detach:
            deltas = deltas.detach()
        # float32 even under AMP: fp16 pixel coordinates lose ~1 px at 1000+
        return paired_box_iou(self.box_coder.decode_single(deltas.float(), anchors.float()), gt_boxes.float())

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        """Losses {"cls", "box"[, "iou" | "centerness"]}: the classification loss (focal loss, torchvision's; the
        varifocal loss for iou_cls, the quality focal loss for qfl, both over the non-ignored anchors), smooth-L1
        (beta 1/9) on the deltas and BCE on the quality logit, box and quality over positive anchors only. Each is
        summed per image / max(1, N_pos of that image), then averaged over images (torchvision's normalisation); the
        quality term is times iou_loss_weight.

        anchors: list (per image) of Tensor[R, 4]; matched_idxs: list of Tensor[R] (GT index, -1 negative, -2 ignored).
        """
        regression = head_outputs["bbox_regression"]
        # All images at once (anchors are shared in count after padding): positives gathered over the batch, each
        # weighted 1 / (max(1, N_pos of its image) * N) -- the per-image normalisation without a Python loop.
        matched = torch.stack(matched_idxs)  # [N, R]
        img, anc = torch.where(matched >= 0)
        npos = torch.bincount(img, minlength=len(targets)).clamp(min=1)
        weight = 1.0 / (npos[img].to(regression.dtype) * max(1, len(targets)))
        first = torch.tensor([0] + [len(t["boxes"]) for t in targets[:-1]], device=matched.device).cumsum(0)
        gt = torch.cat([t["boxes"] for t in targets])[matched[img, anc] + first[img]]
        anchors_pos = torch.stack(anchors)[img, anc]
        deltas = regression[img, anc]
        target_deltas = self.box_coder.encode_single(gt, anchors_pos)
        box = F.smooth_l1_loss(deltas, target_deltas, beta=SMOOTH_L1_BETA, reduction="none").sum(dim=1)
        if self.quality in ("iou_cls", "qfl"):
            labels = torch.cat([t["labels"] for t in targets])[matched[img, anc] + first[img]]
            cls = self._joint_cls_loss(head_outputs["cls_logits"], matched, img, anc, labels,
                                       self.iou_target(deltas, anchors_pos, gt, detach=True), npos)
        else:
            cls = self.classification_head.compute_loss(targets, head_outputs, matched_idxs)
        losses = {"cls": cls, "box": (box * weight).sum()}
        if self.quality == "iou":
            logits = head_outputs["iou_logits"][img, anc]
            iou_t = self.iou_target(deltas, anchors_pos, gt).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, iou_t, reduction="none")
            losses["iou"] = self.iou_loss_weight * (bce * weight.to(bce.dtype)).sum()
            if self.iou_supervision == "overlapping":
                losses["iou"] = losses["iou"] + self.iou_loss_weight * self._overlap_iou_loss(
                    targets, head_outputs, anchors, matched, npos)
        elif self.quality == "centerness":
            logits = head_outputs["centerness_logits"][img, anc]
            ctr = centerness_target(anchors_pos.float(), gt.float()).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, ctr, reduction="none")
            losses["centerness"] = self.iou_loss_weight * (bce * weight.to(bce.dtype)).sum()
        return losses

    def _joint_cls_loss(self, cls_logits: Tensor, matched: Tensor, img: Tensor, anc: Tensor, labels: Tensor,
                        iou: Tensor, npos: Tensor) -> Tensor:
        """The classification loss of iou_cls (varifocal) and qfl (quality focal) against the joint target: the IoU
        at (positive anchor, its GT's class), 0 at every other (anchor, class); ignored anchors (-2) excluded.
        cls_logits: Tensor[N, R, K]; matched: Tensor[N, R]; img, anc, labels, iou: Tensor[P] of the positives;
        npos: Tensor[N]. Normalised as torchvision's focal loss: per image / max(1, N_pos), mean over images."""
        target = torch.zeros_like(cls_logits)
        target[img, anc, labels] = iou.to(target.dtype)
        loss = varifocal_loss if self.quality == "iou_cls" else quality_focal_loss
        per_anchor = loss(cls_logits, target).sum(dim=2) * (matched != Matcher.BETWEEN_THRESHOLDS)
        return (per_anchor.sum(dim=1) / npos.to(per_anchor.dtype)).mean()

    def _overlap_iou_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                          anchors: list[Tensor], matched: Tensor, npos: Tensor) -> Tensor:
        """BCE of the IoU logit of non-positive anchors whose decoded box overlaps a GT by IoU >= 0.5, against that
        IoU (detached: the regression of these anchors is not trained), normalised as the positives' term."""
        total = head_outputs["iou_logits"].sum() * 0.0
        for i, t in enumerate(targets):
            if len(t["boxes"]) == 0:
                continue
            with torch.no_grad():
                decoded = self.box_coder.decode_single(head_outputs["bbox_regression"][i].detach().float(),
                                                       anchors[i].float())
                best = box_iou(decoded, t["boxes"].float()).amax(dim=1)
                extra = torch.where((best >= 0.5) & (matched[i] < 0))[0]
            if extra.numel():
                logits = head_outputs["iou_logits"][i, extra]
                bce = F.binary_cross_entropy_with_logits(logits, best[extra].to(logits.dtype), reduction="sum")
                total = total + bce / (npos[i].to(bce.dtype) * len(targets))
        return total


# -------------------------------------------------------------------------------------------------------------- model
class IoURetinaNet(RetinaNet):
    """torchvision's RetinaNet with a `RetinaHead` (any quality head) whose eval output is the raw, pre-NMS set; an
    iouctl.models.contract Detector.

    model(images: list[Tensor[3, H, W]] in [0, 1], targets: list[{"boxes": Tensor[K, 4] xyxy pixels, "labels":
    Tensor[K] int64 in [0, num_classes)}] | None)
      train: {"cls", "box"[, "iou" | "centerness"]} scalar losses (their sum is optimised);
      eval: per image {"boxes": float32 [M, 4] in input-image pixels, "labels": int64 [M], "scores": float32 [M]
      classification probability (IoU-aware for iou_cls and qfl), "ious": float32 [M] (the predicted IoU for iou,
      the predicted centre-ness for centerness; absent otherwise)}, sorted by score, M <= max_raw_detections.

    NMS, its ranking score and the number kept per image are post-processing (the contract's `inference`).
    """

    box_differentiable_iou = False  # its IoU belongs to an anchor's own box: no IoU of an arbitrary box to follow

    def __init__(self, backbone: nn.Module, num_classes: int, head: RetinaHead, anchor_generator: AnchorGenerator,
                 min_size: int, max_size: int, score_thresh: float, topk_candidates: int,
                 max_raw_detections: int | None = None) -> None:
        super().__init__(backbone, num_classes, min_size=min_size, max_size=max_size,
                         anchor_generator=anchor_generator, head=head, score_thresh=score_thresh,
                         topk_candidates=topk_candidates)
        self.num_classes = num_classes
        # Raw candidates kept per image: torchvision keeps topk_candidates per level for its NMS; we keep the best
        # topk_candidates over all levels (default), 10x the 100 a COCO evaluation keeps after NMS.
        self.max_raw_detections = int(max_raw_detections or topk_candidates)

    @property
    def quality(self) -> str:
        return self.head.quality

    @property
    def ious_meaning(self) -> str | None:
        return QUALITY_HEADS[self.quality].ious_meaning

    @property
    def score(self) -> str:
        return QUALITY_HEADS[self.quality].score

    @property
    def inference(self) -> tuple[str, ...]:
        return QUALITY_HEADS[self.quality].inference

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        self._check_inputs(images, targets)
        return super().forward(images, targets)

    def _check_inputs(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> None:
        """One ValueError line for what torchvision would assert on or silently mis-train."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of Tensor[3, H, W]")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point() \
                    or min(img.shape[1:]) < 1:
                shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise ValueError(f"image {i} must be a float Tensor[3, H, W] with H, W >= 1, got {shape}")
        if not self.training:
            return
        if targets is None or len(targets) != len(images):
            got = "none" if targets is None else len(targets)
            raise ValueError(f"training needs one target dict per image ({len(images)}), got {got}")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
                raise ValueError(f"target {i}: 'boxes' must be a float Tensor[K, 4] (xyxy pixels)")
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"target {i}: 'labels' must be an int64 Tensor[K] matching its {boxes.shape[0]} boxes")
            if boxes.numel() and not torch.isfinite(boxes).all():
                raise ValueError(f"target {i}: boxes must be finite")
            bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bad.any():
                raise ValueError(f"target {i}: box {boxes[bad][0].tolist()} has no area (need x2 > x1 and y2 > y1)")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"target {i}: labels must be in [0, {self.num_classes}), got "
                                 f"{labels.min().item()}..{labels.max().item()}")

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's RetinaNet post-processing up to (not including) NMS: per level, (anchor, class) pairs with
        probability > score_thresh, the best topk_candidates of them, decoded and clipped; then the best
        max_raw_detections over all levels, sorted by score (stable, so ties keep level order).

        head_outputs: per key a list over levels of Tensor[N, R_l, ...]; anchors: per image a list over levels of
        Tensor[R_l, 4]; image_shapes: (h, w) of the resized images.
        """
        detections, key = [], self.head.quality_key
        for index, (anchors_per_image, image_shape) in enumerate(zip(anchors, image_shapes)):
            boxes, scores, labels, ious = [], [], [], []
            for level, anchors_per_level in enumerate(anchors_per_image):
                logits = head_outputs["cls_logits"][level][index]
                num_classes = logits.shape[-1]
                probs = torch.sigmoid(logits).flatten()
                candidates = torch.where(probs > self.score_thresh)[0]
                top, order = probs[candidates].topk(min(self.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                anchor_idxs = torch.div(candidates, num_classes, rounding_mode="floor")
                decoded = self.box_coder.decode_single(head_outputs["bbox_regression"][level][index][anchor_idxs],
                                                       anchors_per_level[anchor_idxs])
                boxes.append(clip_boxes_to_image(decoded, image_shape))
                scores.append(top)
                labels.append(candidates % num_classes)
                if key is not None:
                    ious.append(torch.sigmoid(head_outputs[key][level][index][anchor_idxs]))
            score = torch.cat(scores)
            keep = torch.sort(score, descending=True, stable=True)[1][: self.max_raw_detections]
            det = {"boxes": torch.cat(boxes)[keep].float(), "scores": score[keep].float(),
                   "labels": torch.cat(labels)[keep]}
            if key is not None:
                det["ious"] = torch.cat(ious)[keep].float()
            detections.append(det)
        return detections


def retinanet(backbone: str, pretrained: str | None, min_size: int, max_size: int, anchor_sizes: Sequence[int],
              aspect_ratios: Sequence[float], quality: str, iou_loss_weight: float,
              score_thresh: float, topk_candidates: int, detach_iou_target: bool,
              num_classes: int | None = None, head_norm: str = "none",
              iou_supervision: str = "positives", init_from: str | None = None, scales_per_octave: int = 1,
              fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, fpn_channels: int | None = None
              ) -> IoURetinaNet:
    """RetinaNet with the localization-quality head `quality` (none: RetinaNet; iou: the IoU-aware RetinaNet;
    centerness, iou_cls, qfl: see the module docstring); `IoURetinaNet` has the call contract.

    One anchor size per FPN level, the first on P3 (stride 8): len(anchor_sizes) levels (1..5), each with
    len(aspect_ratios) anchors per location. Bad arguments raise ConfigError (a ValueError) with one line.
    `init_from`: a torchvision RetinaNet state_dict file to start from (iouctl.models.init_from); what was loaded is
    on `model.init_report`.
    """
    if num_classes is None or isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1 (from the dataset), got {num_classes!r}")
    sizes, ratios = list(anchor_sizes), list(aspect_ratios)
    if not sizes or not all(s > 0 for s in sizes):
        raise ConfigError(f"anchor_sizes must be positive, one per FPN level (1..{MAX_LEVELS}), got {sizes}")
    if not ratios or not all(r > 0 and math.isfinite(r) for r in ratios):
        raise ConfigError(f"aspect_ratios must be a non-empty list of positive numbers, got {ratios}")
    if not (min_size >= 1 and max_size >= min_size):
        raise ConfigError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not 0.0 <= score_thresh < 1.0:
        raise ConfigError(f"score_thresh must be in [0, 1), got {score_thresh}")
    if not iou_loss_weight >= 0.0:
        raise ConfigError(f"iou_loss_weight must be >= 0, got {iou_loss_weight}")
    if topk_candidates < 1:
        raise ConfigError(f"topk_candidates must be >= 1, got {topk_candidates}")
    if quality not in QUALITIES:
        raise ConfigError(f"quality={quality!r}; valid: {', '.join(QUALITIES)}")
    body = fpn_backbone(backbone, pretrained, first_stage=3, num_levels=len(sizes), extra="conv",
                        channels=fpn_channels)
    if not 0.0 < bg_iou_thresh <= fg_iou_thresh <= 1.0:
        raise ConfigError(f"need 0 < bg_iou_thresh <= fg_iou_thresh <= 1, got {bg_iou_thresh}, {fg_iou_thresh}")
    n = int(scales_per_octave)
    anchor_generator = AnchorGenerator(tuple(tuple(float(s) * 2 ** (k / n) for k in range(n)) for s in sizes),
                                       (tuple(float(r) for r in ratios),) * len(sizes))
    head = RetinaHead(body.out_channels, len(ratios) * n, num_classes, quality=quality,
                      iou_loss_weight=iou_loss_weight, detach_iou_target=detach_iou_target, head_norm=head_norm,
                      iou_supervision=iou_supervision)
    model = IoURetinaNet(body, num_classes, head, anchor_generator, min_size=min_size, max_size=max_size,
                         score_thresh=score_thresh, topk_candidates=topk_candidates)
    model.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
    if init_from is not None:
        from iouctl.models.init_from import load_into_retinanet

        model.init_report = load_into_retinanet(model, init_from, backbone)
    return model
