"""model.init_from: torchvision detector state_dicts (randomly initialised here, nothing downloaded) into our models.

The reference is torchvision itself: after loading, our backbone/FPN/heads must compute what torchvision's modules
compute on the same input, and every loaded tensor must equal the file's.
"""
from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torchvision
from torchvision.models.detection import (fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn,
                                          fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn,
                                          retinanet_resnet50_fpn_v2)
from torchvision.ops import FrozenBatchNorm2d, RoIAlign
from typer.testing import CliRunner

from iouctl.errors import ConfigError
from iouctl.models import init_from
from iouctl.models.rcnn import faster_rcnn
from iouctl.models.retina import retinanet
from tests.models.test_rcnn import one_thread  # noqa: F401 -- its autouse fixture: one intra-op thread

pytestmark = pytest.mark.slow  # builds torchvision detectors (ResNet-50 FPN): ~1-2 s per test

TV_RCNN = [32, 64, 128, 256, 512]




class TorchvisionFiles(dict):
    """name -> (path of the saved state_dict, the torchvision model in eval mode), built on first use."""

    BUILDERS = {f.__name__: f for f in (fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, retinanet_resnet50_fpn,
                                        retinanet_resnet50_fpn_v2)}

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __missing__(self, name):
        torch.manual_seed(len(name))
        model = self.BUILDERS[name](weights=None, weights_backbone=None).eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding and eps are really tested
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        path = self.folder / f"{name}.pth"
        torch.save(model.state_dict(), path)
        self[name] = (path, model)
        return self[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return TorchvisionFiles(tmp_path_factory.mktemp("tv"))


def close(ours, theirs, rel=1e-5):
    """Equal up to float32 rounding over ~50 layers (BatchNorm vs FrozenBatchNorm2d kernels): relative to the
    largest activation."""
    torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel * float(theirs.abs().max()))


def rcnn(init=None, seed=0, **kw):
    args = {"backbone": "resnet50", "pretrained": None, "min_size": 64, "max_size": 64, "anchor_sizes": TV_RCNN,
            "aspect_ratios": [0.5, 1.0, 2.0], "detections_per_img": 100, "iou_head": True, "iou_loss_weight": 5.0,
            "box_score_thresh": 0.05, "iou_loss": "smooth_l1", "jitter_per_gt": 16, "iou_bins": 10,
            "num_classes": 3, "init_from": init}
    args.update(kw)
    torch.manual_seed(seed)
    return faster_rcnn(**args)


def retina(init=None, seed=0, **kw):
    args = {"backbone": "resnet50", "pretrained": None, "min_size": 64, "max_size": 64, "anchor_sizes": TV_RCNN,
            "aspect_ratios": [0.5, 1.0, 2.0], "quality": "iou", "iou_loss_weight": 1.0,
            "score_thresh": 0.05, "topk_candidates": 1000, "detach_iou_target": True,
            "num_classes": 3, "head_norm": "none", "init_from": init}
    args.update(kw)
    torch.manual_seed(seed)
    return retinanet(**args)


def status(report) -> dict:
    return {g.group: g.status for g in report.groups}


def group(report, name):
    return next(g for g in report.groups if g.group == name)


def state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def assert_same(ours: dict, file: dict, pairs: dict) -> None:
    for k, fk in pairs.items():
        assert torch.equal(ours[k], file[fk]), k


def image(seed=0):
    return torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- Faster R-CNN
