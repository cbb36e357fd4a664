"""RetinaNet and the IoU-aware RetinaNet (Wu, Li, Wang 2019, arXiv 1912.05992), on torchvision's building blocks.

The IoU-aware variant adds one 3x3 conv + sigmoid on the last feature of the regression tower: one class-agnostic
IoU per anchor, trained with BCE against IoU(decoded predicted box, its assigned GT) on positive anchors only.

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
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.ops import clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from iouctl.errors import ConfigError
from iouctl.models.backbones import STAGE_CHANNELS, backbone_body

MAX_LEVELS = 5  # P3..P7, the paper's pyramid
# For anchor_sizes=auto (iouctl.data.stats): P3 first (stride 8); at least P3..P5, so C3..C5 all feed the FPN
ANCHOR_PYRAMID = {"first_stride": 8, "min_levels": 3, "max_levels": MAX_LEVELS}
HEAD_NORMS = ("none", "group")
# positives: the paper (IoU loss on positive anchors only); overlapping: also every other anchor whose decoded box
# overlaps a ground truth by IoU >= 0.5 (target: that IoU, detached), the detections the IoU is judged on
IOU_SUPERVISION = ("positives", "overlapping")
SMOOTH_L1_BETA = 1.0 / 9.0  # Detectron / mmdet-v1 RetinaNet, the code base of Wu et al.


# ---------------------------------------------------------------------------------------------------------- backbones
class _ExtraLevels(ExtraFPNBlock):
    """`num` extra pyramid levels above the last FPN output by stride-2 3x3 convs (P6 from P5, P7 from relu(P6)),
    as torchvision's LastLevelP6P7 with use_P5, but for any count (0 adds nothing)."""

    def __init__(self, channels: int, num: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num))
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p = results[-1]
        for i, conv in enumerate(self.convs):
            p = conv(p if i == 0 else F.relu(p))
            results.append(p)
            names.append(f"p{len(names) + 3}")
        return results, names


def build_fpn_backbone(backbone: str, pretrained: str | None, num_levels: int,
                       out_channels: int | None = None) -> BackboneWithFPN:
    """An FPN backbone with `num_levels` outputs P3..P(2+num_levels) (strides 8, 16, ...): C3..C5 through the FPN,
    levels above P5 by stride-2 convs.

    Input Tensor[N, 3, H, W]; returns an OrderedDict of Tensor[N, out_channels, H / 2^(l+3), W / 2^(l+3)], and the
    module has `out_channels`. `pretrained` (ResNets only) is a local ImageNet state_dict file; with it the BatchNorms
    are frozen and the stem + layer1 stay fixed (torchvision's trainable_layers=3), without it all is trained.
    """
    if not 1 <= num_levels <= MAX_LEVELS:
        raise ConfigError(f"need 1..{MAX_LEVELS} anchor sizes (one per FPN level P3..P7), got {num_levels}")
    names = ["layer2", "layer3", "layer4"][:min(num_levels, 3)]
    net = backbone_body(backbone, pretrained)
    in_channels = [STAGE_CHANNELS[backbone][n] for n in names]
    out_channels = out_channels or (64 if backbone == "small" else 256)
    return BackboneWithFPN(net, {n: str(i) for i, n in enumerate(names)}, in_channels, out_channels,
                           extra_blocks=_ExtraLevels(out_channels, num_levels - len(names)))


# --------------------------------------------------------------------------------------------------------------- head
def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of boxes1[i] with boxes2[i]. boxes1, boxes2: Tensor[P, 4] xyxy. Returns Tensor[P] (0 where both are empty);
    differentiable in both."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    union = area1 + area2 - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


