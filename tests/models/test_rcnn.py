"""Two-stage detectors: FPN Faster R-CNN and IoU-Net (iouctl.models.rcnn), at tiny CPU sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import RoIAlign, box_iou

from iouctl.errors import IouctlError
from iouctl.models.rcnn import IoUHead, MultiLevelPool, faster_rcnn, jitter_boxes
from iouctl.ops import PrRoIPool, prroi_pool

NUM_CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on this 2-core box a second busy process makes OpenMP barriers spin (seen: 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(iou_head: bool = True, iou_loss: str = "smooth_l1", size: int = 64, **kw):
    args = {"backbone": "small", "pretrained": None, "min_size": size, "max_size": size,
            "anchor_sizes": [16, 32, 64, 128, 256], "aspect_ratios": [0.5, 1.0, 2.0], "detections_per_img": 100,
            "iou_head": iou_head, "iou_loss_weight": 5.0, "box_score_thresh": 0.05, "iou_loss": iou_loss,
            "jitter_per_gt": 16, "iou_bins": 10, "num_classes": NUM_CLASSES}
    args.update(kw)
    return faster_rcnn(**args)


def batch():
    """2 images 64x64 with 2-3 boxes each, drawn as bright rectangles so there is something to learn."""
    g = torch.Generator().manual_seed(3)
    boxes = [torch.tensor([[6.0, 8.0, 30.0, 40.0], [36.0, 20.0, 60.0, 50.0]]),
             torch.tensor([[4.0, 4.0, 24.0, 20.0], [30.0, 30.0, 62.0, 58.0], [10.0, 36.0, 26.0, 60.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1, 0, 2])]
    images = []
    for b, lab in zip(boxes, labels):
        img = torch.rand(3, 64, 64, generator=g) * 0.2
        for (x1, y1, x2, y2), c in zip(b.long().tolist(), lab.tolist()):
            img[c, y1:y2, x1:x2] = 0.9
        images.append(img)
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


@pytest.mark.parametrize("iou_head", [False, True])
def test_eval_outputs_raw_detections_with_shapes_dtypes_and_ranges(iou_head):
    torch.manual_seed(0)
    model = build(iou_head).eval()
    # non-square 48x80 images, resized to min_size 64: boxes must come back in the input's pixels
    images = [torch.rand(3, 48, 80), torch.rand(3, 48, 80)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    keys = {"boxes", "labels", "scores"} | ({"ious"} if iou_head else set())
    for det in out:
        assert set(det) == keys
        m = det["boxes"].shape[0]
        assert m > 0 and det["boxes"].shape == (m, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64 and det["labels"].shape == (m,)
        assert det["scores"].dtype == torch.float32 and det["scores"].shape == (m,)
        assert int(det["labels"].min()) >= 0 and int(det["labels"].max()) < NUM_CLASSES
        assert bool((det["scores"] > 0.05).all()) and bool((det["scores"] <= 1).all())
        b = det["boxes"]
        assert bool((b[:, 0] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 48).all())
        assert float(b[:, 2].max()) > 64  # rescaled to the 80-pixel-wide input, not left at network size
        if iou_head:
            assert det["ious"].dtype == torch.float32 and det["ious"].shape == (m,)
            assert bool((det["ious"] >= 0).all() and (det["ious"] <= 1).all())


def test_eval_keeps_what_torchvision_postprocess_keeps_without_nms():
    """Our raw output = torchvision's postprocess_detections with NMS disabled (threshold 1.0 suppresses nothing)."""
    torch.manual_seed(1)
    model = build(False).eval()
    images, _ = batch()
    heads = model.roi_heads
    with torch.no_grad():
        image_list, _ = model.transform(images)
        feats = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, feats)
        out = heads.box_head(heads.box_roi_pool(feats, proposals))
        ours = heads.postprocess_detections(out["cls_logits"], out["bbox_regression"], proposals,
                                            image_list.image_sizes)
        heads.nms_thresh, cap = 1.0, heads.detections_per_img
        heads.detections_per_img = 10**9
        ref = RoIHeads.postprocess_detections(heads, out["cls_logits"], out["bbox_regression"], proposals,
                                              image_list.image_sizes)
    for i in range(2):
        ob, os_, ol = (t[i] for t in ours)
        rb, rs, rl = (t[i] for t in ref)
        assert len(ob) == min(len(rb), cap)
        assert bool((os_[:-1] >= os_[1:]).all())  # sorted by score
        if len(rb) > cap:
            rb, rs, rl = rb[:cap], rs[:cap], rl[:cap]  # ref is score-sorted too (batched_nms keeps by score)
        key = lambda b, s, lab: np.lexsort(np.c_[b.numpy(), s.numpy(), lab.numpy()].T)
        ko, kr = key(ob, os_, ol), key(rb, rs, rl)
        torch.testing.assert_close(ob[ko], rb[kr], rtol=0, atol=0)
        torch.testing.assert_close(ol[ko], rl[kr], rtol=0, atol=0)
    # and overlapping same-class boxes survive (no NMS): the IoU of some same-class pair exceeds 0.7
    b, lab = ours[0][0], ours[2][0]
    same = lab[:, None] == lab[None, :]
    iou = box_iou(b, b).masked_fill(~same | torch.eye(len(b), dtype=torch.bool), 0)
    assert float(iou.max()) > 0.7