def test_fasterrcnn_v1_loads_what_torchvision_computes_and_reinitialises_the_classes(files):
    path, tv = files["fasterrcnn_resnet50_fpn"]
    file = torch.load(path, weights_only=True)
    model = rcnn(path, pool=RoIAlign(7, 1.0, sampling_ratio=2)).eval()
    fresh = rcnn(None, pool=RoIAlign(7, 1.0, sampling_ratio=2))  # same seed: the constructor's initialisation
    ours = state(model)
    report = model.init_report

    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "RPN conv": "loaded",
                              "RPN outputs": "loaded", "box head": "loaded", "box predictor": "re-initialised",
                              "IoU head": "new"}
    assert_same(ours, file, {k: k for k in ours if k.startswith(("backbone.", "rpn."))})
    assert_same(ours, file, {f"roi_heads.box_head.mlp.{n}": f"roi_heads.box_head.{n}"
                             for n in ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias")})
    # 3 classes + background here, torchvision's 91: the predictor keeps our initialisation, the IoU head is new
    before = state(fresh)
    for k in ours:
        if k.startswith(("roi_heads.box_head.predictor.", "roi_heads.iou_head.")):
            assert torch.equal(ours[k], before[k]), k
    assert group(report, "box predictor").shapes[0] == ["roi_heads.box_head.predictor.cls_score.weight",
                                                        [4, 1024], [91, 1024]]
    assert report.unused == {"box predictor": 4}

    with torch.no_grad():  # the same computation as torchvision's modules, in eval mode
        x = image()
        feats, theirs = model.backbone(x), tv.backbone(x)
        assert len(feats) == len(theirs) == 5
        for a, b in zip(feats.values(), theirs.values()):
            close(a, b)
        f = list(feats.values())
        for a, b in zip(model.rpn.head(f), tv.rpn.head(f)):
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v)  # same input, same weights: exact
        boxes = [torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 20.0, 120.0, 90.0], [0.0, 0.0, 16.0, 12.0]])]
        sizes = [(96, 128)]
        pooled = tv.roi_heads.box_roi_pool(feats, boxes, sizes)
        torch.testing.assert_close(model.roi_heads.box_roi_pool(feats, boxes), pooled)
        torch.testing.assert_close(model.roi_heads.box_head.mlp(pooled), tv.roi_heads.box_head(pooled))

    body = model.backbone.body  # as torchvision fine-tunes: frozen BatchNorm, stem + layer1 fixed
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    json.dumps(report.to_dict())  # what train writes to init_from.json


def test_fasterrcnn_v1_predictor_loads_when_the_classes_match_and_anchors_decide_the_rpn(files):
    path, _ = files["fasterrcnn_resnet50_fpn"]
    file = torch.load(path, weights_only=True)
    model = rcnn(path, num_classes=90, anchor_sizes=[16, 32, 64, 128, 256], iou_head=False)
    report = model.init_report
    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "RPN conv": "loaded",
                              "RPN outputs": "fresh", "box head": "loaded", "box predictor": "loaded"}
    assert_same(state(model), file, {f"roi_heads.box_head.predictor.{n}": f"roi_heads.box_predictor.{n}"
                                     for n in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight",
                                               "bbox_pred.bias")})
    # anchors of another size: the RPN's objectness / deltas would mean other boxes, so they are not loaded
    assert "model.anchor_sizes=[32,64,128,256,512]" in group(report, "RPN outputs").reason
    assert not torch.equal(state(model)["rpn.head.cls_logits.weight"], file["rpn.head.cls_logits.weight"])
    text = "\n".join(report.lines())
    assert "RPN outputs" in text and "fresh" in text and len(report.lines()) <= 12


def test_rpn_outputs_load_the_rows_of_our_anchors(files):
    path, tv = files["fasterrcnn_resnet50_fpn"]
    model = rcnn(path, aspect_ratios=[1.0, 2.0], iou_head=False).eval()
    assert status(model.init_report)["RPN outputs"] == "loaded"
    with torch.no_grad():
        f = list(tv.backbone(image(1)).values())
        (obj, *_), (reg, *_) = model.rpn.head(f)
        (tv_obj, *_), (tv_reg, *_) = tv.rpn.head(f)
    torch.testing.assert_close(obj, tv_obj[:, [1, 2]])  # torchvision's anchors per location: ratios 0.5, 1, 2
    torch.testing.assert_close(reg, tv_reg[:, 4:12])


