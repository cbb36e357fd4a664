"""Two-stage detectors: FPN Faster R-CNN and IoU-Net (Jiang et al. 2018), from torchvision's detection blocks.

IoU-Net = FPN Faster R-CNN + an IoU head beside the R-CNN box head: RoI features pooled (PrRoI by default) per FPN
level, two FC layers, one IoU per class; trained jointly on jittered ground-truth boxes (IoU >= 0.5, balanced over
IoU bins). ``predict_iou`` is differentiable in the boxes (for optimization-based refinement, IoU-Net Alg. 2).

Labels: the model API speaks contiguous class indices in [0, num_classes); torchvision's R-CNN reserves class 0 for
the background, so labels are shifted by +1 inside and back on the way out.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import LevelMapper

from iouctl.errors import ConfigError
from iouctl.models.backbones import BACKBONES, MAX_FPN_LEVELS, fpn_backbone
from iouctl.models.contract import QUALITY_HEADS
from iouctl.ops.boxes import box_iou

IOU_LOSSES = ("smooth_l1", "bce")
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_C_STRIDES = (4, 8, 16, 32)  # C2..C5 of both backbones; an optional 5th FPN level is a stride-64 max-pool (P6)
# For anchor_sizes=auto (iouctl.data.stats): P2 first (stride 4), and always P2..P6 as torchvision's FPN R-CNN
ANCHOR_PYRAMID = {"first_stride": _C_STRIDES[0], "min_levels": MAX_FPN_LEVELS, "max_levels": MAX_FPN_LEVELS}
# Sizes by backbone: "small" is meant for 128x128 CPU experiments (fewer sampled RoIs, narrower FC layers).
# rep: FC width of the box and IoU heads (1024 in the paper); rois: R-CNN RoIs sampled per image (torchvision 512).
_SIZES = {
    "small": {"rep": 256, "rois": 128, "rpn_pre": (1000, 500), "rpn_post": (1000, 500)},
    "resnet18": {"rep": 1024, "rois": 512, "rpn_pre": (2000, 1000), "rpn_post": (2000, 1000)},
    "resnet50": {"rep": 1024, "rois": 512, "rpn_pre": (2000, 1000), "rpn_post": (2000, 1000)},
}
_JITTER_OVERSAMPLE = 8  # candidates drawn per kept jittered box, so that every IoU bin can be filled
_JITTER_MAX = 0.35  # max edge shift as a fraction of the box side; < 0.5 keeps x1 < x2, and IoU spans [~0.3, 1]


# --------------------------------------------------------------------------------------------------- RoI pooling
def _output_size(pool: nn.Module) -> tuple[int, int]:
    size = getattr(pool, "output_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else ()
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"pool.output_size must be a positive int or a pair of them; got {size!r}")
    return size


class MultiLevelPool(nn.Module):
    """An RoI pooling module applied per FPN level, as torchvision's MultiScaleRoIAlign but for any pool.

    Each box goes to level k = clamp(floor(4 + log2(sqrt(area) / 224)), k_min, k_max) (FPN eq. 1, torchvision's
    LevelMapper), with k_min/k_max the log2 strides of the pooled levels. The pool (``PrRoIPool`` or ``RoIAlign``,
    anything called as ``pool(input, rois[K, 5])`` with a ``spatial_scale`` attribute) is copied per level and its
    ``spatial_scale`` set to 1/stride: the configured value is replaced, since the stride fixes it.

    forward(features: dict[str, Tensor[N, C, H_l, W_l]], boxes: list[Tensor[K_i, 4]] (network-input pixels))
        -> Tensor[sum K_i, C, PH, PW], rows in the order of the concatenated boxes.
    """

    def __init__(self, pool: nn.Module, featmap_names: Sequence[str], strides: Sequence[int]):
        super().__init__()
        if not hasattr(pool, "spatial_scale"):
            raise ConfigError(f"pool must be an RoI pooling module with a spatial_scale attribute (PrRoIPool, "
                              f"RoIAlign); got {type(pool).__name__}")
        self.output_size = _output_size(pool)
        self.featmap_names = list(featmap_names)
        self.pools = nn.ModuleList()
        for s in strides:
            p = copy.deepcopy(pool)
            p.spatial_scale = 1.0 / s
            self.pools.append(p)
        levels = [round(math.log2(s)) for s in strides]
        self.mapper = LevelMapper(levels[0], levels[-1])

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor]) -> Tensor:
        feats = [features[n] for n in self.featmap_names]
        ref = feats[0]
        # boxes at least float32 even when the features are fp16 (AMP): the pools take them so under autocast, and
        # fp16 pixel coordinates lose ~1 px at 1000+
        rdtype = torch.promote_types(ref.dtype, torch.float32)
        boxes = [b.to(rdtype) for b in boxes]
        index = [torch.full((len(b), 1), float(i), dtype=rdtype, device=ref.device) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(index), torch.cat(boxes)], dim=1) if boxes else ref.new_zeros((0, 5))
        ph, pw = self.output_size
        out = ref.new_zeros((rois.shape[0], ref.shape[1], ph, pw))
        if rois.shape[0] == 0:
            return out
        if len(feats) == 1:
            return self.pools[0](feats[0], rois)
        level = self.mapper([rois[:, 1:]])
        for k, (feat, pool) in enumerate(zip(feats, self.pools)):
            idx = torch.where(level == k)[0]
            if idx.numel():  # an empty level's call would cost a full (backward) pass over its map for nothing
                out = out.index_put((idx,), pool(feat, rois[idx]))  # out-of-place: keeps autograd simple
        return out


# ---------------------------------------------------------------------------------------------------------- heads
class BoxHead(nn.Module):
    """R-CNN classification + class-specific box regression (torchvision TwoMLPHead + FastRCNNPredictor).

    forward(pooled: Tensor[R, C, PH, PW]) -> {"cls_logits": Tensor[R, K+1], "bbox_regression": Tensor[R, 4(K+1)]}
    (column 0 is the background).
    """

    def __init__(self, in_features: int, representation: int, num_classes_bg: int):
        super().__init__()
        self.mlp = TwoMLPHead(in_features, representation)
        self.predictor = FastRCNNPredictor(representation, num_classes_bg)

    def forward(self, pooled: Tensor) -> dict[str, Tensor]:
        cls_logits, bbox_regression = self.predictor(self.mlp(pooled))
        return {"cls_logits": cls_logits, "bbox_regression": bbox_regression}

    def compute_loss(self, out: dict[str, Tensor], labels: list[Tensor], regression_targets: list[Tensor]
                     ) -> dict[str, Tensor]:
        """labels: list[Tensor[R_i]] (0 = background), regression_targets: list[Tensor[R_i, 4]] -> {"cls", "box"}."""
        cls, box = fastrcnn_loss(out["cls_logits"], out["bbox_regression"], labels, regression_targets)
        return {"cls": cls, "box": box}


class IoUHead(nn.Module):
    """IoU-Net's IoU predictor: two FC layers + ReLU, then one output per (foreground) class.

    forward(pooled: Tensor[R, C, PH, PW]) -> {"iou_logits": Tensor[R, K]}. The logit means 2*IoU-1 for
    loss="smooth_l1" and logit(IoU) for loss="bce"; ``to_iou`` maps it to an IoU in [0, 1].
    """

    def __init__(self, in_features: int, representation: int, num_classes: int, loss: str):
        super().__init__()
        if loss not in IOU_LOSSES:
            raise ConfigError(f"iou_loss must be one of {', '.join(IOU_LOSSES)}; got {loss!r}")
        self.loss = loss
        self.fc6 = nn.Linear(in_features, representation)
        self.fc7 = nn.Linear(representation, representation)
        self.out = nn.Linear(representation, num_classes)
        nn.init.normal_(self.out.weight, std=0.01)  # start near the middle of the range, as R-CNN's predictors
        nn.init.zeros_(self.out.bias)

    def forward(self, pooled: Tensor) -> dict[str, Tensor]:
        x = F.relu(self.fc7(F.relu(self.fc6(pooled.flatten(1)))))
        return {"iou_logits": self.out(x)}

    def to_iou(self, logit: Tensor) -> Tensor:
        """Tensor[R] of the chosen class's logits -> Tensor[R] IoU in [0, 1] (clamped for smooth_l1)."""
        return torch.sigmoid(logit) if self.loss == "bce" else ((logit + 1) / 2).clamp(0.0, 1.0)

    @staticmethod
    def select(out: dict[str, Tensor], labels: Tensor) -> Tensor:
        """Tensor[R] logits of each row's class; labels: Tensor[R] contiguous (0-based, no background)."""
        logits = out["iou_logits"]
        return logits.gather(1, labels.long().view(-1, 1)).view(-1)

    def compute_loss(self, out: dict[str, Tensor], labels: Tensor, ious: Tensor) -> Tensor:
        """Smooth-L1 (beta 1) on 2*IoU-1, or BCE on IoU, averaged over the R jittered boxes (0 when R = 0).

        labels: Tensor[R] contiguous class of each box, ious: Tensor[R] target IoU in [0.5, 1].
        """
        logit = self.select(out, labels)
        if logit.numel() == 0:
            return out["iou_logits"].sum() * 0.0  # keeps the graph (DDP) and a finite 0
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logit, ious.to(logit.dtype))
        return F.smooth_l1_loss(logit, 2 * ious.to(logit.dtype) - 1, beta=1.0)