@pytest.mark.parametrize("iou_head,iou_loss", [(False, "smooth_l1"), (True, "smooth_l1"), (True, "bce")])
def test_training_losses_are_named_finite_and_backprop(iou_head, iou_loss):
    torch.manual_seed(0)
    model = build(iou_head, iou_loss).train()
    images, targets = batch()
    losses = model(images, targets)
    expected = {"rpn_cls", "rpn_box", "cls", "box"} | ({"iou"} if iou_head else set())
    assert set(losses) == expected
    for v in losses.values():
        assert v.dim() == 0 and bool(torch.isfinite(v))
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    if iou_head:
        assert float(model.roi_heads.iou_head.fc6.weight.grad.abs().sum()) > 0


def test_image_without_boxes_trains():
    torch.manual_seed(0)
    model = build(True).train()
    images, targets = batch()
    targets[0] = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    losses = model(images, targets)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.slow
@pytest.mark.parametrize("iou_head", [False, True])
def test_a_few_steps_reduce_the_loss(iou_head):
    torch.manual_seed(0)
    model = build(iou_head).train()
    images, targets = batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss_at(seed):  # the same RNG state for the sampling and the jitter: compares like with like
        torch.manual_seed(seed)
        with torch.no_grad():
            return {k: float(v) for k, v in model(images, targets).items()}

    before = loss_at(123)
    for step in range(12):
        torch.manual_seed(step)
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_at(123)
    assert sum(after.values()) < 0.8 * sum(before.values())
    if iou_head:
        assert after["iou"] < before["iou"]


def test_deterministic_given_the_seed():
    images, targets = batch()
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        model = build(True).train()
        results.append({k: v.item() for k, v in model(images, targets).items()})
    assert results[0] == results[1]


def test_jittered_boxes_have_the_independent_iou_target_and_balanced_bins():
    torch.manual_seed(0)
    gt = torch.tensor([[10.0, 10.0, 50.0, 60.0], [20.0, 15.0, 55.0, 70.0], [60.0, 30.0, 127.0, 100.0]])
    labels = torch.tensor([0, 0, 1])
    per_gt, bins = 16, 8
    boxes, lab, iou = jitter_boxes(gt, labels, (110, 128), per_gt, bins)
    quota = math.ceil(per_gt * len(gt) / bins)
    assert boxes.shape == (len(iou), 4) and lab.shape == iou.shape and len(iou) > 0.8 * per_gt * len(gt)
    # independent target: max IoU over same-class GTs, float64 (float32 IoU of ~100 px boxes: ~1e-6 relative error)
    ref = box_iou(boxes.double(), gt.double())
    ref = torch.where(lab[:, None] == labels[None, :], ref, torch.zeros_like(ref)).amax(1)
    torch.testing.assert_close(iou.double(), ref, rtol=0, atol=1e-5)
    assert bool((iou >= 0.5).all() and (iou <= 1).all())
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 110).all())
    counts = torch.histc(iou.double(), bins, 0.5, 1.0)
    assert int(counts.max()) <= quota and int(counts.min()) >= quota // 2  # about uniform over [0.5, 1]
    # each class keeps its share (every GT contributes)
    assert set(lab.tolist()) == {0, 1}
    empty = jitter_boxes(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), (64, 64), 4, 4)
    assert [t.shape[0] for t in empty] == [0, 0, 0]


