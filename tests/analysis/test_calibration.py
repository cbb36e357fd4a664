"""Calibration: reliability/ECE, LaECE and LRP against plain loops over pycocotools' own matching, hand-computed
cases, and the report/markdown the commands show."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from iouctl.analysis import (
    analyze_arm, calibration_markdown, calibration_report, error_breakdown, iou_calibration, laece, load_gt, lrp,
    reliability, true_iou,
)
from iouctl.data.detections import Detections

from tests.box_loops import loop_iou as box_iou

from .conftest import jitter_dets, make_dets, random_gt, write_gt

# Float64 sums of a few thousand terms in different orders: 1e-12 is "equal up to rounding" with a wide margin.
ATOL = 1e-12


# ---------------------------------------------------------------- reliability
def ref_reliability(conf, target, num_bins):
    edges = np.linspace(0, 1, num_bins + 1)
    rows = []
    for j in range(num_bins):
        lo, hi = edges[j], edges[j + 1]
        inside = [(c, t) for c, t in zip(conf, target) if lo <= c < hi or (j == num_bins - 1 and c == hi)]
        rows.append(inside)
    n = len(conf)
    ece, mce = 0.0, 0.0
    for inside in rows:
        if inside:
            gap = abs(sum(c for c, _ in inside) / len(inside) - sum(t for _, t in inside) / len(inside))
            ece += len(inside) / n * gap
            mce = max(mce, gap)
    return [len(r) for r in rows], ece, mce


def test_reliability_equals_plain_loop_including_bin_edges():
    rng = np.random.default_rng(0)
    conf = np.r_[rng.random(500), np.linspace(0, 1, 11), [1.0, 0.0]]  # edges and both ends included
    target = np.clip(conf + rng.normal(0, 0.2, len(conf)), 0, 1)
    for bins in (1, 7, 10, 25):
        r = reliability(torch.tensor(conf), torch.tensor(target), bins)
        count, ece, mce = ref_reliability(conf.tolist(), target.tolist(), bins)
        assert r.count == count and r.n == len(conf)
        assert r.ece == pytest.approx(ece, abs=ATOL) and r.mce == pytest.approx(mce, abs=ATOL)
        np.testing.assert_allclose(r.edges, np.linspace(0, 1, bins + 1), rtol=0, atol=0)


def test_reliability_known_values():
    c = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert reliability(c, c, 10).ece == pytest.approx(0.0, abs=ATOL)
    assert reliability(c, c / 2, 10).ece == pytest.approx(0.25, abs=ATOL)  # = mean gap = mean(c) / 2
    r = reliability(torch.full((4,), 0.95), torch.tensor([1.0, 1.0, 0.0, 0.0]), 10)
    assert r.count == [0] * 9 + [4] and r.ece == pytest.approx(0.45) and math.isnan(r.mean_confidence[0])
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["mean_target"][0] is None
    with pytest.raises(ValueError, match="'confidence' must lie in"):
        reliability(torch.tensor([1.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_bins must be an integer >= 1"):
        reliability(c, c, 0)
    with pytest.raises(ValueError, match="'target' must be 1-d of length 1001"):
        reliability(c, c[:3])


def test_iou_calibration_filters_by_true_iou():
    t = torch.tensor([0.0, 0.2, 0.6, 0.9], dtype=torch.float64)
    s = {"iou": torch.tensor([0.5, 0.5, 0.6, 0.8], dtype=torch.float64)}
    all_ = iou_calibration(t, s, 10)["iou"]
    fg = iou_calibration(t, s, 10, min_true_iou=0.5)["iou"]
    assert all_.n == 4 and fg.n == 2
    assert fg.ece == pytest.approx((0.0 + 0.1) / 2, abs=ATOL)  # bins 0.6 and 0.8: gaps 0 and 0.1
    with pytest.raises(ValueError, match="non-empty dict"):
        iou_calibration(t, {})


# ---------------------------------------------------------------- references on pycocotools' matching
def coco_matches(gt_path, d, tau, max_dets=100):
    """Per class: list of (score, is_tp, iou) of non-ignored detections, from pycocotools' COCOeval at IoU tau."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(gt_path))
        cd = cg.loadRes(d.to_coco_results())
        ev = COCOeval(cg, cd, "bbox")
        ev.params.iouThrs = np.array([tau])
        ev.params.maxDets = [max_dets]
        ev.evaluate()
    boxes = {a["id"]: [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
             for a in cg.dataset["annotations"]}
    out, n_gt = {}, {}
    for a in cg.dataset["annotations"]:
        if not a["iscrowd"]:
            n_gt[a["category_id"]] = n_gt.get(a["category_id"], 0) + 1
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        for did, score, m, ig in zip(e["dtIds"], e["dtScores"], e["dtMatches"][0], e["dtIgnore"][0]):
            if ig:
                continue
            iou = box_iou(d.boxes[did - 1].double().tolist(), boxes[int(m)]) if m > 0 else 0.0
            out.setdefault(e["category_id"], []).append((score, m > 0, iou))
    return out, n_gt


def ref_laece(per_class, n_gt, num_bins=25):
    edges = np.linspace(0, 1, num_bins + 1)
    values = {}
    for c, dets in per_class.items():
        if not n_gt.get(c) or not dets:
            continue
        total = 0.0
        for j in range(num_bins):
            inside = [x for x in dets if edges[j] <= x[0] < edges[j + 1] or (j == num_bins - 1 and x[0] == 1.0)]
            if inside:
                mean_conf = sum(x[0] for x in inside) / len(inside)
                prec_iou = sum(x[2] for x in inside if x[1]) / len(inside)
                total += len(inside) / len(dets) * abs(mean_conf - prec_iou)
        values[c] = total
    return values


def ref_lrp(per_class, n_gt, tau, grid):
    out = {}
    for c, g in n_gt.items():
        dets = per_class.get(c, [])
        thresholds = sorted(grid) if grid is not None else sorted({x[0] for x in dets}) + [math.inf]
        rows = []
        for s in [-math.inf] + thresholds:
            kept = [x for x in dets if x[0] >= s]
            tp = sum(1 for x in kept if x[1])
            fp = len(kept) - tp
            loc = sum(1 - x[2] for x in kept if x[1])
            fn = g - tp
            rows.append((s, (loc / (1 - tau) + fp + fn) / (tp + fp + fn), loc / tp if tp else math.nan,
                         fp / (tp + fp) if tp + fp else math.nan, fn / g))
        best = min(rows[1:], key=lambda r: r[1])  # min() keeps the first (lowest threshold) of equal values
        out[c] = {"lrp": rows[0][1], "olrp": best[1], "loc": best[2], "fp": best[3], "fn": best[4], "s": best[0]}
    return out


@pytest.mark.parametrize("seed", [0, 3])
def test_laece_equals_plain_loop_on_pycocotools_matching(tmp_path, seed):
    gt_path = random_gt(tmp_path / "gt.json", seed=seed, num_images=12, crowd_frac=0.15)
    d = jitter_dets(gt_path, seed=seed + 1, per_gt=8, n_background=40, wrong_class_frac=0.2)
    for tau in (0.1, 0.5):
        per_class, n_gt = coco_matches(gt_path, d, tau)
        want = ref_laece(per_class, n_gt)
        got = laece(gt_path, d, tau=tau)
        assert set(got.per_class) == set(want)
        for c, v in want.items():
            assert got.per_class[c] == pytest.approx(v, abs=ATOL)
        assert got.value == pytest.approx(np.mean(list(want.values())), abs=ATOL)
        assert sum(got.diagram.count) == sum(len(v) for v in per_class.values())
    assert 0.0 < got.value < 1.0


@pytest.mark.parametrize("grid", ["coco", None])
def test_lrp_equals_plain_loop_on_pycocotools_matching(tmp_path, grid):
    gt_path = random_gt(tmp_path / "gt.json", seed=11, num_images=12, crowd_frac=0.15)
    d = jitter_dets(gt_path, seed=12, per_gt=8, n_background=40, wrong_class_frac=0.2, score_decimals=2)  # ties
    per_class, n_gt = coco_matches(gt_path, d, 0.5)
    want = ref_lrp(per_class, n_gt, 0.5, np.linspace(0, 1, 101).tolist() if grid == "coco" else None)
    got = lrp(gt_path, d, tau=0.5, score_thresholds=grid)
    cats = load_gt(gt_path).category_ids.tolist()
    assert set(got.per_class) == {c for c in cats if n_gt.get(c)}
    for c, w in want.items():
        g = got.per_class[c]
        for k in ("lrp", "olrp", "loc", "fp", "fn"):
            assert (math.isnan(g[k]) and math.isnan(w[k])) or g[k] == pytest.approx(w[k], abs=ATOL), (c, k)
        assert g["threshold"] == pytest.approx(w["s"], abs=0)
    assert got.olrp == pytest.approx(np.mean([w["olrp"] for w in want.values()]), abs=ATOL)
    assert got.olrp_loc == pytest.approx(np.nanmean([w["loc"] for w in want.values()]), abs=ATOL)
    assert got.olrp <= got.lrp


def test_lrp_and_laece_by_hand(tmp_path):
    images = [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100.0, "iscrowd": 0}]
    gt = write_gt(tmp_path / "g.json", images, anns, [1])
    d = make_dets([(1, [0, 0, 10, 8], 1, 0.9),      # TP, IoU 0.8
                   (1, [80, 80, 90, 90], 1, 0.6)])  # FP; the second object is missed
    r = lrp(gt, d)
    # all kept: TP 1 (loss 0.2 / 0.5), FP 1, FN 1 -> 2.4 / 3; optimum above 0.6: (0.4 + 1) / 2 = 0.7
    assert r.lrp == pytest.approx(0.8) and r.olrp == pytest.approx(0.7)
    assert (r.olrp_loc, r.olrp_fp, r.olrp_fn) == pytest.approx((0.2, 0.0, 0.5))
    assert r.per_class[1]["threshold"] == pytest.approx(0.61)  # the lowest grid point that drops the FP
    assert lrp(gt, d, score_thresholds=None).per_class[1]["threshold"] == pytest.approx(0.9)
    # LaECE: |0.9 - 0.8| and |0.6 - 0| with weight 1/2 each
    assert laece(gt, d).value == pytest.approx(0.35)
    assert laece(gt, Detections.empty()).per_class == {} and math.isnan(laece(gt, Detections.empty()).value)
    assert lrp(gt, Detections.empty()).olrp == 1.0