def test_fasterrcnn_v2_folds_the_fpn_batchnorm_and_reports_its_other_heads(files):
    path, tv = files["fasterrcnn_resnet50_fpn_v2"]
    model = rcnn(path).eval()
    report = model.init_report
    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "RPN conv": "fresh",
                              "RPN outputs": "fresh", "box head": "fresh", "box predictor": "fresh",
                              "IoU head": "new"}
    assert "2 convs" in group(report, "RPN conv").reason and "v2" in group(report, "box head").reason
    assert report.unused == {"RPN conv": 4, "RPN outputs": 4, "box head": 22, "box predictor": 4}
    with torch.no_grad():
        for a, b in zip(model.backbone(image()).values(), tv.backbone(image()).values()):
            close(a, b)  # the FPN's BatchNorm folded into its convs: equal up to rounding


def test_a_v1_file_saved_from_frozen_batchnorm_runs_with_eps_0_as_torchvision(files, tmp_path):
    """torchvision's hub file for fasterrcnn_resnet50_fpn has no num_batches_tracked and runs with eps 0."""
    _, tv = files["fasterrcnn_resnet50_fpn"]
    tv = copy.deepcopy(tv)
    with torch.no_grad():
        for m in tv.backbone.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(1e-5, 1e-4)  # where eps 1e-5 would visibly change the output
                m.weight.copy_(m.running_var.sqrt() * torch.empty_like(m.weight).uniform_(0.5, 1.5))  # scale ~1
                m.eps = 0.0
    sd = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "coco_v1.pth")
    model = rcnn(tmp_path / "coco_v1.pth").eval()
    assert {m.eps for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    with torch.no_grad():
        for a, b in zip(model.backbone(image()).values(), tv.backbone(image()).values()):
            close(a, b)


# ---------------------------------------------------------------------------------------------------- RetinaNet
@pytest.mark.parametrize("sizes, ratios, classes, anchors", [
    (TV_RCNN, [0.5, 1.0, 2.0], 91, [0, 3, 6]),  # torchvision's first size of each level, all classes
    ([40, 80, 161, 322, 645], [1.0], 3, [4]),  # its second size (x * 2^(1/3)), one ratio, other classes
])
def test_retinanet_v1_loads_towers_and_the_rows_of_our_anchors(files, sizes, ratios, classes, anchors):
    path, tv = files["retinanet_resnet50_fpn"]
    model = retina(path, anchor_sizes=sizes, aspect_ratios=ratios, num_classes=classes).eval()
    report = model.init_report
    cls_status = "loaded" if classes == 91 else "re-initialised"
    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "FPN P6": "loaded", "FPN P7": "loaded",
                              "classification tower": "loaded", "regression tower": "loaded",
                              "class logits": cls_status, "box regression": "loaded", "IoU head": "new"}
    with torch.no_grad():
        x = image(2)
        feats, theirs = model.backbone(x), tv.backbone(x)
        for a, b in zip(feats.values(), theirs.values()):  # P3..P7, P6 and P7 from P5 as LastLevelP6P7(256, 256)
            close(a, b)
        f = list(feats.values())
        out, ref = model.head(f), tv.head(f)
    n = out["bbox_regression"].shape[0]
    torch.testing.assert_close(out["bbox_regression"].reshape(n, -1, len(anchors), 4),
                               ref["bbox_regression"].reshape(n, -1, 9, 4)[:, :, anchors])
    if classes == 91:
        torch.testing.assert_close(out["cls_logits"].reshape(n, -1, len(anchors), 91),
                                   ref["cls_logits"].reshape(n, -1, 9, 91)[:, :, anchors])
    else:  # re-initialised: torchvision's RetinaNet prior (bias -log((1 - 0.01) / 0.01)), with the shapes reported
        bias = state(model)["head.classification_head.cls_logits.bias"]
        torch.testing.assert_close(bias, torch.full_like(bias, -torch.log(torch.tensor(99.0)).item()))
        assert group(report, "class logits").shapes[0][1:] == [[3, 256, 3, 3], [819, 256, 3, 3]]


