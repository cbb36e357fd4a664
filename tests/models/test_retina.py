"""RetinaNet / IoU-aware RetinaNet: losses against float64 references, raw detections against torchvision's own
post-processing with NMS switched off, the IoU head's contract, builders and their errors."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.ops import box_iou

from iouctl.errors import ConfigError, IouctlError
from iouctl.models.contract import QUALITIES
from iouctl.models.retina import IoURetinaNet, RetinaHead, retinanet
from iouctl.ops.boxes import paired_box_iou
from tests.lanes import sample

NUM_CLASSES = 3


def build(**over) -> IoURetinaNet:
    kw = {"backbone": "small", "pretrained": None, "min_size": 64, "max_size": 64, "anchor_sizes": [16, 32, 64],
          "aspect_ratios": [0.5, 1.0, 2.0], "quality": "iou", "iou_loss_weight": 1.0,
          "score_thresh": 0.05, "topk_candidates": 1000, "detach_iou_target": False,
          "num_classes": NUM_CLASSES}
    kw.update(over)
    torch.manual_seed(0)
    return retinanet(**kw)


def batch(size: int = 64):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0], [10.0, 40.0, 26.0, 62.0]]),
         "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.tensor([[8.0, 8.0, 56.0, 40.0], [20.0, 44.0, 44.0, 60.0]]), "labels": torch.tensor([1, 1])},
    ]
    return images, targets


def decode64(deltas, anchors):
    """BoxCoder(weights=1).decode_single written out in float64 (no clamp needed for the small deltas used)."""
    deltas, anchors = deltas.double(), anchors.double()
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    pcx, pcy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    pw, ph = w * torch.exp(deltas[:, 2]), h * torch.exp(deltas[:, 3])
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], dim=1)


def random_boxes(n, g, lo=0.0, hi=100.0):
    xy = torch.rand(n, 2, generator=g) * (hi - lo) + lo
    wh = torch.rand(n, 2, generator=g) * 40 + 2
    return torch.cat([xy, xy + wh], dim=1)


# ------------------------------------------------------------------------------------------------------ IoU target
def test_iou_target_equals_box_iou_float64():
    g = torch.Generator().manual_seed(2)
    anchors = random_boxes(50, g)
    # most GTs near their anchor (positives), the last 10 anywhere (mostly disjoint)
    gt = torch.cat([anchors[:40] + torch.randn(40, 4, generator=g), random_boxes(10, g)])
    deltas = torch.randn(50, 4, generator=g) * 0.3
    head = RetinaHead(8, 3, NUM_CLASSES, quality="iou")
    got = head.iou_target(deltas, anchors, gt)
    want = box_iou(decode64(deltas, anchors), gt.double()).diagonal()
    assert (want > 0.3).sum() > 10 and (want == 0).sum() > 0  # the draw covers overlap and disjoint pairs
    # float32 decode of coordinates <= ~150 px: relative error ~1e-6, so IoU agrees to ~1e-5
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    # the paired helper itself, in float64, against the diagonal of the all-pairs matrix
    torch.testing.assert_close(paired_box_iou(anchors.double(), gt.double()),
                               box_iou(anchors.double(), gt.double()).diagonal(), atol=1e-12, rtol=0)


def synthetic(head: RetinaHead, g):
    """Head outputs for 2 images x R anchors with a hand-made matching: positives, negatives (-1) and ignored (-2)."""
    r = 40
    anchors = [random_boxes(r, g) for _ in range(2)]
    targets = [{"boxes": random_boxes(4, g), "labels": torch.randint(0, NUM_CLASSES, (4,), generator=g)}
               for _ in range(2)]
    matched = [torch.randint(-2, 4, (r,), generator=g) for _ in range(2)]
    outputs = {"cls_logits": torch.randn(2, r, NUM_CLASSES, generator=g),
               "bbox_regression": (torch.randn(2, r, 4, generator=g) * 0.2).requires_grad_(),
               "iou_logits": torch.randn(2, r, generator=g).requires_grad_()}
    return targets, outputs, anchors, matched


def test_box_and_iou_losses_equal_float64_reference():
    g = torch.Generator().manual_seed(3)
    head = RetinaHead(8, 3, NUM_CLASSES, quality="iou", iou_loss_weight=2.5)
    targets, outputs, anchors, matched = synthetic(head, g)
    losses = head.compute_loss(targets, outputs, anchors, matched)
    box_ref, iou_ref = 0.0, 0.0
    for i in range(2):
        pos = [j for j in range(len(matched[i])) if matched[i][j] >= 0]
        box_sum, iou_sum = 0.0, 0.0
        for j in pos:
            gt = targets[i]["boxes"][matched[i][j]].double()
            a = anchors[i][j].double()
            aw, ah = a[2] - a[0], a[3] - a[1]
            gw, gh = gt[2] - gt[0], gt[3] - gt[1]
            t = [((gt[0] + gt[2]) - (a[0] + a[2])) / 2 / aw, ((gt[1] + gt[3]) - (a[1] + a[3])) / 2 / ah,
                 math.log(gw / aw), math.log(gh / ah)]
            d = outputs["bbox_regression"][i, j].detach().double()
            for k in range(4):
                diff = abs(float(d[k]) - float(t[k]))
                box_sum += 0.5 * diff ** 2 * 9 if diff < 1 / 9 else diff - 0.5 / 9  # smooth-L1, beta 1/9
            iou = float(box_iou(decode64(d[None], a[None]), gt[None])[0, 0])
            p = 1 / (1 + math.exp(-float(outputs["iou_logits"][i, j].detach())))
            iou_sum += -(iou * math.log(p) + (1 - iou) * math.log(1 - p))
        box_ref += box_sum / max(1, len(pos)) / 2
        iou_ref += 2.5 * iou_sum / max(1, len(pos)) / 2
    assert iou_ref > 0 and box_ref > 0
    # float32 sums of ~40 terms of size ~1: 1e-5 relative
    assert losses["box"].item() == pytest.approx(box_ref, rel=1e-5)
    assert losses["iou"].item() == pytest.approx(iou_ref, rel=1e-5)


def test_iou_loss_ignores_non_positive_anchors():
    g = torch.Generator().manual_seed(4)
    head = RetinaHead(8, 3, NUM_CLASSES, quality="iou")
    targets, outputs, anchors, matched = synthetic(head, g)
    before = head.compute_loss(targets, outputs, anchors, matched)["iou"]
    other = {k: v.detach().clone() for k, v in outputs.items()}
    neg = torch.stack(matched) < 0
    other["iou_logits"][neg] += 5.0
    after = head.compute_loss(targets, other, anchors, matched)["iou"]
    assert after.item() == before.item()


def test_overlapping_iou_supervision_adds_the_non_positive_anchors_that_hit_a_gt():
    g = torch.Generator().manual_seed(6)
    paper = RetinaHead(8, 3, NUM_CLASSES, quality="iou", iou_loss_weight=2.0)
    ext = RetinaHead(8, 3, NUM_CLASSES, quality="iou", iou_loss_weight=2.0, iou_supervision="overlapping")
    targets, outputs, anchors, matched = synthetic(paper, g)
    for i in range(2):  # make some non-positive anchors' decoded boxes land on a GT
        anchors[i][:6] = targets[i]["boxes"][torch.arange(6) % 4] + 0.5
    base = paper.compute_loss(targets, outputs, anchors, matched)["iou"]
    got = ext.compute_loss(targets, outputs, anchors, matched)["iou"]
    extra_ref, found = 0.0, 0
    for i in range(2):
        npos = max(1, sum(int(m >= 0) for m in matched[i]))
        for j in range(len(matched[i])):
            if matched[i][j] >= 0:
                continue
            box = decode64(outputs["bbox_regression"][i, j].detach().double()[None], anchors[i][j].double()[None])
            best = float(box_iou(box, targets[i]["boxes"].double()).max())
            if best >= 0.5:
                found += 1
                p = 1 / (1 + math.exp(-float(outputs["iou_logits"][i, j].detach())))
                extra_ref += 2.0 * -(best * math.log(p) + (1 - best) * math.log(1 - p)) / npos / 2
    assert found > 0
    assert (got - base).item() == pytest.approx(extra_ref, rel=1e-5)
    with pytest.raises(ValueError, match="iou_supervision='all'; valid: positives, overlapping"):
        RetinaHead(8, 3, NUM_CLASSES, quality="iou", iou_supervision="all")


@pytest.mark.parametrize("detach", [False, True])
def test_detach_switch_controls_gradient_into_regression(detach):
    g = torch.Generator().manual_seed(5)
    head = RetinaHead(8, 3, NUM_CLASSES, quality="iou", detach_iou_target=detach)
    targets, outputs, anchors, matched = synthetic(head, g)
    loss = head.compute_loss(targets, outputs, anchors, matched)["iou"]
    grad_box, grad_logit = torch.autograd.grad(loss, [outputs["bbox_regression"], outputs["iou_logits"]],
                                               allow_unused=True)
    assert grad_logit.abs().sum() > 0
    if detach:
        assert grad_box is None  # the IoU loss does not reach the regression branch at all
    else:
        pos = torch.stack(matched) >= 0
        assert grad_box[pos].abs().sum() > 0 and grad_box[~pos].abs().sum() == 0


def test_head_outputs_equal_separate_convs_in_anchor_order():
    """The head runs box and IoU convs as one conv; check it against the two convs applied one by one."""
    torch.manual_seed(7)
    head = RetinaHead(8, 3, NUM_CLASSES, quality="iou")
    with torch.no_grad():
        head.iou_pred.bias.normal_()
        feats = [torch.randn(2, 8, 5, 4), torch.randn(2, 8, 3, 2)]
        out = head(feats)
        for level, f in enumerate(feats):
            tower = head.regression_head.conv(f)
            reg, iou = head.regression_head.bbox_reg(tower), head.iou_pred(tower)  # [N, A*4, H, W], [N, A, H, W]
            start = sum(g.shape[-2] * g.shape[-1] * 3 for g in feats[:level])
            for y in range(f.shape[-2]):
                for x in range(f.shape[-1]):
                    for a in range(3):
                        r = start + (y * f.shape[-1] + x) * 3 + a  # AnchorGenerator: location-major, anchor-minor
                        torch.testing.assert_close(out["bbox_regression"][:, r], reg[:, 4 * a:4 * a + 4, y, x],
                                                   rtol=1e-5, atol=1e-6)
                        torch.testing.assert_close(out["iou_logits"][:, r], iou[:, a, y, x], rtol=1e-5, atol=1e-6)
    assert out["cls_logits"].shape == (2, (20 + 6) * 3, NUM_CLASSES)


# ------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("quality", QUALITIES)
def test_loss_dict_finite_and_backward(quality):
    model = build(quality=quality)
    images, targets = batch()
    losses = model(images, targets)
    branch = {"iou": {"iou"}, "centerness": {"centerness"}}.get(quality, set())
    assert set(losses) == {"cls", "box"} | branch
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v) and v > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    if branch:
        assert model.head.quality_pred.weight.grad.abs().sum() > 0
    else:
        assert model.head.quality_pred is None and not hasattr(model.head, "iou_pred")


def test_group_norm_heads():
    model = build(quality="iou", head_norm="group")
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 8 and all(n.num_groups == 4 for n in norms)  # 4 per tower; 64 FPN channels, 16 per group
    images, targets = batch()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="head_norm='batch'; valid: none, group"):
        build(head_norm="batch")


def train_steps(quality: str, steps: int) -> list[dict[str, float]]:
    """`steps` Adam steps (lr 5e-4) of build(quality=quality) on batch(): each step's loss terms (before its update)
    and their sum, "total"."""
    model = build(quality=quality)
    images, targets = batch()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()} | {"total": total.item()})
    return history


@pytest.mark.parametrize("quality", sample(["iou", "none", "centerness"], 3))
def test_a_few_steps_reduce_the_loss(quality):
    history = train_steps(quality, 20)
    # the focal term is bumpy on 2 images (BatchNorm + Adam): judge the mean of the last 3 steps
    assert sum(h["total"] for h in history[-3:]) / 3 < 0.8 * history[0]["total"]
    assert history[-1]["box"] < 0.5 * history[0]["box"]
    for term in {"iou", "centerness"} & set(history[0]):
        assert history[-1][term] < history[0][term]


@pytest.mark.slow
@pytest.mark.parametrize("quality", ["iou_cls", "qfl"])
def test_a_few_steps_teach_the_joint_score(quality, monkeypatch):
    """Their loss follows a moving target (the IoU of boxes that improve), so judge what it trains: the score of a
    positive anchor's class rises well above the negatives', while the boxes improve."""
    seen = {}
    joint = RetinaHead._joint_cls_loss

    def spy(self, cls_logits, matched, img, anc, labels, iou, npos):
        p = torch.sigmoid(cls_logits.detach())
        seen["pos"], seen["neg"] = p[img, anc, labels].mean().item(), p[matched == -1].mean().item()
        return joint(self, cls_logits, matched, img, anc, labels, iou, npos)

    monkeypatch.setattr(RetinaHead, "_joint_cls_loss", spy)
    boxes = [h["box"] for h in train_steps(quality, 31)]
    # 0.01 everywhere at the start (the focal prior); seeded run: ~0.4-0.55 vs ~0.03-0.05 after 30 steps
    assert seen["pos"] > 0.2 and seen["pos"] > 5 * seen["neg"]
    assert boxes[-1] < 0.5 * boxes[0]


def test_empty_targets_give_zero_box_and_iou_loss():
    model = build()
    images, _ = batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(images, empty)
    assert losses["box"].item() == 0 and losses["iou"].item() == 0
    assert torch.isfinite(losses["cls"]) and losses["cls"] > 0
    sum(losses.values()).backward()


def test_deterministic_given_seed():
    images, targets = batch()
    a, b = build(), build()
    la, lb = a(images, targets), b(images, targets)
    assert all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize("levels", [1, 2, 4, 5])
def test_one_fpn_level_per_anchor_size(levels):
    sizes = [16, 32, 64, 128, 256][:levels]
    model = build(anchor_sizes=sizes)
    images, targets = batch()
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert len(feats) == levels
    assert [f.shape[-1] for f in feats.values()] == [math.ceil(64 / 2 ** (3 + i)) for i in range(levels)]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


# ----------------------------------------------------------------------------------------------------- inference
def head_outputs_split(model, images):
    """What RetinaNet.forward feeds to postprocess_detections, in the resized image frame."""
    image_list, _ = model.transform(images)
    feats = list(model.backbone(image_list.tensors).values())
    out = model.head(feats)
    anchors = model.anchor_generator(image_list, feats)
    per_level = [f.shape[-2] * f.shape[-1] * model.head.num_anchors for f in feats]
    split = {k: list(v.split(per_level, dim=1)) for k, v in out.items()}
    return split, [list(a.split(per_level)) for a in anchors], image_list.image_sizes


def spread_scores(model):
    """An untrained head predicts ~0.01 everywhere; spread the logits so thresholds and top-k have work to do."""
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.copy_(torch.randn(model.head.num_anchors * NUM_CLASSES,
                                                                         generator=g) * 2)
        model.head.classification_head.cls_logits.weight.mul_(50)


@pytest.mark.parametrize("quality", ["none", "iou"])
def test_raw_detections_equal_torchvision_postprocess_without_nms(quality):
    model = build(quality=quality, score_thresh=0.3, topk_candidates=40).eval()
    spread_scores(model)
    images, _ = batch()
    model.max_raw_detections = 10 ** 6  # no overall cap: compare the full candidate set
    with torch.no_grad():
        split, anchors, sizes = head_outputs_split(model, images)
        ours = model.postprocess_detections(split, anchors, sizes)
        # torchvision's own code, with an NMS that suppresses nothing (IoU > 1 never holds) and no final cap
        model.nms_thresh, model.detections_per_img = 1.0, 10 ** 6
        ref = RetinaNet.postprocess_detections(model, split, anchors, sizes)
    for o, r in zip(ours, ref):
        assert 40 < len(o["scores"]) <= 40 * 3  # top-k bound per level (3 levels), and the threshold left many
        key = lambda d: sorted(zip(d["labels"].tolist(), d["scores"].tolist(), d["boxes"].tolist()))
        assert key(o) == key(r)  # same ops on the same tensors: bitwise equal
        assert torch.all(o["scores"][:-1] >= o["scores"][1:])


def test_eval_outputs_shapes_ranges_and_image_frame():
    model = build(score_thresh=0.2, topk_candidates=30).eval()
    spread_scores(model)
    model.max_raw_detections = 50
    images = [torch.rand(3, 96, 48), torch.rand(3, 40, 80)]  # resized to the 64-pixel model frame and back
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images):
        h, w = img.shape[1:]
        m = det["boxes"].shape[0]
        assert 0 < m <= 50
        assert det["boxes"].dtype == det["scores"].dtype == det["ious"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64 and det["labels"].shape == det["ious"].shape == (m,)
        assert ((det["labels"] >= 0) & (det["labels"] < NUM_CLASSES)).all()
        assert (det["scores"] > 0.2).all() and (det["scores"] <= 1).all()
        assert ((det["ious"] >= 0) & (det["ious"] <= 1)).all()
        b = det["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 1] >= 0).all()
        assert (b[:, 3] <= h + 1e-3).all() and (b[:, 2] >= b[:, 0]).all()


def test_raw_cap_keeps_the_best_scores():
    model = build(score_thresh=0.0, topk_candidates=1000).eval()
    spread_scores(model)
    images, _ = batch()
    with torch.no_grad():
        model.max_raw_detections = 10 ** 6
        full = model(images)[0]
        model.max_raw_detections = 25
        capped = model(images)[0]
    assert capped["scores"].shape == (25,)
    torch.testing.assert_close(capped["scores"], full["scores"][:25], rtol=0, atol=0)




# --------------------------------------------------------------------------------------------- backbones, errors
def test_resnet_backbones_train_and_eval():
    images, targets = batch()
    for name in ("resnet18", "resnet50"):
        model = build(backbone=name)
        assert model.backbone.out_channels == 256
        losses = model(images, targets)
        assert set(losses) == {"cls", "box", "iou"} and all(torch.isfinite(v) for v in losses.values())
        model.eval()
        with torch.no_grad():
            assert set(model(images[:1])[0]) == {"boxes", "labels", "scores", "ious"}


def test_pretrained_file_is_loaded_and_stem_frozen(tmp_path):
    torch.manual_seed(9)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build(backbone="resnet18", pretrained=str(path))
    body = model.backbone.body
    torch.testing.assert_close(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"], rtol=0, atol=0)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad


def test_missing_pretrained_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(IouctlError) as exc:
        build(backbone="resnet50", pretrained=str(missing))
    assert str(missing) in str(exc.value) and "\n" not in str(exc.value)


def test_wrong_pretrained_file_is_one_clear_line(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        build(backbone="resnet18", pretrained=str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="could not be read"):
        build(backbone="resnet18", pretrained=str(junk))


@pytest.mark.parametrize("over, match", [
    ({"backbone": "vgg"}, "unknown backbone 'vgg'"),
    ({"pretrained": "/x.pth"}, "only for the resnet backbones"),
    ({"anchor_sizes": []}, "anchor_sizes"),
    ({"anchor_sizes": [8, 16, 32, 64, 128, 256]}, "1..5 anchor sizes"),
    ({"aspect_ratios": [0.0]}, "aspect_ratios"),
    ({"score_thresh": 1.0}, "score_thresh"),
    ({"num_classes": None}, "num_classes"),
    ({"min_size": 128, "max_size": 64}, "min_size"),
    ({"topk_candidates": 0}, "topk_candidates"),
])
def test_bad_builder_arguments(over, match):
    with pytest.raises(ConfigError, match=match) as exc:
        build(**over)
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)


@pytest.mark.parametrize("case, match", [
    ("no_targets", "one target dict per image"),
    ("label_range", r"labels must be in \[0, 3\)"),
    ("degenerate", "has no area"),
    ("label_dtype", "int64"),
    ("image_shape", "image 0 must be a float Tensor"),
    ("nan_box", "finite"),
])
def test_bad_inputs_raise_one_value_error(case, match):
    model = build()
    images, targets = batch()
    if case == "label_range":
        targets[1]["labels"] = torch.tensor([1, 3])
    elif case == "degenerate":
        targets[0]["boxes"][1, 2] = targets[0]["boxes"][1, 0]
    elif case == "label_dtype":
        targets[0]["labels"] = targets[0]["labels"].float()
    elif case == "image_shape":
        images[0] = torch.rand(64, 64)
    elif case == "nan_box":
        targets[0]["boxes"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=match) as exc:
        model(images, None if case == "no_targets" else targets)
    assert "\n" not in str(exc.value)


@pytest.mark.cuda
def test_cuda_matches_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 (~1e-3 relative) would swamp the check
    images, targets = batch()
    cpu = build()
    gpu = build().cuda()
    lc = cpu(images, targets)
    lg = gpu([i.cuda() for i in images], [{k: v.cuda() for k, v in t.items()} for t in targets])
    for k in lc:  # same float32 maths in another summation order: ~1e-6 relative, 1e-4 leaves room for cuDNN's choices
        assert lg[k].item() == pytest.approx(lc[k].item(), rel=1e-4)
    sum(lg.values()).backward()
    spread_scores(cpu.eval())
    spread_scores(gpu.eval())
    with torch.no_grad():
        dc, dg = cpu(images[:1])[0], gpu([images[0].cuda()])[0]
    assert dg["boxes"].device.type == "cuda" and dg["ious"].device.type == "cuda"
    torch.testing.assert_close(dg["scores"][:10].cpu(), dc["scores"][:10], rtol=1e-4, atol=1e-5)


def test_pretrained_imagenet_from_the_torch_cache(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    from iouctl.models.backbones import backbone_body

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match="no cached resnet18 weights"):
        backbone_body("resnet18", "imagenet")
    (tmp_path / "checkpoints").mkdir()
    state = resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    body = backbone_body("resnet18", "imagenet")
    assert torch.equal(body.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
