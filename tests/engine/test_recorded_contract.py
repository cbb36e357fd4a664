"""refine decides which runs it can use from the detector contract the run recorded (meta["detector"]), and from
the model config only for runs made before that record existed."""
import json

import pytest

from iouctl.engine.refine import box_differentiable, check_refinable, refinable
from iouctl.errors import IouctlError
from iouctl.runs import find_model_run

IOU_NET = {"_target_": "iouctl.models.rcnn.faster_rcnn", "iou_head": True}
RETINA = {"_target_": "iouctl.models.retina.retinanet", "quality": "iou"}


def _contract(box_differentiable_iou):
    return {"class": "X", "num_classes": 5, "quality": "iou", "ious_meaning": "iou", "score": "iou",
            "inference": ["nms=iou_guided"], "box_differentiable_iou": box_differentiable_iou}


def test_the_recorded_contract_decides_and_old_runs_fall_back_to_their_config():
    assert box_differentiable(IOU_NET) and not box_differentiable(RETINA)  # runs without a record
    # a detector with the capability under any _target_ (a new model file), and one without it under R-CNN's
    assert box_differentiable(RETINA, _contract(True)) and not box_differentiable(IOU_NET, _contract(False))
    assert box_differentiable(IOU_NET, {"class": "older record"})  # a record without the key: the config decides
    assert refinable({"model": RETINA}, {"detector": _contract(True)}) and refinable({"model": IOU_NET}, {})
    with pytest.raises(IouctlError, match="has no box-differentiable IoU head"):
        check_refinable("run", {"model": IOU_NET}, _contract(False))


def _train_run(runs, name, model, detector):
    d = runs / "train" / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.pt").write_bytes(b"")
    (d / "config.yaml").write_text(json.dumps({"model": model}))
    meta = {"command": "train", "status": "COMPLETED", **({"detector": detector} if detector else {})}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "status").write_text("COMPLETED\n")
    return d


def test_refine_finds_the_newest_run_whose_record_says_refinable(tmp_path):
    from iouctl.engine.refine import FIND_REFINABLE

    old = _train_run(tmp_path, "2026-01-01_00-00-00_old", IOU_NET, None)  # before records: its config decides
    assert find_model_run(None, tmp_path, "checkpoints/last.pt", "val", **FIND_REFINABLE).run == old
    new = _train_run(tmp_path, "2026-01-02_00-00-00_new", RETINA, _contract(True))
    assert find_model_run(None, tmp_path, "checkpoints/last.pt", "val", **FIND_REFINABLE).run == new
    # newest of all, an R-CNN whose record says its IoU does not follow the box: skipped
    _train_run(tmp_path, "2026-01-03_00-00-00_newest", IOU_NET, _contract(False))
    assert find_model_run(None, tmp_path, "checkpoints/last.pt", "val", **FIND_REFINABLE).run == new