@pytest.mark.parametrize("quality, head", [("centerness", {"centre-ness head": "new"}), ("qfl", {}), ("none", {})])
def test_retinanet_v1_into_every_quality_head(files, quality, head):
    path, _ = files["retinanet_resnet50_fpn"]
    report = retina(path, quality=quality, num_classes=91).init_report
    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "FPN P6": "loaded", "FPN P7": "loaded",
                              "classification tower": "loaded", "regression tower": "loaded",
                              "class logits": "loaded", "box regression": "loaded", **head}


def test_retinanet_v1_into_groupnorm_towers_says_how_to_load_them(files):
    path, _ = files["retinanet_resnet50_fpn"]
    report = retina(path, head_norm="group", anchor_sizes=[16, 32, 64]).init_report
    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "classification tower": "fresh",
                              "regression tower": "fresh", "class logits": "fresh", "box regression": "fresh",
                              "IoU head": "new"}
    assert "model.head_norm=none" in group(report, "classification tower").reason
    assert report.unused["FPN P6"] == 2 and report.unused["FPN P7"] == 2  # 3 levels here: P3..P5


def test_retinanet_v2_loads_body_and_fpn_and_reports_p6_and_the_groupnorm_towers(files):
    path, tv = files["retinanet_resnet50_fpn_v2"]
    model = retina(path, head_norm="group").eval()
    report = model.init_report
    assert status(report) == {"backbone body": "loaded", "FPN": "loaded", "FPN P6": "fresh", "FPN P7": "fresh",
                              "classification tower": "fresh", "regression tower": "fresh", "class logits": "fresh",
                              "box regression": "fresh", "IoU head": "new"}
    assert "C5" in group(report, "FPN P6").reason and "32 groups" in group(report, "regression tower").reason
    with torch.no_grad():
        ours, theirs = list(model.backbone(image()).values()), list(tv.backbone(image()).values())
    for a, b in zip(ours[:3], theirs[:3]):  # P3..P5; v2 computes P6 from C5
        close(a, b)


def test_a_checkpoint_with_a_model_entry_loads(files, tmp_path):
    path, _ = files["retinanet_resnet50_fpn"]
    # torchvision's reference scripts save {"model", "optimizer", ..., "args": argparse.Namespace}
    torch.save({"model": torch.load(path, weights_only=True), "epoch": 3, "args": argparse.Namespace(lr=0.01)},
               tmp_path / "ckpt.pth")
    report = retina(tmp_path / "ckpt.pth").init_report
    assert status(report)["box regression"] == "loaded"


# ------------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def models():
    return {"rcnn": rcnn(None, iou_head=False), "retina": retina(None)}


def test_a_file_of_the_other_family_is_one_line(files, models):
    retina_file, _ = files["retinanet_resnet50_fpn"]
    with pytest.raises(ConfigError, match=r"holds a RetinaNet, for models retina, iou_retina; this model takes .*"
                                          r"fasterrcnn_resnet50_fpn or fasterrcnn_resnet50_fpn_v2") as e:
        init_from.load_into_two_stage(models["rcnn"], retina_file, "resnet50")
    assert str(retina_file) in str(e.value) and "\n" not in str(e.value)
    rcnn_file, _ = files["fasterrcnn_resnet50_fpn_v2"]
    with pytest.raises(ConfigError, match="holds a Faster R-CNN, for models faster_rcnn, iou_net"):
        init_from.load_into_retinanet(models["retina"], rcnn_file, "resnet50")


def test_other_backbones_are_refused_before_reading(files, models):
    path, _ = files["fasterrcnn_resnet50_fpn"]
    with pytest.raises(ConfigError, match=r"set model.backbone=resnet50 \(got small\)"):
        rcnn(path, backbone="small")


def test_a_detector_on_another_backbone_fits_almost_nothing(tmp_path, models):
    torch.manual_seed(0)
    torch.save(fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).state_dict(),
               tmp_path / "mobile.pth")
    with pytest.raises(ConfigError, match=r"mobile.pth fits almost nothing: 0 of our 265 ResNet-50 backbone"):
        init_from.load_into_two_stage(copy.deepcopy(models["rcnn"]), tmp_path / "mobile.pth", "resnet50")


