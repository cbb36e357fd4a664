"""Oracle bounds: a scene whose headroom is known by hand, every variant against an independent construction of its
input (plain-loop true IoUs), arms without predicted IoUs, reuse of given metrics, and the repository's NMS arms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iouctl.analysis import (
    ORACLES, evaluate, load_gt, oracle_bounds, oracle_markdown, perfect_classification, true_iou, with_true_iou,
)
from iouctl.data.detections import Detections

from tests.box_loops import loop_iou as box_iou

from .conftest import jitter_dets, make_dets, random_gt, write_gt


class LoopNMS:
    """Greedy NMS per (image, class) by a plain loop, ranked by cls or by the predicted IoU: an arm as
    oracle_bounds sees one (``needs_iou``, ``name``, ``__call__``), independent of the kernels."""

    def __init__(self, score="cls", thr=0.5):
        self.score, self.thr = score, thr
        self.needs_iou = score == "iou"
        self.name = f"loop[{score}]@{thr:g}"

    def __call__(self, d):
        s = d.scores if self.score == "cls" else d.ious
        keep = []
        for key in sorted({(int(i), int(c)) for i, c in zip(d.image_ids, d.labels)}):
            rows = [k for k in range(len(d)) if (int(d.image_ids[k]), int(d.labels[k])) == key]
            rows.sort(key=lambda k: (-float(s[k]), k))
            kept = []
            for k in rows:
                if all(box_iou(d.boxes[k].tolist(), d.boxes[j].tolist()) <= self.thr for j in kept):
                    kept.append(k)
            keep += kept
        out = d.select(torch.tensor(keep, dtype=torch.int64))
        out.scores = s[torch.tensor(keep, dtype=torch.int64)].float()
        return out


def loop_true_iou(gt_path, d):
    data = json.loads(gt_path.read_text())
    out = []
    for k in range(len(d)):
        best = 0.0
        for a in data["annotations"]:
            if a["iscrowd"] or a["image_id"] != int(d.image_ids[k]) or a["category_id"] != int(d.labels[k]):
                continue
            x, y, w, h = a["bbox"]
            best = max(best, box_iou(d.boxes[k].double().tolist(), [x, y, x + w, y + h]))
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


def pyco(g, d):
    return evaluate(g, d, backend="pycocotools")


@pytest.fixture
def scene(tmp_path):
    images = [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0}]
    gt = write_gt(tmp_path / "g.json", images, anns, [1])
    d = make_dets([
        (1, [0, 0, 10, 9.5], 1, 0.5, 0.6),  # X: true IoU 0.95, predicted 0.6
        (1, [0, 0, 10, 5.5], 1, 0.6, 0.9),  # Y: true IoU 0.55, predicted 0.9; IoU(X, Y) = 0.58 > 0.5
        (1, [60, 60, 70, 70], 1, 0.9, 0.2),  # Z: background, the best cls score
    ])
    return gt, d


def test_scene_headroom_by_hand(scene):
    gt, d = scene
    rep = oracle_bounds(gt, d, [LoopNMS("iou"), LoopNMS("cls")], evaluate_fn=pyco)
    iou_arm, cls_arm = rep.rows
    assert rep.num_raw == 3 and rep.num_foreground == 2 and rep.oracles == ORACLES
    # ranked by the predicted IoU: Y (0.9) suppresses X, Z stays (another place): Y's true IoU 0.55 -> AP75 0
    # (pycocotools' precision carries np.spacing(1): a perfect AP reads 1 - 1e-16)
    assert iou_arm.ap["predicted"]["AP75"] == 0.0 and iou_arm.ap["predicted"]["AP50"] == pytest.approx(1.0)
    # ranked by the true IoU: X suppresses Y -> AP75 1: a perfect localisation score buys the whole AP75
    assert iou_arm.ap["true_iou"]["AP75"] == pytest.approx(1.0)
    assert iou_arm.headroom["true_iou"]["AP75"] == pytest.approx(1.0)
    # ranked by cls: Z (FP) first, then Y (TP at 0.5): precision 1/2 at recall 1 -> AP50 0.5; perfect cls removes Z
    assert cls_arm.ap["predicted"]["AP50"] == pytest.approx(0.5)
    assert cls_arm.ap["perfect_cls"]["AP50"] == pytest.approx(1.0)
    assert cls_arm.headroom["perfect_cls"]["AP50"] == pytest.approx(0.5)
    assert cls_arm.ap["perfect_cls"]["AP75"] == 0.0  # Y still wins the cluster
    # an arm that never reads the IoU has no true-IoU oracle
    assert not cls_arm.reads_iou and cls_arm.ap["true_iou"] is None and cls_arm.headroom["true_iou"] is None
    assert cls_arm.ap["perfect_cls_true_iou"] is None
    assert iou_arm.ap["perfect_cls_true_iou"]["AP"] == pytest.approx(iou_arm.ap["true_iou"]["AP"])  # Z had no say
    md = oracle_markdown(rep, keys=("AP50", "AP75"))
    row = [line for line in md.splitlines() if line.startswith("| loop[iou]@0.5 |")][0].split(" | ")
    assert row[1:5] == ["100.0", "100.0 (+0.0)", "100.0 (+0.0)", "100.0 (+0.0)"]
    assert row[5:8] == ["0.0", "100.0 (+100.0)", "0.0 (+0.0)"]
    assert "| loop[cls]@0.5 | 50.0 | - | 100.0 (+50.0) | - |" in md
    json.dumps(rep.to_dict(), allow_nan=False)


def test_every_variant_equals_an_independent_construction(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=4, num_images=8, crowd_frac=0.1)
    d = jitter_dets(gt_path, seed=5, per_gt=5, n_background=20)
    g = load_gt(gt_path)
    t = loop_true_iou(gt_path, d)
    np.testing.assert_allclose(true_iou(g, d).numpy(), t.numpy(), rtol=0, atol=1e-12)
    arms = {"iou": LoopNMS("iou"), "cls": LoopNMS("cls", 0.6)}
    rep = oracle_bounds(g, d, arms, evaluate_fn=pyco)
    oracle_dets = Detections(d.image_ids, d.boxes, d.labels, d.scores, t.float())
    fg = t >= 0.5
    fg_dets = d.select(fg)
    fg_oracle = Detections(fg_dets.image_ids, fg_dets.boxes, fg_dets.labels, fg_dets.scores, t[fg].float())
    for row in rep.rows:
        arm = arms[row.arm]
        want = {"predicted": d, "perfect_cls": fg_dets}
        if arm.needs_iou:
            want.update(true_iou=oracle_dets, perfect_cls_true_iou=fg_oracle)
        for variant, dd in want.items():
            out = arm(dd)
            m = pyco(g, out)
            assert row.ap[variant] == {k: m[k] for k in row.ap[variant]}, (row.arm, variant)
            assert row.kept[variant] == len(out)
        assert set(row.ap) == {"predicted", *ORACLES}
    assert rep.num_foreground == int(fg.sum())
    gain = rep.rows[0].headroom["true_iou"]
    assert gain["AP"] > 0  # the noisy predicted IoUs of jitter_dets leave headroom


def test_default_evaluator_gives_evaluates_numbers(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=12, num_images=8)
    d = jitter_dets(gt_path, seed=13)
    arms = [LoopNMS("iou"), LoopNMS("cls")]
    fast = oracle_bounds(gt_path, d, arms)
    slow = oracle_bounds(gt_path, d, arms, evaluate_fn=pyco)
    for a, b in zip(fast.rows, slow.rows):
        for v in a.ap:
            if a.ap[v] is None:
                assert b.ap[v] is None
                continue
            for k, x in a.ap[v].items():
                assert x == pytest.approx(b.ap[v][k], abs=1e-12), (a.arm, v, k)


def test_no_predicted_iou_and_reuse_of_given_metrics(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=6)
    d = jitter_dets(gt_path, seed=7)
    no_iou = Detections(d.image_ids, d.boxes, d.labels, d.scores, None, {"model": "retina"})
    calls = []

    def counting(g, out):
        calls.append(len(out))
        return pyco(g, out)

    arms = [LoopNMS("iou"), LoopNMS("cls")]
    given = {"loop[cls]@0.5": {"AP": 0.123, "AP50": 0.5}}
    rep = oracle_bounds(gt_path, no_iou, arms, oracles=("true_iou", "perfect_cls"), predicted=given,
                        evaluate_fn=counting)
    iou_arm, cls_arm = rep.rows
    # IoU arm: no predicted IoU to run on, but the true-IoU oracle supplies one
    assert iou_arm.ap["predicted"] is None and iou_arm.ap["true_iou"] is not None
    assert iou_arm.ap["perfect_cls"] is None and iou_arm.headroom["true_iou"] is None
    assert cls_arm.ap["predicted"] == {"AP": 0.123, "AP50": 0.5}  # taken as given, not re-evaluated
    assert len(calls) == 2  # iou arm under true_iou, cls arm under perfect_cls
    assert set(cls_arm.ap) == {"predicted", "true_iou", "perfect_cls"}


def test_helpers_and_bad_arguments(scene):
    gt, d = scene
    t = true_iou(gt, d)
    o = with_true_iou(d, t)
    assert torch.equal(o.ious, t.float()) and torch.equal(o.scores, d.scores) and o.meta["oracle"] == "true_iou"
    fg, index = perfect_classification(d, t, 0.9)
    assert index.tolist() == [0] and len(fg) == 1
    with pytest.raises(ValueError, match=r"true_iou must be a float Tensor\[3\]"):
        with_true_iou(d, t[:2])
    with pytest.raises(ValueError, match=r"fg_iou must be in \(0, 1\]"):
        perfect_classification(d, t, 0.0)
    with pytest.raises(ValueError, match="unknown oracle"):
        oracle_bounds(gt, d, [LoopNMS()], oracles=("true_iou", "perfect"))
    with pytest.raises(ValueError, match="no arms"):
        oracle_bounds(gt, d, [])


def test_with_the_repository_nms_arms(tmp_path):
    from iouctl.postprocess.suppression import GreedyNMS, IoUGuidedNMS

    gt_path = random_gt(tmp_path / "gt.json", seed=9, num_images=8)
    d = jitter_dets(gt_path, seed=10)
    arms = [GreedyNMS(iou_threshold=0.5), IoUGuidedNMS(iou_threshold=0.5), GreedyNMS(iou_threshold=0.5, score="iou")]
    rep = oracle_bounds(gt_path, d, arms, evaluate_fn=pyco)
    for arm, row in zip(arms, rep.rows):
        assert row.arm == arm.name and row.reads_iou == arm.needs_iou
        assert row.ap["predicted"]["AP"] == pyco(load_gt(gt_path), arm(d))["AP"]
        oracle = arm(with_true_iou(d, true_iou(gt_path, d)))
        if arm.needs_iou:
            assert row.ap["true_iou"]["AP"] == pyco(load_gt(gt_path), oracle)["AP"]
    # ranked by the true IoU, greedy NMS beats its predicted-IoU self on these noisy IoUs
    assert rep.rows[2].headroom["true_iou"]["AP"] > 0
