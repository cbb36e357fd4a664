"""The localization-quality heads of the RetinaNet family (model.quality): centre-ness (FCOS), the varifocal loss
(VarifocalNet) and the quality focal loss (GFL), against golden values worked out by hand and float64 plain loops."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from iouctl.errors import ConfigError
from iouctl.models.retina import RetinaHead, centerness_target, quality_focal_loss, varifocal_loss

from tests.models.test_retina import NUM_CLASSES, batch, build, decode64, random_boxes, synthetic

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------- centre-ness
def test_centerness_golden_values():
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0]]).repeat(6, 1)
    centres = [(5, 10), (2, 10), (2, 5), (0, 10), (-1, 10), (5, 25)]
    anchors = torch.tensor([[x - 3.0, y - 4.0, x + 3.0, y + 4.0] for x, y in centres])  # centred on (x, y)
    # (5,10): the box centre; (2,10): l/r = 2/8; (2,5): 2/8 * 5/15; on the left side or outside the box: 0
    want = torch.tensor([1.0, 0.5, math.sqrt(0.25 / 3), 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(centerness_target(anchors.double(), gt.double()), want, rtol=0, atol=1e-12)


def test_centerness_equals_a_plain_float64_loop():
    g = torch.Generator().manual_seed(11)
    gt = random_boxes(200, g)
    # anchor centres around the GT, some outside it
    c = (gt[:, :2] + gt[:, 2:]) / 2 + (torch.rand(200, 2, generator=g) - 0.5) * (gt[:, 2:] - gt[:, :2]) * 1.4
    anchors = torch.cat([c - 3, c + 3], dim=1)
    got = centerness_target(anchors, gt)
    want = []
    for (cx, cy), (x1, y1, x2, y2) in zip(c.double().tolist(), gt.double().tolist()):
        l, t, r, b = cx - x1, cy - y1, x2 - cx, y2 - cy
        want.append(math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) if min(l, t, r, b) > 0 else 0.0)
    want = torch.tensor(want, dtype=torch.float64)
    assert (want == 0).sum() > 10 and (want > 0.5).sum() > 10  # inside and outside centres both drawn
    # float32 differences of coordinates <= ~150 px: ~1e-5 absolute on ratios of order 1, a sqrt halves it
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------- element losses
def test_varifocal_and_quality_focal_golden_values():
    logits = torch.zeros(2, dtype=torch.float64)  # p = 0.5
    target = torch.tensor([0.8, 0.0], dtype=torch.float64)
    # VFL: q * BCE = 0.8 ln 2 for q > 0; alpha p^gamma BCE(p, 0) = 0.75 * 0.25 * ln 2 for q = 0
    torch.testing.assert_close(varifocal_loss(logits, target), torch.tensor([0.8 * LN2, 0.1875 * LN2],
                                                                            dtype=torch.float64), rtol=1e-15, atol=0)
    # QFL: |y - p|^2 * BCE(p, y): 0.09 * ln 2 (BCE(0.5, y) = ln 2 for any y) and 0.25 * ln 2
    torch.testing.assert_close(quality_focal_loss(logits, target), torch.tensor([0.09 * LN2, 0.25 * LN2],
                                                                                dtype=torch.float64), rtol=1e-15,
                               atol=0)


def vfl64(x: float, q: float) -> float:
    p = 1 / (1 + math.exp(-x))
    bce = -(q * math.log(p) + (1 - q) * math.log(1 - p))
    return (q if q > 0 else 0.75 * p ** 2) * bce


def qfl64(x: float, q: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return abs(q - p) ** 2 * -(q * math.log(p) + (1 - q) * math.log(1 - p))


# ----------------------------------------------------------------------------------------------- head losses
@pytest.mark.parametrize("quality, element", [("iou_cls", vfl64), ("qfl", qfl64)])
def test_joint_classification_loss_equals_float64_loop(quality, element):
    g = torch.Generator().manual_seed(12)
    head = RetinaHead(8, 3, NUM_CLASSES, quality=quality)
    targets, outputs, anchors, matched = synthetic(head, g)
    del outputs["iou_logits"]
    losses = head.compute_loss(targets, outputs, anchors, matched)
    assert set(losses) == {"cls", "box"}
    ref, joint = 0.0, 0
    for i in range(2):
        npos = max(1, sum(int(m >= 0) for m in matched[i]))
        total = 0.0
        for j, m in enumerate(matched[i].tolist()):
            if m == -2:  # ignored (between the matcher's thresholds)
                continue
            q_pos, label = 0.0, -1
            if m >= 0:
                d = outputs["bbox_regression"][i, j].detach().double()
                gt = targets[i]["boxes"][m].double()
                q_pos = float(box_iou(decode64(d[None], anchors[i][j].double()[None]), gt[None])[0, 0])
                label = int(targets[i]["labels"][m])
                joint += q_pos > 0
            for k in range(NUM_CLASSES):
                total += element(float(outputs["cls_logits"][i, j, k]), q_pos if k == label else 0.0)
        ref += total / npos / 2
    assert joint > 5  # positives with an IoU target > 0 are in the draw
    # float32 sums of ~200 terms of size ~1 each: ~1e-6 relative; 1e-5 leaves room for the summation order
    assert losses["cls"].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("quality", ["iou_cls", "qfl"])
def test_joint_target_is_detached_from_the_regression(quality):
    g = torch.Generator().manual_seed(13)
    head = RetinaHead(8, 3, NUM_CLASSES, quality=quality, detach_iou_target=False)  # their papers detach anyway
    targets, outputs, anchors, matched = synthetic(head, g)
    outputs["cls_logits"].requires_grad_()
    cls = head.compute_loss(targets, outputs, anchors, matched)["cls"]
    grad_box, grad_cls = torch.autograd.grad(cls, [outputs["bbox_regression"], outputs["cls_logits"]],
                                             allow_unused=True)
    assert grad_box is None and grad_cls.abs().sum() > 0
    ignored = torch.stack(matched) == -2
    assert grad_cls[ignored].abs().sum() == 0 and grad_cls[~ignored].abs().sum() > 0


def test_centerness_loss_equals_float64_loop():
    g = torch.Generator().manual_seed(14)
    head = RetinaHead(8, 3, NUM_CLASSES, quality="centerness", iou_loss_weight=1.5)
    targets, outputs, anchors, matched = synthetic(head, g)
    for i in range(2):  # put GTs around the anchors, so that most positive centres lie inside their GT
        for j, m in enumerate(matched[i].tolist()):
            if m >= 0:
                targets[i]["boxes"][m] = anchors[i][j] + torch.tensor([-4.0, -2.0, 6.0, 3.0])
    outputs["centerness_logits"] = outputs.pop("iou_logits")
    losses = head.compute_loss(targets, outputs, anchors, matched)
    assert set(losses) == {"cls", "box", "centerness"}
    ref, inside = 0.0, 0
    for i in range(2):
        pos = [(j, m) for j, m in enumerate(matched[i].tolist()) if m >= 0]
        for j, m in pos:
            a, b = anchors[i][j].double().tolist(), targets[i]["boxes"][m].double().tolist()
            cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            l, t, r, bt = cx - b[0], cy - b[1], b[2] - cx, b[3] - cy
            c = math.sqrt(min(l, r) / max(l, r) * min(t, bt) / max(t, bt)) if min(l, t, r, bt) > 0 else 0.0
            inside += c > 0
            p = 1 / (1 + math.exp(-float(outputs["centerness_logits"][i, j].detach())))
            ref += 1.5 * -(c * math.log(p) + (1 - c) * math.log(1 - p)) / max(1, len(pos)) / 2
    assert inside > 5
    assert losses["centerness"].item() == pytest.approx(ref, rel=1e-5)  # float32 sums of ~20 terms


def test_centerness_branch_reads_the_regression_tower_as_the_iou_branch():
    torch.manual_seed(7)
    head = RetinaHead(8, 3, NUM_CLASSES, quality="centerness")
    assert not hasattr(head, "iou_pred") and head.quality_key == "centerness_logits"
    with torch.no_grad():
        head.centerness_pred.bias.normal_()
        feats = [torch.randn(2, 8, 5, 4)]
        out = head(feats)
        ctr = head.centerness_pred(head.regression_head.conv(feats[0]))  # [N, A, H, W]
    # anchor r = (y * W + x) * A + a
    torch.testing.assert_close(out["centerness_logits"], ctr.permute(0, 2, 3, 1).reshape(2, -1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- inference
def test_eval_ious_hold_the_centerness_branch_and_joint_heads_have_none():
    images, _ = batch()
    model = build(quality="centerness", score_thresh=0.0).eval()
    with torch.no_grad():
        model.head.centerness_pred.weight.zero_()
        model.head.centerness_pred.bias.fill_(0.8)
        det = model(images)
    assert all(len(d["ious"]) > 0 for d in det)
    for d in det:
        torch.testing.assert_close(d["ious"], torch.full_like(d["ious"], 1 / (1 + math.exp(-0.8))))
    for quality in ("iou_cls", "qfl"):
        with torch.no_grad():
            det = build(quality=quality).eval()(images)
        assert all(set(d) == {"boxes", "labels", "scores"} for d in det)


def test_bad_quality_is_one_clear_line():
    with pytest.raises(ConfigError, match="quality='vfl'; valid: none, iou, centerness, iou_cls, qfl") as exc:
        build(quality="vfl")
    assert "\n" not in str(exc.value)
