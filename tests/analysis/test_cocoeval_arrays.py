"""cocoeval on arrays (iouctl.analysis.cocoeval_arrays + kernels/coco_eval): equal to faster-coco-eval bit for bit and
to pycocotools to its epsilon, on inputs that exercise every rule (crowd regions, area ranges and their edges, score
ties, IoU ties, empty images, classes without ground truth, more than 100 detections per image and class)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from iouctl.analysis import evaluate, load_gt, match_detections
from iouctl.analysis import coco_eval as ce
from iouctl.analysis.cocoeval_arrays import bb_iou, eval_tables, evaluate_arrays, gt_arrays
from iouctl.data.detections import Detections
from iouctl.ops import coco_eval as kernels

from .conftest import jitter_dets, make_dets, random_gt, write_gt

# pycocotools divides by tp + fp + np.spacing(1), faster-coco-eval (and this) by tp + fp: precisions differ by at most
# 2 ulp of 1.0, the stats (means of them) by less; 1e-12 leaves a wide margin (as tests/analysis/test_coco_eval.py).
PYCOCO_ATOL = 1e-12


def img(i, size=400):
    return {"id": i, "width": size, "height": size, "file_name": f"{i}.png"}


def ann(i, image_id, xywh, cat=1, crowd=0, area=None):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(map(float, xywh)),
            "area": float(xywh[2] * xywh[3] if area is None else area), "iscrowd": crowd}


def tables(g, d, backend):
    """(stats, precision, recall) of a third-party backend on Detections d."""
    res = ce._results_list(g, d, None)
    run = ce._run_faster if backend == "faster-coco-eval" else ce._run_pycocotools
    ev = run(g, copy.deepcopy(res))
    return np.asarray(ev.stats[:12]), ev.eval["precision"], ev.eval["recall"]


@pytest.mark.parametrize("seed, per_gt, decimals, extra_category", [
    (0, 4, None, False), (1, 8, 1, True), (2, 30, 2, False), (3, 1, None, True), (4, 12, 0, False),
    (5, 45, 1, True),  # > 100 detections per image and class: cocoeval's cap
])
def test_equals_faster_coco_eval_bit_for_bit_and_pycocotools_to_its_epsilon(tmp_path, seed, per_gt, decimals,
                                                                              extra_category):
    gt = random_gt(tmp_path / "gt.json", seed=seed, num_images=12, max_per_image=8, crowd_frac=0.15)
    d = jitter_dets(gt, seed=seed, per_gt=per_gt, score_decimals=decimals)  # rounded scores: ties
    if extra_category:  # a class without ground truth, with detections (and images without any annotation)
        data = json.loads(gt.read_text())
        data["categories"].append({"id": 11, "name": "c11"})
        gt.write_text(json.dumps(data))
        d.labels[::7] = 11
    g = load_gt(gt)
    ours, (precision, recall) = evaluate_arrays(g, d), eval_tables(g, d)
    theirs = evaluate(g, d, backend="faster-coco-eval")
    assert ours == theirs  # every key, bit for bit
    assert 0.0 < ours["AP"] < 1.0 and ours["AP_S"] != -1 and ours["AP_L"] != -1  # non-trivial, every area used
    stats, p_fast, r_fast = tables(g, d, "faster-coco-eval")
    np.testing.assert_array_equal(precision, p_fast)
    np.testing.assert_array_equal(recall, r_fast)
    stats_py, p_py, r_py = tables(g, d, "pycocotools")
    np.testing.assert_allclose(precision, p_py, rtol=0, atol=4.5e-16)
    np.testing.assert_array_equal(recall, r_py)
    np.testing.assert_allclose([ours[k] for k in ce.STAT_KEYS], stats_py, rtol=0, atol=PYCOCO_ATOL)
    if per_gt == 45:
        key = d.image_ids * 100 + d.labels
        assert torch.unique(key, return_counts=True)[1].max() > 100  # the cap is exercised


def test_area_range_edges_and_annotation_areas(tmp_path):
    """cocoeval's ranges are closed at both ends ([0, 32^2], [32^2, 96^2], ...), use the annotation's 'area' for
    ground truth (here not w * h) and w * h for detections; an unmatched detection outside a range is ignored there."""
    gt = write_gt(tmp_path / "gt.json", [img(1), img(2)], [
        ann(1, 1, [0, 0, 32, 32]),                    # area exactly 32^2: small and medium
        ann(2, 1, [100, 100, 96, 96]),                # exactly 96^2: medium and large
        ann(3, 2, [0, 0, 50, 50], area=500.0),        # box of medium size, annotated area small
        ann(4, 2, [200, 200, 40, 40], crowd=1),
    ], [1])
    d = make_dets([
        (1, [0, 0, 32, 32], 1, 0.9), (1, [100, 100, 196, 196], 1, 0.8), (1, [300, 300, 332, 332], 1, 0.7),
        (2, [1, 1, 50, 51], 1, 0.95), (2, [205, 205, 230, 230], 1, 0.99), (2, [0, 300, 8, 304], 1, 0.5),
    ])
    g = load_gt(gt)
    ours = evaluate_arrays(g, d)
    assert ours == evaluate(g, d, backend="faster-coco-eval")
    py = evaluate(g, d, backend="pycocotools")
    for k in ours:
        np.testing.assert_allclose(ours[k], py[k], rtol=0, atol=PYCOCO_ATOL, err_msg=k)
    # class 1 in all, small (1 and 3), medium (1 and 2: both edges), large (2); the crowd region never counts
    assert gt_arrays(g).num_gt.tolist() == [[3, 2, 2, 1]]


def test_an_iou_tie_goes_to_the_later_ground_truth(tmp_path):
    """cocoeval keeps the later of two ground truths with the same IoU (`>=`). Here that decides a second true
    positive: det 1 overlaps A and B equally (IoU 90/110), det 2 is A exactly; det 1 takes B, so det 2 takes A."""
    gt = write_gt(tmp_path / "gt.json", [img(1)], [ann(1, 1, [0, 0, 10, 10]), ann(2, 1, [2, 0, 10, 10])], [1])
    d = make_dets([(1, [1, 0, 11, 10], 1, 0.9), (1, [0, 0, 10, 10], 1, 0.8)])
    g = load_gt(gt)
    ours = evaluate_arrays(g, d)
    assert ours == evaluate(g, d, backend="faster-coco-eval")
    # at 0.70-0.80 det 1 (IoU 0.82) matches; it takes B, so det 2 takes A: AP 1 (first-wins would leave det 2 with B
    # at IoU 0.67: a false positive, AP 0.5)
    for k in ("AP70", "AP75", "AP80"):
        assert ours[k] == pytest.approx(1.0, abs=PYCOCO_ATOL), k
        assert evaluate(g, d, backend="pycocotools")[k] == pytest.approx(1.0, abs=PYCOCO_ATOL), k
    m = match_detections(g, d, 0.75)  # the analyses' matching follows the same rule
    assert m["tp"].tolist() == [True, True] and m["gt_index"].tolist() == [1, 0]


def test_empty_detections_and_an_empty_ground_truth_class(small_gt):
    g = load_gt(small_gt)
    for d in (Detections.empty(), jitter_dets(small_gt, seed=1).select(torch.zeros(0, dtype=torch.int64))):
        assert evaluate_arrays(g, d) == evaluate(g, d, backend="faster-coco-eval")
    assert evaluate_arrays(g, Detections.empty())["ap_per_threshold"] == [0.0] * 10


def test_scores_override_and_bad_ids(small_gt):
    g = load_gt(small_gt)
    d = jitter_dets(small_gt, seed=7)
    fused = (d.scores * d.ious).sqrt()
    assert evaluate_arrays(g, d, scores=fused) == evaluate(g, d, scores=fused)
    assert evaluate_arrays(g, d, scores=fused) != evaluate_arrays(g, d)
    bad = Detections(torch.tensor([999]), torch.zeros(1, 4), torch.tensor([2]), torch.ones(1))
    with pytest.raises(ValueError, match="image id\\(s\\) absent from the ground truth"):
        evaluate_arrays(g, bad)


def test_bb_iou_is_maskapis_expression():
    """Against a plain loop of maskApi's bbIou (pycocotools' C), float64, on random and touching boxes."""
    rng = np.random.default_rng(0)
    dt = np.r_[rng.uniform(0, 50, (200, 4)), [[0, 0, 10, 10], [10, 0, 5, 5], [3, 3, 0, 4]]]
    gt = np.r_[rng.uniform(0, 50, (200, 4)), [[10, 0, 5, 5], [0, 0, 10, 10], [0, 0, 10, 10]]]
    crowd = np.r_[rng.random(200) < 0.3, [False, True, False]]
    want = []
    for D, G, c in zip(dt, gt, crowd):
        da, ga = D[2] * D[3], G[2] * G[3]
        w = min(D[2] + D[0], G[2] + G[0]) - max(D[0], G[0])
        h = min(D[3] + D[1], G[3] + G[1]) - max(D[1], G[1])
        want.append(0.0 if w <= 0 or h <= 0 else (w * h) / (da if c else da + ga - w * h))
    np.testing.assert_array_equal(bb_iou(dt, gt, crowd), want)
    assert (np.asarray(want) > 0).sum() > 50


def test_kernel_refuses_inconsistent_inputs():
    e = np.zeros(0)
    with pytest.raises(RuntimeError, match="pair_offsets must run from 0 to the number of pairs"):
        kernels.coco_match(np.ones(2), np.zeros(2, np.int64), np.array([0, 1]), np.array([0, 1]),
                           np.zeros((1, 1), bool), np.zeros(1, bool), np.zeros((1, 1), bool), np.array([0.5]))
    with pytest.raises(RuntimeError, match="pair_gt out of range"):
        kernels.coco_match(np.ones(1), np.array([3]), np.array([0, 1]), np.array([0, 1]),
                           np.zeros((1, 1), bool), np.zeros(1, bool), np.zeros((1, 1), bool), np.array([0.5]))
    with pytest.raises(RuntimeError, match="group_offsets must not decrease"):  # would index past the detections
        kernels.coco_match(np.ones(1), np.zeros(1, np.int64), np.array([0, 1]), np.array([0, 5, 1]),
                           np.zeros((1, 1), bool), np.zeros(1, bool), np.zeros((1, 1), bool), np.array([0.5]))
    with pytest.raises(RuntimeError, match="pair_offsets must not decrease"):
        kernels.coco_match(np.ones(1), np.zeros(1, np.int64), np.array([0, 7, 1]), np.array([0, 2]),
                           np.zeros((1, 1), bool), np.zeros(1, bool), np.zeros((1, 2), bool), np.array([0.5]))
    with pytest.raises(RuntimeError, match="class_offsets must run from 0 to the number of detections"):
        kernels.coco_accumulate(np.zeros((1, 1, 2), bool), np.zeros((1, 1, 2), bool), np.array([0, 1]),
                                np.zeros(2, np.int64), np.ones((1, 1), np.int64), e + 0.5, [100])


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 1), (2, 0)])
def test_analyses_matching_kernel_equals_its_numpy_reference(tmp_path, seed, decimals):
    """The errors/calibration matching (errors._Frame.match_all: the coco_match kernel) and its numpy fallback, used
    where the kernels do not build, match the same detections at every threshold; score and IoU ties included."""
    from iouctl.analysis.errors import _Frame

    gt = random_gt(tmp_path / "gt.json", seed=seed, num_images=10, max_per_image=8, crowd_frac=0.2)
    d = jitter_dets(gt, seed=seed, per_gt=12, score_decimals=decimals)
    d.boxes = d.boxes.round()  # integer boxes: equal IoUs with several ground truths happen
    f = _Frame(load_gt(gt), d, None, 100, per_image=False)
    ts = [0.1, 0.5, 0.75, 0.95, 1.0]
    f.match_all(ts)
    for t in ts:
        a, b = f.match(t), f._match_reference(t)
        for k in ("tp", "ignored", "gt", "iou", "gt_used"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=f"{k} at {t}")
    assert f.match(0.5).tp.sum() > 20 and f.match(0.5).ignored.any()