@pytest.mark.parametrize("loss", ["smooth_l1", "bce"])
def test_iou_head_loss_matches_a_plain_float64_formula(loss):
    torch.manual_seed(0)
    head = IoUHead(8, 16, 3, loss)
    logits = torch.randn(6, 3) * 2
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    ious = torch.tensor([0.5, 0.6, 0.75, 0.9, 0.99, 1.0])
    got = float(head.compute_loss({"iou_logits": logits}, labels, ious))
    x = [float(logits[i, labels[i]]) for i in range(6)]
    if loss == "smooth_l1":
        diffs = [abs(xi - (2 * t - 1)) for xi, t in zip(x, ious.tolist())]
        terms = [0.5 * d * d if d < 1 else d - 0.5 for d in diffs]  # Smooth-L1 with beta 1
        pred = [min(max((xi + 1) / 2, 0), 1) for xi in x]
    else:
        terms = [-(t * math.log(1 / (1 + math.exp(-xi))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-xi))))
                 for xi, t in zip(x, ious.tolist())]
        pred = [1 / (1 + math.exp(-xi)) for xi in x]
    assert got == pytest.approx(sum(terms) / 6, rel=1e-5)  # float32 sums of 6 terms
    chosen = head.to_iou(head.select({"iou_logits": logits}, labels))
    torch.testing.assert_close(chosen.double(), torch.tensor(pred, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_multilevel_pool_matches_per_box_prroi_with_fpn_level_and_stride():
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = {str(i): torch.randn(2, 5, 256 // s, 256 // s, dtype=torch.float64) for i, s in enumerate(strides)}
    pool = MultiLevelPool(PrRoIPool(3, spatial_scale=123.0), list(feats), strides)
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 140.0, 150.0]], dtype=torch.float64),
             torch.tensor([[5.0, 5.0, 250.0, 240.0], [30.0, 40.0, 110.0, 100.0], [1.0, 2.0, 3.0, 4.0]],
                          dtype=torch.float64)]
    got = pool(feats, boxes)
    rows = [(i, b) for i, bs in enumerate(boxes) for b in bs]
    assert got.shape == (len(rows), 5, 3, 3)
    for r, (img, b) in enumerate(rows):
        side = math.sqrt(float((b[2] - b[0]) * (b[3] - b[1])))
        k = min(max(math.floor(4 + math.log2(side / 224) + 1e-6), 2), 5)  # FPN eq. 1, clamped to P2..P5
        s = 2 ** k
        ref = prroi_pool(feats[str(k - 2)][img:img + 1], [b[None]], 3, 1.0 / s)
        torch.testing.assert_close(got[r:r + 1], ref, rtol=1e-12, atol=1e-12)
    assert len({min(max(math.floor(4 + math.log2(math.sqrt(float((b[2] - b[0]) * (b[3] - b[1]))) / 224)
                                   + 1e-6), 2), 5) for _, b in rows}) >= 3  # the case spans several levels


def test_roi_align_pool_is_selectable():
    torch.manual_seed(0)
    model = build(True, pool=RoIAlign(5, spatial_scale=1.0, sampling_ratio=2, aligned=True))
    assert [p.spatial_scale for p in model.roi_heads.box_roi_pool.pools] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    images, targets = batch()
    losses = model.train()(images, targets)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    with torch.no_grad():
        out = model.eval()(images)
    assert bool((out[0]["ious"] >= 0).all() and (out[0]["ious"] <= 1).all())


