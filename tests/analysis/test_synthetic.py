"""Synthetic detections have the properties nms-ablate and the analysis tests rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from iouctl.analysis import correlations, evaluate, synthesize_detections, true_iou
from iouctl.analysis.synthetic import KIND_BACKGROUND, KIND_JITTERED, KIND_WRONG_CLASS
from iouctl.data.detections import Detections

from .conftest import random_gt, write_gt


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    return random_gt(tmp_path_factory.mktemp("syn") / "gt.json", seed=11, num_images=40, crowd_frac=0.05)


@pytest.fixture(scope="module")
def syn(gt):
    return synthesize_detections(gt, seed=0, return_kind=True)


def test_deterministic_from_the_seed(gt, syn):
    d, kind = syn
    d2, kind2 = synthesize_detections(gt, seed=0, return_kind=True)
    for k in ("image_ids", "boxes", "labels", "scores", "ious"):
        assert torch.equal(getattr(d, k), getattr(d2, k)), k
    assert torch.equal(kind, kind2) and d.meta == d2.meta and d.meta["seed"] == 0
    d3 = synthesize_detections(gt, seed=1)
    assert not torch.equal(d3.scores[: min(len(d), len(d3))], d.scores[: min(len(d), len(d3))])


def test_composition_and_iou_coverage(gt, syn):
    d, kind = syn
    import json

    anns = [a for a in json.loads(gt.read_text())["annotations"] if not a["iscrowd"]]
    jit = (kind == KIND_JITTERED) | (kind == KIND_WRONG_CLASS)
    assert int(jit.sum()) == 16 * len(anns)  # per_gt copies of every non-crowd box
    n_wrong, n_bg = int((kind == KIND_WRONG_CLASS).sum()), int((kind == KIND_BACKGROUND).sum())
    assert 0.02 * len(d) < n_wrong < 0.1 * len(d) and n_bg > 40  # a few wrong-class, some background
    assert (d.image_ids[1:] >= d.image_ids[:-1]).all()  # sorted by image
    assert ((d.scores > 0) & (d.scores < 1)).all() and ((d.ious >= 0) & (d.ious <= 1)).all()
    t = true_iou(gt, d)
    tj = t[kind == KIND_JITTERED].numpy()
    # IoUs with the source box cover ~0.3 .. ~0.98 (another same-class box may overlap more; clipping less).
    assert tj.min() < 0.35 and tj.max() > 0.95 and np.quantile(tj, 0.01) > 0.25
    assert np.quantile(tj, 0.1) < 0.55 < np.quantile(tj, 0.5) < 0.9 < np.quantile(tj, 0.95)
    assert np.median(t[kind == KIND_WRONG_CLASS].numpy()) == 0.0  # right place, wrong class: no same-class match
    assert np.median(t[kind == KIND_BACKGROUND].numpy()) < 0.05


def test_predicted_iou_tracks_true_iou_far_better_than_cls(gt, syn):
    d, _ = syn
    c = correlations(true_iou(gt, d), {"cls": d.scores, "iou": d.ious})
    assert c["cls"]["pearson"] > 0.1  # weakly tied, not unrelated
    assert c["iou"]["pearson"] > c["cls"]["pearson"] + 0.2
    assert c["iou"]["kendall"] > c["cls"]["kendall"] + 0.2


def test_ranking_by_predicted_iou_helps_strict_thresholds(gt, syn):
    d, _ = syn
    raw_cls, raw_iou = evaluate(gt, d), evaluate(gt, d, scores=d.ious)
    groups = d.image_ids * 1000 + d.labels
    keep_c = torchvision.ops.batched_nms(d.boxes, d.scores, groups, 0.5)
    keep_i = torchvision.ops.batched_nms(d.boxes, d.ious, groups, 0.5)
    nms_cls = evaluate(gt, d.select(keep_c))
    nms_iou = evaluate(gt, d.select(keep_i), scores=d.ious[keep_i])
    for base, other in ((raw_cls, raw_iou), (nms_cls, nms_iou)):
        for k in ("AP80", "AP90"):
            assert other[k] > base[k] + 0.05, (k, base[k], other[k])


def test_edge_cases_and_errors(tmp_path, gt):
    one_cat = write_gt(
        tmp_path / "one.json",
        [{"id": 1, "width": 100, "height": 80, "file_name": "1.png"}],
        [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0}],
        [4],
    )
    d, kind = synthesize_detections(one_cat, seed=0, per_gt=5, background_per_image=0, return_kind=True)
    assert len(d) == 5 and (kind == KIND_JITTERED).all() and (d.labels == 4).all()  # no other class to confuse with
    assert (d.boxes[:, 2] <= 100).all() and (d.boxes[:, 3] <= 80).all() and (d.boxes >= 0).all()  # clipped to the image
    no_ann = write_gt(tmp_path / "none.json", [{"id": 1, "width": 100, "height": 80, "file_name": "1.png"}], [], [4])
    d = synthesize_detections(no_ann, seed=0, background_per_image=3)
    assert isinstance(d, Detections) and (true_iou(no_ann, d) == 0).all()
    empty = write_gt(tmp_path / "empty.json", [], [], [4])
    assert len(synthesize_detections(empty)) == 0
    with pytest.raises(ValueError, match="iou_range must satisfy 0.14 <= lo < hi < 1"):
        synthesize_detections(gt, iou_range=(0.9, 0.5))
    with pytest.raises(ValueError, match="iou_beta must be two positive"):
        synthesize_detections(gt, iou_beta=(0, 1))
    with pytest.raises(ValueError, match="wrong_class_frac in \\[0, 1\\]"):
        synthesize_detections(gt, wrong_class_frac=2.0)