def test_report_markdown_and_errors(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=2)
    d = jitter_dets(gt_path, seed=3)
    scores = {"cls": d.scores, "iou": d.ious}
    rep = calibration_report(gt_path, d, scores)
    assert set(rep) == {"cls", "iou"}
    assert set(rep["iou"]) == {"reliability", "reliability_iou>0.5", "laece", "lrp"}
    json.dumps(rep, allow_nan=False)
    # the same numbers as the single functions, and a given true IoU changes nothing
    assert rep["iou"]["laece"]["value"] == pytest.approx(laece(gt_path, d, d.ious).value, abs=ATOL)
    assert rep["iou"]["lrp"]["olrp"] == pytest.approx(lrp(gt_path, d, d.ious).olrp, abs=ATOL)
    rep2 = calibration_report(gt_path, d, scores, true_iou=true_iou(gt_path, d))
    assert rep2["iou"]["reliability"]["ece"] == rep["iou"]["reliability"]["ece"]
    md = calibration_markdown({"greedy": rep})
    row = [line for line in md.splitlines() if line.startswith("| greedy | iou |")][0]
    assert row.split(" | ")[4] == f"{100 * rep['iou']['laece']['value']:.1f}"
    with pytest.raises(ValueError, match="tau must be < 1"):
        lrp(gt_path, d, tau=1.0)
    with pytest.raises(ValueError, match="tau must be an IoU in"):
        laece(gt_path, d, tau=-0.1)
    with pytest.raises(ValueError, match="'scores' must lie in"):
        laece(gt_path, d, scores=d.scores * 3)
    with pytest.raises(ValueError, match="score_thresholds must be"):
        lrp(gt_path, d, score_thresholds="all")


def test_analyze_arm_equals_the_separate_analyses(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=13, crowd_frac=0.2)
    d = jitter_dets(gt_path, seed=14, n_background=40)
    scores = {"reported": d.scores, "iou": d.ious}
    r = analyze_arm(gt_path, d, scores)
    assert [e.to_dict() for e in r["errors"]] == [e.to_dict() for e in error_breakdown(gt_path, d, (0.5, 0.75))]
    assert r["calibration"] == calibration_report(gt_path, d, scores)
    # more than max_dets detections in an image: the cap differs by score, the frame is rebuilt, results still equal
    many = Detections.concat([d] * 12)
    s2 = {"reported": many.scores, "iou": many.ious}
    r2 = analyze_arm(gt_path, many, s2, max_dets=100)
    assert r2["calibration"] == calibration_report(gt_path, many, s2)
    assert r2["errors"][0].to_dict() == error_breakdown(gt_path, many, 0.5)[0].to_dict()