def test_predict_iou_gradient_matches_finite_differences_in_float64():
    torch.manual_seed(0)
    model = build(True).double().eval()
    images, _ = batch()
    feats, sizes = model.features([i.double() for i in images])
    assert sizes == [(64, 64), (64, 64)]
    boxes = [torch.tensor([[6.3, 8.1, 30.7, 40.2], [35.5, 19.4, 60.2, 50.9]], dtype=torch.float64,
                          requires_grad=True),
             torch.tensor([[11.2, 35.7, 25.9, 59.1]], dtype=torch.float64, requires_grad=True)]
    labels = [torch.tensor([0, 2]), torch.tensor([2])]
    ious = model.predict_iou(feats, boxes, labels, sizes)
    assert [t.shape for t in ious] == [(2,), (1,)]
    assert all(bool(((t > 0) & (t < 1)).all()) for t in ious)  # inside the clamp: a true gradient
    total = sum(t.sum() for t in ious)
    grads = torch.autograd.grad(total, boxes)
    assert all(bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in grads)
    eps = 1e-6  # central differences: PrRoI is C1 in the box (piecewise quadratic), error ~eps, roundoff ~1e-10
    with torch.no_grad():
        for b, g in zip(boxes, grads):
            for idx in np.ndindex(*b.shape):
                orig = float(b[idx])
                vals = []
                for d in (eps, -eps):
                    b[idx] = orig + d
                    vals.append(float(sum(t.sum() for t in model.predict_iou(feats, boxes, labels, sizes))))
                b[idx] = orig
                fd = (vals[0] - vals[1]) / (2 * eps)
                assert float(g[idx]) == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_missing_pretrained_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(IouctlError, match="pretrained weights file not found") as info:
        build(True, backbone="resnet18", pretrained=str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_resnet18_with_local_pretrained_file_loads_it(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build(False, backbone="resnet18", pretrained=str(path))
    body = model.backbone.body
    torch.testing.assert_close(body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"], rtol=0, atol=0)
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    torch.save({"bogus": torch.zeros(1)}, path)
    with pytest.raises(IouctlError, match="does not fit resnet18"):
        build(False, backbone="resnet18", pretrained=str(path))


@pytest.mark.parametrize("kw,match", [
    ({"backbone": "vgg"}, "backbone must be one of small, resnet18, resnet50"),
    ({"iou_loss": "l2"}, "iou_loss must be one of smooth_l1, bce"),
    ({"anchor_sizes": [8, 16, 32, 64, 128, 256]}, r"need 1..5 anchor sizes \(one per FPN level P2..P6\)"),
    ({"num_classes": 0}, "num_classes must be an int >= 1"),
    ({"iou_bins": 0}, "iou_bins must be an int >= 1"),
    ({"pretrained": "/x.pth"}, "only for the resnet backbones"),
])
def test_bad_builder_arguments_raise_one_line_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        build(True, **kw)


def test_fewer_anchor_sizes_give_fewer_levels():
    torch.manual_seed(0)
    model = build(True, anchor_sizes=[16, 32, 64])
    assert len(model.roi_heads.box_roi_pool.pools) == 3
    images, targets = batch()
    assert all(bool(torch.isfinite(v)) for v in model.train()(images, targets).values())


def test_bad_inputs_raise_value_errors():
    model = build(True).train()
    images, targets = batch()
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, NUM_CLASSES])
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        model(images, bad)
    with pytest.raises(ValueError, match="training mode needs targets"):
        model(images)
    with pytest.raises(ValueError, match="Tensor\\[3, H, W\\]"):
        model([torch.rand(64, 64)], targets[:1])
    with pytest.raises(ValueError, match="iou_head=true"):
        build(False).predict_iou({}, [], [], [])