def jitter_boxes(gt_boxes: Tensor, gt_labels: Tensor, image_size: tuple[int, int], per_gt: int, bins: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """IoU-Net's training boxes: random shifts/scales of the ground truth, IoU >= 0.5, balanced over IoU bins.

    Each GT gets ``_JITTER_OVERSAMPLE * per_gt`` candidates whose four edges move independently by up to m times the
    box side, m ~ U(0, 0.35) per candidate (small m fill the high-IoU bins); candidates are clipped to the image.
    A candidate's target is its max IoU over the GTs of its class (what a matcher would score it against); those
    with IoU >= 0.5 are bucketed into ``bins`` equal bins over [0.5, 1] and up to ceil(per_gt * K / bins) are drawn
    at random from each bin, so the kept IoUs are roughly uniform. Uses the global torch RNG.

    Args:
        gt_boxes (Tensor[K, 4]) xyxy, gt_labels (Tensor[K]) int, image_size (H, W) for clipping.
    Returns:
        (boxes Tensor[M, 4], labels Tensor[M], ious Tensor[M]) with M <= bins * ceil(per_gt * K / bins).
    """
    K = gt_boxes.shape[0]
    if K == 0:
        return gt_boxes.new_zeros((0, 4)), gt_labels.new_zeros((0,)), gt_boxes.new_zeros((0,))
    n = _JITTER_OVERSAMPLE * per_gt
    gt = gt_boxes.detach()
    wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)  # [K, 4]: w, h, w, h
    m = torch.rand((K, n, 1), device=gt.device, dtype=gt.dtype) * _JITTER_MAX
    shift = (torch.rand((K, n, 4), device=gt.device, dtype=gt.dtype) * 2 - 1) * m
    cand = (gt[:, None, :] + shift * wh[:, None, :]).reshape(-1, 4)
    cand = box_ops.clip_boxes_to_image(cand, image_size)
    labels = gt_labels.repeat_interleave(n)
    iou = box_iou(cand, gt)
    iou = torch.where(labels[:, None] == gt_labels[None, :], iou, torch.zeros_like(iou)).amax(1)
    ok = torch.where(iou >= 0.5)[0]
    which = torch.clamp(((iou[ok] - 0.5) * (2 * bins)).floor().long(), 0, bins - 1)
    quota = -(-per_gt * K // bins)
    keep = []
    for b in range(bins):
        members = ok[which == b]
        keep.append(members[torch.randperm(len(members), device=gt.device)[:quota]])
    keep = torch.cat(keep)
    return cand[keep], labels[keep], iou[keep]


class TwoStageRoIHeads(RoIHeads):
    """torchvision's RoIHeads (sampling, box coder, losses) with named-dict heads, an optional IoU head, and raw
    (pre-NMS) inference output.

    Inference mirrors RoIHeads.postprocess_detections without the NMS: per-class decoding, clip, drop background,
    score > score_thresh, drop boxes under 0.01 px, then the top ``candidates_per_img`` by score.
    """

    def __init__(self, pool: MultiLevelPool, box_head: BoxHead, iou_head: IoUHead | None, *, rois_per_image: int,
                 score_thresh: float, candidates_per_img: int, iou_loss_weight: float, jitter_per_gt: int,
                 iou_bins: int):
        # torchvision defaults: fg/bg IoU 0.5, 25% positives, box coder weights (10, 10, 5, 5)
        super().__init__(pool, box_head, None, 0.5, 0.5, rois_per_image, 0.25, None, score_thresh, 0.5,
                         candidates_per_img)
        self.iou_head = iou_head
        self.iou_loss_weight = iou_loss_weight
        self.jitter_per_gt = jitter_per_gt
        self.iou_bins = iou_bins

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
            out = self.box_head(self.box_roi_pool(features, proposals))
            losses = self.box_head.compute_loss(out, labels, regression_targets)
            if self.iou_head is not None:
                losses["iou"] = self.iou_loss_weight * self._iou_loss(features, image_shapes, targets)
            return [], losses
        out = self.box_head(self.box_roi_pool(features, proposals))
        boxes, scores, labels = self.postprocess_detections(out["cls_logits"], out["bbox_regression"], proposals,
                                                            image_shapes)
        result = [{"boxes": b, "labels": lab - 1, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
        if self.iou_head is not None:
            ious = self.predict_iou(features, boxes, [lab - 1 for lab in labels])
            for r, i in zip(result, ious):
                r["ious"] = i
        return result, {}

    def _iou_loss(self, features, image_shapes, targets) -> Tensor:
        boxes, labels, ious = [], [], []
        for t, size in zip(targets, image_shapes):
            b, lab, iou = jitter_boxes(t["boxes"], t["labels"] - 1, size, self.jitter_per_gt, self.iou_bins)
            boxes.append(b)
            labels.append(lab)
            ious.append(iou)
        out = self.iou_head(self.box_roi_pool(features, boxes))
        return self.iou_head.compute_loss(out, torch.cat(labels), torch.cat(ious))

    def predict_iou(self, features, boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        if not boxes:
            return []
        out = self.iou_head(self.box_roi_pool(features, boxes))
        iou = self.iou_head.to_iou(self.iou_head.select(out, torch.cat(labels)))
        return list(iou.split([len(b) for b in boxes]))

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        num_classes = class_logits.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        counts = [len(p) for p in proposals]
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes.split(counts), pred_scores.split(counts), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            # no NMS here (iouctl.postprocess does the NMS variants); stable sort: deterministic order on ties
            order = torch.sort(scores, descending=True, stable=True).indices[: self.detections_per_img]
            all_boxes.append(boxes[order])
            all_scores.append(scores[order])
            all_labels.append(labels[order])
        return all_boxes, all_scores, all_labels


# -------------------------------------------------------------------------------------------------------- detector
class TwoStageDetector(nn.Module):
    """FPN Faster R-CNN, with IoU-Net's IoU head when ``roi_heads.iou_head`` is set; an iouctl.models.contract
    Detector.

    forward(images: list[Tensor[3, H, W]] in [0, 1], targets: list[{"boxes": Tensor[K, 4] xyxy px, "labels":
    Tensor[K] int64 in [0, num_classes)}] | None)
      training: {"rpn_cls", "rpn_box", "cls", "box"[, "iou"]} scalar losses (their sum is optimised);
      eval: per image {"boxes": [M, 4], "labels": [M], "scores": [M][, "ious": [M]]}, raw pre-NMS detections in the
      input image's pixels.

    Contract: quality "iou" (IoU-Net: ious = the class-aware predicted IoU, ranked by IoU-guided NMS, Alg. 1, and
    box-differentiable through PrRoI pooling for Alg. 2) or "none" (Faster R-CNN: greedy NMS by cls).
    """

    def __init__(self, transform: GeneralizedRCNNTransform, backbone: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: TwoStageRoIHeads, num_classes: int):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes

    @property
    def quality(self) -> str:
        return "none" if self.roi_heads.iou_head is None else "iou"

    @property
    def ious_meaning(self) -> str | None:
        return QUALITY_HEADS[self.quality].ious_meaning

    @property
    def score(self) -> str:
        return "cls" if self.roi_heads.iou_head is None else "iou"

    @property
    def inference(self) -> tuple[str, ...]:
        return ("nms=greedy",) if self.roi_heads.iou_head is None else ("nms=iou_guided",)  # IoU-Net Alg. 1

    @property
    def box_differentiable_iou(self) -> bool:
        return self.roi_heads.iou_head is not None

    def _check(self, images, targets) -> None:
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, Tensor) and i.dim() == 3
                                                             and i.shape[0] == 3 for i in images):
            raise ValueError("images must be a list of Tensor[3, H, W] (float, in [0, 1])")
        if self.training and targets is None:
            raise ValueError("training mode needs targets (one {'boxes', 'labels'} dict per image); call "
                             "model.eval() for inference")
        if targets is None:
            return
        if len(targets) != len(images):
            raise ValueError(f"got {len(targets)} targets for {len(images)} images; give one per image")
        for i, t in enumerate(targets):
            b, lab = t.get("boxes"), t.get("labels")
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"targets[{i}]['boxes'] must be Tensor[K, 4] (x1, y1, x2, y2)")
            if not isinstance(lab, Tensor) or lab.shape != (b.shape[0],) or lab.is_floating_point():
                raise ValueError(f"targets[{i}]['labels'] must be an int64 Tensor[K] matching its boxes")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"targets[{i}]['labels'] must lie in [0, {self.num_classes}); got "
                                 f"[{int(lab.min())}, {int(lab.max())}]")
            if b.numel() and not bool(((b[:, 2:] > b[:, :2]) & torch.isfinite(b).all(1, keepdim=True)).all()):
                raise ValueError(f"targets[{i}]['boxes'] must be finite with x2 > x1 and y2 > y1")

    def features(self, images: list[Tensor]) -> tuple[OrderedDict, list[tuple[int, int]]]:
        """(FPN features {"0": Tensor[N, C, H/4, W/4], ...}, network-input sizes [(h, w)] per image).

        Images are resized by the transform (min_size/max_size); boxes given to ``predict_iou`` are in those
        network-input pixels: map detections there with
        ``torchvision.models.detection.transform.resize_boxes(boxes, original_hw, image_size)``.
        """
        self._check(images, None)
        image_list, _ = self.transform(list(images))
        return self.backbone(image_list.tensors), list(image_list.image_sizes)

    def predict_iou(self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
                    image_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Predicted IoU of each box with its ground truth, differentiable w.r.t. ``boxes`` (not clipped).

        features/image_sizes from ``features``; boxes: list[Tensor[K_i, 4]] xyxy in network-input pixels;
        labels: list[Tensor[K_i]] contiguous classes. Returns list[Tensor[K_i]] in [0, 1].
        """
        if not self.box_differentiable_iou:
            raise ValueError("predict_iou needs the IoU head: build the model with iou_head=true (model=iou_net)")
        if len(boxes) != len(labels) or len(boxes) != len(image_sizes):
            raise ValueError(f"boxes, labels and image_sizes must have one entry per image; got {len(boxes)}, "
                             f"{len(labels)} and {len(image_sizes)}")
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            if b.dim() != 2 or b.shape[1] != 4 or lab.shape != (b.shape[0],):
                raise ValueError(f"boxes[{i}] must be Tensor[K, 4] with labels[{i}] Tensor[K]; got "
                                 f"{tuple(b.shape)} and {tuple(lab.shape)}")
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"labels[{i}] must lie in [0, {self.num_classes})")
        return self.roi_heads.predict_iou(features, list(boxes), list(labels))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        self._check(images, targets)
        original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        if targets is not None:  # torchvision's R-CNN: class 0 is the background
            targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        image_list, targets = self.transform(list(images), targets)
        features = self.backbone(image_list.tensors)
        if not self.training:
            targets = None
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {"rpn_cls": rpn_losses["loss_objectness"], "rpn_box": rpn_losses["loss_rpn_box_reg"], **losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def faster_rcnn(backbone: str, pretrained: str | None, min_size: int, max_size: int, anchor_sizes: Sequence[int],
                aspect_ratios: Sequence[float], detections_per_img: int, iou_head: bool, iou_loss_weight: float,
                box_score_thresh: float, iou_loss: str, jitter_per_gt: int, iou_bins: int,
                num_classes: int | None = None, pool: nn.Module | None = None,
                init_from: str | None = None) -> TwoStageDetector:
    """FPN Faster R-CNN (iou_head=False) or IoU-Net (iou_head=True).

    One FPN level per anchor size (P2.. with strides 4, 8, 16, 32, and a 5th = stride-64 max-pool level used by the
    RPN only, as torchvision). ``pool`` (default ``PrRoIPool(7)``) is applied per level with its spatial scale set
    from the stride; it feeds both the box head and the IoU head. Eval output is capped at
    max(1000, 10 * detections_per_img) raw candidates per image (NMS comes later and keeps detections_per_img).
    ``init_from``: a torchvision Faster R-CNN state_dict file to start from (iouctl.models.init_from); what was
    loaded is on ``model.init_report``.
    """
    from iouctl.ops import PrRoIPool

    if num_classes is None or isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an int >= 1 (foreground classes); got {num_classes!r}")
    if backbone not in BACKBONES:
        raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    if not (isinstance(min_size, int) and isinstance(max_size, int) and 0 < min_size <= max_size):
        raise ConfigError(f"min_size and max_size must be ints with 0 < min_size <= max_size; got {min_size}, "
                          f"{max_size}")
    sizes = list(anchor_sizes)
    if not sizes or not all(isinstance(s, (int, float)) and s > 0 for s in sizes):
        raise ConfigError(f"anchor_sizes must be a non-empty list of positive sizes; got {sizes!r}")
    ratios = list(aspect_ratios)
    if not ratios or not all(isinstance(r, (int, float)) and r > 0 for r in ratios):
        raise ConfigError(f"aspect_ratios must be a non-empty list of positive numbers; got {ratios!r}")
    if not (isinstance(detections_per_img, int) and detections_per_img >= 1):
        raise ConfigError(f"detections_per_img must be an int >= 1; got {detections_per_img!r}")
    if not (isinstance(box_score_thresh, (int, float)) and 0 <= box_score_thresh < 1):
        raise ConfigError(f"box_score_thresh must be in [0, 1); got {box_score_thresh!r}")
    if not (isinstance(iou_loss_weight, (int, float)) and math.isfinite(iou_loss_weight) and iou_loss_weight >= 0):
        raise ConfigError(f"iou_loss_weight must be a finite number >= 0; got {iou_loss_weight!r}")
    if iou_loss not in IOU_LOSSES:
        raise ConfigError(f"iou_loss must be one of {', '.join(IOU_LOSSES)}; got {iou_loss!r}")
    for name, v in (("jitter_per_gt", jitter_per_gt), ("iou_bins", iou_bins)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1; got {v!r}")

    cfg = _SIZES[backbone]
    body = fpn_backbone(backbone, pretrained, first_stage=2, num_levels=len(sizes), extra="maxpool")
    names = [str(i) for i in range(len(sizes))]
    pooled_names = names[: len(_C_STRIDES)]
    multi_pool = MultiLevelPool(pool if pool is not None else PrRoIPool(7), pooled_names,
                                _C_STRIDES[: len(pooled_names)])
    ph, pw = multi_pool.output_size
    in_features = body.out_channels * ph * pw

    anchors = AnchorGenerator(tuple((s,) for s in sizes), (tuple(ratios),) * len(sizes))
    rpn_head = RPNHead(body.out_channels, anchors.num_anchors_per_location()[0])
    (pre_train, pre_test), (post_train, post_test) = cfg["rpn_pre"], cfg["rpn_post"]
    # torchvision defaults: fg/bg IoU 0.7/0.3, 256 anchors per image with 50% positives, NMS 0.7
    rpn = RegionProposalNetwork(anchors, rpn_head, 0.7, 0.3, 256, 0.5, {"training": pre_train, "testing": pre_test},
                                {"training": post_train, "testing": post_test}, 0.7)
    heads = TwoStageRoIHeads(
        multi_pool, BoxHead(in_features, cfg["rep"], num_classes + 1),
        IoUHead(in_features, cfg["rep"], num_classes, iou_loss) if iou_head else None,
        rois_per_image=cfg["rois"], score_thresh=float(box_score_thresh),
        candidates_per_img=max(1000, 10 * detections_per_img), iou_loss_weight=float(iou_loss_weight),
        jitter_per_gt=jitter_per_gt, iou_bins=iou_bins)
    transform = GeneralizedRCNNTransform(min_size, max_size, _IMAGENET_MEAN, _IMAGENET_STD)
    model = TwoStageDetector(transform, body, rpn, heads, num_classes)
    if init_from is not None:
        from iouctl.models.init_from import load_into_two_stage

        model.init_report = load_into_two_stage(model, init_from, backbone)
    return model