class Opaque:  # any class: weights_only refuses to rebuild it
    pass


@pytest.mark.parametrize("name, content, message", [
    ("missing.pth", None, "init_from file not found"),
    ("text.pth", b"hello", "could not be read as a torch state_dict"),
    ("empty.pth", b"", "could not be read as a torch state_dict"),
    ("truncated.pth", "truncated", "could not be read as a torch state_dict"),
    ("object.pth", {"x": Opaque()}, r"it holds a pickled .*Opaque, and only tensors are read"),
    ("list.pth", [torch.zeros(2)], r"is not a state_dict \(a dict of named tensors"),
    ("classifier.pth", "resnet18", r"holds a ResNet classifier, not a detector: give it as model.pretrained="),
    ("iouctl.pth", "iouctl", r"is an iouctl training checkpoint: continue its run with"),
    ("other.pth", {"foo.weight": torch.zeros(2)}, "is not a torchvision detector state_dict"),
])
def test_unreadable_or_foreign_files_are_one_line(tmp_path, models, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save({"a.weight": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "resnet18":
        torch.save(torchvision.models.resnet18().state_dict(), path)
    elif content == "iouctl":
        torch.save({"model": {"a": torch.zeros(1)}, "optimizer": {}, "iteration": 4, "config_name": "train"}, path)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message) as e:
        init_from.load_into_retinanet(models["retina"], path, "resnet50")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------- training
def test_train_prints_and_records_the_summary_and_resume_keeps_the_checkpoint(files, tmp_path):
    from iouctl.cli import app

    path, _ = files["retinanet_resnet50_fpn"]
    runner = CliRunner()
    args = ["train", "model=retina", "experiment=tiny", "data.num_train=4", "data.num_val=2", "data.image_size=64",
            "model.min_size=64", "model.max_size=64", "model.backbone=resnet50", "model.head_norm=none",
            f"model.init_from={path}", "schedule.max_iters=2", "schedule.lr_steps=[2]", "checkpoint_every=1",
            "optim.lr=0.001", "model.score_thresh=0.001"]  # fresh class logits start at p=0.01
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    (first,) = sorted((tmp_path / "runs" / "train").iterdir())
    saved = json.loads((first / "init_from.json").read_text())
    assert saved["file"] == str(path) and saved["source"] == "torchvision retinanet_resnet50_fpn"
    assert {g["group"]: g["status"] for g in saved["groups"]}["class logits"] == "fresh"  # anchors [16, 32, 64]
    assert "init_from " in (first / "log").read_text() and "backbone body 265/265" in (first / "log").read_text()

    # resume: the model is built (init_from applied) before the checkpoint loads, so the checkpoint's weights win
    r = runner.invoke(app, args + ["resume=true", f"run={first}"])
    assert r.exit_code == 0, r.output
    second = next(d for d in (tmp_path / "runs" / "train").iterdir() if d != first)
    assert not (second / "init_from.json").exists()
    assert "not used: the weights come from the checkpoint" in (second / "log").read_text()
    import numpy as np

    trained = torch.load(first / "checkpoints" / "last.pt", weights_only=True)["model"]
    key = "head.regression_head.conv.0.0.weight"  # training moved it away from the file's
    assert not torch.equal(trained[key], torch.load(path, weights_only=True)[key])
    a, b = np.load(first / "detections" / "val.npz"), np.load(second / "detections" / "val.npz")
    assert a["scores"].size and np.array_equal(a["scores"], b["scores"])  # the trained weights, not the file's

    r = runner.invoke(app, ["train", "model=faster_rcnn", "model.backbone=resnet50", f"model.init_from={path}",
                            "experiment=tiny", "data.num_train=4", "data.num_val=2", "data.image_size=64"])
    assert r.exit_code == 2 and "holds a RetinaNet" in r.output and "Traceback" not in r.output