class RetinaHead(nn.Module):
    """RetinaNet's classification and regression towers (torchvision's) plus, with `iou_head`, the IoU-aware head:
    one 3x3 conv (in_channels -> A) on the last regression-tower feature, one class-agnostic IoU logit per anchor.

    forward(features: list[Tensor[N, C, H_l, W_l]]) -> {"cls_logits": Tensor[N, R, K], "bbox_regression":
    Tensor[N, R, 4], "iou_logits": Tensor[N, R] (only with iou_head)}, R = sum_l H_l * W_l * A in anchor order.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, iou_head: bool = False,
                 iou_loss_weight: float = 1.0, detach_iou_target: bool = False, head_norm: str = "none",
                 iou_supervision: str = "positives") -> None:
        super().__init__()
        if head_norm not in HEAD_NORMS:
            raise ConfigError(f"head_norm={head_norm!r}; valid: {', '.join(HEAD_NORMS)}")
        if iou_supervision not in IOU_SUPERVISION:
            raise ConfigError(f"iou_supervision={iou_supervision!r}; valid: {', '.join(IOU_SUPERVISION)}")
        self.iou_supervision = iou_supervision
        # GroupNorm with 16 channels per group at most 32 groups: 4 groups for the small backbone's 64 channels
        norm = partial(nn.GroupNorm, max(1, min(32, in_channels // 16))) if head_norm == "group" else None
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes, norm_layer=norm)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.num_anchors = num_anchors
        self.iou_loss_weight = float(iou_loss_weight)
        self.detach_iou_target = bool(detach_iou_target)
        self.iou_pred: nn.Conv2d | None = None
        if iou_head:
            self.iou_pred = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
            nn.init.normal_(self.iou_pred.weight, std=0.01)  # as the box branch; starts at IoU 0.5
            nn.init.zeros_(self.iou_pred.bias)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        out = {"cls_logits": self.classification_head(x)}
        regs, ious = [], []
        bbox_reg, a = self.regression_head.bbox_reg, self.num_anchors
        if self.iou_pred is not None:  # both 3x3 convs read the same tower feature: run them as one conv
            weight = torch.cat([bbox_reg.weight, self.iou_pred.weight])
            bias = torch.cat([bbox_reg.bias, self.iou_pred.bias])
        for feature in x:
            tower = self.regression_head.conv(feature)
            if self.iou_pred is not None:
                reg, iou = F.conv2d(tower, weight, bias, padding=1).split([4 * a, a], dim=1)
            else:
                reg = bbox_reg(tower)
            n, _, h, w = reg.shape
            # (N, A*4, H, W) -> (N, H*W*A, 4): anchor index (y * W + x) * A + a, AnchorGenerator's order
            regs.append(reg.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
            if self.iou_pred is not None:
                ious.append(iou.permute(0, 2, 3, 1).reshape(n, -1))
        out["bbox_regression"] = torch.cat(regs, dim=1)
        if self.iou_pred is not None:
            out["iou_logits"] = torch.cat(ious, dim=1)
        return out

    def iou_target(self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """IoU(decoded predicted box, assigned GT box). deltas, anchors, gt_boxes: Tensor[P, 4]. Returns Tensor[P];
        differentiable in `deltas` unless detach_iou_target."""
        if self.detach_iou_target:
            deltas = deltas.detach()
        # float32 even under AMP: fp16 pixel coordinates lose ~1 px at 1000+
        return paired_box_iou(self.box_coder.decode_single(deltas.float(), anchors.float()), gt_boxes.float())

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                     matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        """Losses {"cls", "box"[, "iou"]}: focal loss (torchvision's), smooth-L1 (beta 1/9) on the deltas and BCE on
        the IoU, box and IoU over positive anchors only. Each is summed per image / max(1, N_pos of that image), then
        averaged over images (torchvision's normalisation); the IoU term is times iou_loss_weight.

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
        losses = {
            "cls": self.classification_head.compute_loss(targets, head_outputs, matched_idxs),
            "box": (box * weight).sum(),
        }
        if self.iou_pred is not None:
            logits = head_outputs["iou_logits"][img, anc]
            iou_t = self.iou_target(deltas, anchors_pos, gt).to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, iou_t, reduction="none")
            losses["iou"] = self.iou_loss_weight * (bce * weight.to(bce.dtype)).sum()
            if self.iou_supervision == "overlapping":
                losses["iou"] = losses["iou"] + self.iou_loss_weight * self._overlap_iou_loss(
                    targets, head_outputs, anchors, matched, npos)
        return losses


    def _overlap_iou_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                          anchors: list[Tensor], matched: Tensor, npos: Tensor) -> Tensor:
        """BCE of the IoU logit of non-positive anchors whose decoded box overlaps a GT by IoU >= 0.5, against that
        IoU (detached: the regression of these anchors is not trained), normalised as the positives' term."""
        from torchvision.ops import box_iou

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
    """torchvision's RetinaNet with a `RetinaHead` (IoU head optional) whose eval output is the raw, pre-NMS set.

    model(images: list[Tensor[3, H, W]] in [0, 1], targets: list[{"boxes": Tensor[K, 4] xyxy pixels, "labels":
    Tensor[K] int64 in [0, num_classes)}] | None)
      train: {"cls", "box"[, "iou"]} scalar losses (their sum is optimised);
      eval: per image {"boxes": float32 [M, 4] in input-image pixels, "labels": int64 [M], "scores": float32 [M]
      classification probability, "ious": float32 [M] (IoU head only)}, sorted by score, M <= max_raw_detections.

    `cls_weight` (a in cls^a * IoU^(1-a)) and `detections_per_img` (kept after NMS) are for post-processing; the
    model applies neither.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: RetinaHead, anchor_generator: AnchorGenerator,
                 min_size: int, max_size: int, score_thresh: float, topk_candidates: int, detections_per_img: int,
                 cls_weight: float, max_raw_detections: int | None = None) -> None:
        super().__init__(backbone, num_classes, min_size=min_size, max_size=max_size,
                         anchor_generator=anchor_generator, head=head, score_thresh=score_thresh,
                         detections_per_img=detections_per_img, topk_candidates=topk_candidates)
        self.num_classes = num_classes
        self.cls_weight = float(cls_weight)
        # Raw candidates kept per image: torchvision keeps topk_candidates per level for its NMS; we keep the best
        # topk_candidates over all levels (default), still 10x the post-NMS detections_per_img of the configs.
        self.max_raw_detections = int(max_raw_detections or topk_candidates)

    @property
    def has_iou_head(self) -> bool:
        return self.head.iou_pred is not None

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
        detections = []
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
                if self.has_iou_head:
                    ious.append(torch.sigmoid(head_outputs["iou_logits"][level][index][anchor_idxs]))
            score = torch.cat(scores)
            keep = torch.sort(score, descending=True, stable=True)[1][: self.max_raw_detections]
            det = {"boxes": torch.cat(boxes)[keep].float(), "scores": score[keep].float(),
                   "labels": torch.cat(labels)[keep]}
            if self.has_iou_head:
                det["ious"] = torch.cat(ious)[keep].float()
            detections.append(det)
        return detections


def retinanet(backbone: str, pretrained: str | None, min_size: int, max_size: int, anchor_sizes: Sequence[int],
              aspect_ratios: Sequence[float], detections_per_img: int, iou_head: bool, iou_loss_weight: float,
              score_thresh: float, topk_candidates: int, cls_weight: float, detach_iou_target: bool,
              num_classes: int | None = None, pool: nn.Module | None = None, head_norm: str = "none",
              iou_supervision: str = "positives", init_from: str | None = None, scales_per_octave: int = 1,
              fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4) -> IoURetinaNet:
    """RetinaNet (iou_head=False) or IoU-aware RetinaNet (iou_head=True), see `IoURetinaNet` for the call contract.
    `pool` is accepted and unused (a single-stage detector pools no RoIs), so every detector builds the same way.

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
    if not 0.0 <= cls_weight <= 1.0:
        raise ConfigError(f"cls_weight (a in cls^a * IoU^(1-a)) must be in [0, 1], got {cls_weight}")
    if not 0.0 <= score_thresh < 1.0:
        raise ConfigError(f"score_thresh must be in [0, 1), got {score_thresh}")
    if not iou_loss_weight >= 0.0:
        raise ConfigError(f"iou_loss_weight must be >= 0, got {iou_loss_weight}")
    if topk_candidates < 1 or detections_per_img < 1:
        raise ConfigError(f"topk_candidates and detections_per_img must be >= 1, got {topk_candidates}, "
                          f"{detections_per_img}")
    body = build_fpn_backbone(backbone, pretrained, len(sizes))
    if not 0.0 < bg_iou_thresh <= fg_iou_thresh <= 1.0:
        raise ConfigError(f"need 0 < bg_iou_thresh <= fg_iou_thresh <= 1, got {bg_iou_thresh}, {fg_iou_thresh}")
    n = int(scales_per_octave)
    anchor_generator = AnchorGenerator(tuple(tuple(float(s) * 2 ** (k / n) for k in range(n)) for s in sizes),
                                       (tuple(float(r) for r in ratios),) * len(sizes))
    head = RetinaHead(body.out_channels, len(ratios) * n, num_classes, iou_head=bool(iou_head),
                      iou_loss_weight=iou_loss_weight, detach_iou_target=detach_iou_target, head_norm=head_norm,
                      iou_supervision=iou_supervision)
    model = IoURetinaNet(body, num_classes, head, anchor_generator, min_size=min_size, max_size=max_size,
                         score_thresh=score_thresh, topk_candidates=topk_candidates,
                         detections_per_img=detections_per_img, cls_weight=cls_weight)
    model.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
    if init_from is not None:
        from iouctl.models.init_from import load_into_retinanet

        model.init_report = load_into_retinanet(model, init_from, backbone)
    return model
