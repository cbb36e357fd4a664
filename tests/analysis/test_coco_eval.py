"""COCO AP: hand-computed golden cases, pycocotools == faster-coco-eval, caching, silence, errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from iouctl.analysis import AP_KEYS, ap_deltas, evaluate, load_gt
from iouctl.analysis import coco_eval as ce
from iouctl.analysis import groundtruth as gtmod
from iouctl.analysis.groundtruth import GroundTruthError
from iouctl.data.detections import Detections
from iouctl.errors import IouctlError

from .conftest import jitter_dets, random_gt, write_gt

BACKENDS = ["pycocotools", "faster-coco-eval"]
# Where the two backends may differ at all: pycocotools computes precision as tp / (tp + fp + np.spacing(1)),
# which differs from an exact tp / (tp + fp) only when tp + fp == 1 (by 2 ulp of 1.0 = 2.2e-16); the
# stats are means of such values, so 1e-12 is "identical to float rounding" with a wide margin.
STATS_ATOL = 1e-12


def dets(rows, with_ious=False):
    """rows: (image_id, [x1, y1, x2, y2], category_id, score)."""
    return Detections(
        torch.tensor([r[0] for r in rows], dtype=torch.int64),
        torch.tensor([r[1] for r in rows], dtype=torch.float64).reshape(-1, 4),
        torch.tensor([r[2] for r in rows], dtype=torch.int64),
        torch.tensor([r[3] for r in rows], dtype=torch.float64),
    )


def img(i, size=400):
    return {"id": i, "width": size, "height": size, "file_name": f"{i}.png"}


def ann(i, image_id, xywh, cat=1, crowd=0):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": list(map(float, xywh)),
        "area": float(xywh[2] * xywh[3]),
        "iscrowd": crowd,
    }


def all_keys_close(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0, atol=atol, err_msg=k)


# ---------------------------------------------------------------- golden values computed by hand
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_box_at_iou_072_counts_at_five_of_ten_thresholds(tmp_path, backend):
    gt = write_gt(tmp_path / "gt.json", [img(1)], [ann(1, 1, [0, 0, 10, 10])], [1])
    # det [0,0,10,7.2] lies inside the GT: IoU = 72 / 100 = 0.72, so it matches at 0.50..0.70 only.
    r = evaluate(gt, dets([(1, [0, 0, 10, 7.2], 1, 0.9)]), backend=backend)
    # pycocotools' tp / (tp + fp + eps) makes a precision of 1 come out as 1 - 1 ulp: compare within STATS_ATOL.
    np.testing.assert_allclose(r["ap_per_threshold"], [1.0] * 5 + [0.0] * 5, rtol=0, atol=STATS_ATOL)
    assert r["AP"] == pytest.approx(0.5, abs=STATS_ATOL)
    np.testing.assert_allclose(
        [r["AP50"], r["AP60"], r["AP70"], r["AP75"], r["AP80"], r["AP90"]],
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
        rtol=0,
        atol=STATS_ATOL,
    )
    # area 100 < 32^2: small. Medium/large slices have no GT: cocoeval's -1 (undefined), kept as such.
    assert r["AP_S"] == pytest.approx(0.5, abs=STATS_ATOL) and r["AP_M"] == -1 and r["AP_L"] == -1
    assert r["AR1"] == pytest.approx(0.5, abs=STATS_ATOL) and r["AR_M"] == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_tp_fp_tp_ranking_gives_the_101_point_interpolated_ap(tmp_path, backend):
    gt = write_gt(
        tmp_path / "gt.json", [img(1), img(2)], [ann(1, 1, [10, 10, 50, 50]), ann(2, 2, [100, 100, 60, 40])], [1]
    )
    r = evaluate(
        gt,
        dets(
            [
                (1, [10, 10, 60, 60], 1, 0.9),  # exact: TP at every threshold
                (2, [300, 300, 350, 350], 1, 0.8),  # far from everything: FP
                (2, [100, 100, 160, 140], 1, 0.7),  # exact: TP
            ]
        ),
        backend=backend,
    )
    # recall/precision after each rank: (0.5, 1), (0.5, 1/2), (1, 2/3). Interpolated precision is the max
    # precision at recall >= r: 1 for the 51 thresholds r in 0.00..0.50, 2/3 for the 50 in 0.51..1.00.
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    for k in ("AP", "AP50", "AP75", "AP90"):
        assert r[k] == pytest.approx(expected, abs=STATS_ATOL), k
    # maxDets counts per image and category: with one detection allowed, image 2 keeps only its FP.
    assert r["AR1"] == pytest.approx(0.5, abs=STATS_ATOL) and r["AR100"] == pytest.approx(1.0, abs=STATS_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_and_crowd_regions(tmp_path, backend):
    gt = write_gt(
        tmp_path / "gt.json",
        [img(1)],
        [
            ann(1, 1, [0, 0, 20, 20]),
            ann(2, 1, [50, 50, 60, 60], cat=2),
            ann(3, 1, [200, 200, 150, 150]),
            ann(4, 1, [0, 300, 100, 90], crowd=1),
        ],
        [1, 2],
    )
    r = evaluate(
        gt,
        dets(
            [
                (1, [0, 0, 20, 20], 1, 0.5),
                (1, [50, 50, 110, 110], 2, 0.6),
                (1, [200, 200, 350, 350], 1, 0.7),
                (1, [10, 310, 60, 380], 1, 0.99),  # inside the crowd region: ignored, not a false positive
            ]
        ),
        backend=backend,
    )
    for k in ce.STAT_KEYS + tuple(ce.SINGLE_THRESHOLD_KEYS):
        if k != "AR1":
            assert r[k] == pytest.approx(1.0, abs=STATS_ATOL), k
    # AR1 keeps one detection per image and category: for category 1 that is the crowd hit (0.99), which
    # recalls nothing; category 2's single box is found. Mean over categories: (0 + 1) / 2.
    assert r["AR1"] == pytest.approx(0.5, abs=STATS_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_score_zero_where_gt_exists(small_gt, backend):
    for res in (Detections.empty(), []):
        r = evaluate(small_gt, res, backend=backend)
        assert r["ap_per_threshold"] == [0.0] * 10
        assert all(r[k] in (0.0, -1.0) for k in ce.STAT_KEYS)
        assert r["AP"] == 0.0 and r["AR100"] == 0.0


# ---------------------------------------------------------------- the two backends agree
@pytest.mark.parametrize("seed, per_gt, decimals", [(0, 4, None), (1, 8, 1), (2, 30, 2), (3, 1, None), (4, 12, 0)])
def test_backends_identical_on_random_inputs(tmp_path, seed, per_gt, decimals):
    # Rounded scores create ties (both sort stably); per_gt=30 overflows maxDets=100 per image and category.
    gt = random_gt(tmp_path / "gt.json", seed=seed, num_images=10, max_per_image=8)
    d = jitter_dets(gt, seed=seed, per_gt=per_gt, score_decimals=decimals)
    a = evaluate(gt, d, backend="pycocotools")
    b = evaluate(gt, d, backend="faster-coco-eval")
    all_keys_close(a, b, STATS_ATOL)
    assert 0.0 < a["AP"] < 1.0  # a non-trivial case, not two zeros agreeing
    # Underneath: the same precision table up to the eps placement (see STATS_ATOL) and the same recall table.
    g = load_gt(gt)
    res = ce._results_list(g, d, None)
    ea, eb = ce._run_pycocotools(g, copy.deepcopy(res)), ce._run_faster(g, copy.deepcopy(res))
    assert ea.eval["precision"].shape == eb.eval["precision"].shape
    np.testing.assert_allclose(ea.eval["precision"], eb.eval["precision"], rtol=0, atol=4.5e-16)
    np.testing.assert_array_equal(ea.eval["recall"], eb.eval["recall"])


def test_derived_keys_are_consistent_with_the_precision_table(tmp_path):
    gt = random_gt(tmp_path / "gt.json", seed=5)
    r = evaluate(gt, jitter_dets(gt, seed=5))
    per = r["ap_per_threshold"]
    assert len(per) == 10
    assert (r["AP50"], r["AP60"], r["AP70"], r["AP75"], r["AP80"], r["AP90"]) == (
        per[0],
        per[2],
        per[4],
        per[5],
        per[6],
        per[8],
    )
    # -1 marks categories without GT at every threshold alike, so AP is the mean over thresholds.
    assert r["AP"] == pytest.approx(float(np.mean(per)), abs=1e-12)
    assert per == sorted(per, reverse=True)  # a stricter threshold never matches more


def test_scores_override_and_results_list_give_the_same_numbers(small_gt, tmp_path):
    d = jitter_dets(small_gt, seed=7)
    fused = (d.scores * d.ious).sqrt()
    via_override = evaluate(small_gt, d, scores=fused)
    path = d.export_coco_json(tmp_path / "res.json", scores=fused)
    results = json.loads(path.read_text())
    before = copy.deepcopy(results)
    assert evaluate(small_gt, results) == via_override
    assert results == before  # loadRes writes into result dicts; evaluate must hand it copies
    assert evaluate(small_gt, d) != via_override  # the override did change the ranking


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_print_nothing(small_gt, backend, capfd):
    gtmod.clear_gt_cache()
    evaluate(small_gt, jitter_dets(small_gt, seed=1), backend=backend)
    evaluate(small_gt, [], backend=backend)
    out, err = capfd.readouterr()  # file-descriptor level: catches C++ output too
    assert out == "" and err == ""


def test_ground_truth_is_parsed_once_per_file(small_gt, monkeypatch):
    gtmod.clear_gt_cache()
    calls = []
    real = gtmod.validate_coco_dict
    monkeypatch.setattr(gtmod, "validate_coco_dict", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    d = jitter_dets(small_gt, seed=2)
    for backend in BACKENDS * 3:
        evaluate(small_gt, d, backend=backend)
    assert len(calls) == 1
    assert load_gt(small_gt) is load_gt(str(small_gt))
    # A rewritten file (different size) is parsed again.
    data = json.loads(small_gt.read_text())
    data["images"].append({"id": 999, "file_name": "999.png", "width": 8, "height": 8})
    small_gt.write_text(json.dumps(data))
    assert 999 in load_gt(small_gt).image_ids.tolist()
    assert len(calls) == 2


def test_garbage_collector_state_is_restored(small_gt):
    import gc

    d = jitter_dets(small_gt, seed=1)
    evaluate(small_gt, d)
    assert gc.isenabled()
    with pytest.raises(GroundTruthError):  # raised while the collector is paused
        evaluate(small_gt, Detections(torch.tensor([999]), torch.zeros(1, 4), torch.tensor([2]), torch.ones(1)))
    assert gc.isenabled()
    gc.disable()
    try:
        evaluate(small_gt, d)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


# ---------------------------------------------------------------- errors: one clear line
def test_bad_inputs_raise_value_errors(small_gt, tmp_path):
    d = jitter_dets(small_gt, seed=3)
    with pytest.raises(ValueError, match="unknown backend 'coco'; valid: \\['faster-coco-eval', 'pycocotools'\\]"):
        evaluate(small_gt, d, backend="coco")
    bad_img = Detections(torch.tensor([999]), torch.zeros(1, 4), torch.tensor([2]), torch.ones(1))
    with pytest.raises(GroundTruthError, match="1 image id\\(s\\) absent from the ground truth, e.g. \\[999\\]"):
        evaluate(small_gt, bad_img)
    bad_cat = Detections(torch.tensor([3]), torch.zeros(1, 4), torch.tensor([0]), torch.ones(1))
    with pytest.raises(GroundTruthError, match="category id\\(s\\) absent .*COCO category ids \\[2, 5, 9\\]"):
        evaluate(small_gt, bad_cat)
    for bad in (
        {"image_id": 3, "bbox": [0, 0, 1, 1]},
        {"image_id": "3", "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1},
        {"image_id": 3, "category_id": 2, "bbox": [0, 0, 1], "score": 1},
    ):
        with pytest.raises(ValueError, match="result 0 is not a dict with int image_id, int category_id, bbox"):
            evaluate(small_gt, [bad])
    with pytest.raises(ValueError, match="'scores' is only valid with Detections"):
        evaluate(small_gt, [], scores=torch.zeros(0))
    with pytest.raises(GroundTruthError, match="ground-truth file not found"):
        evaluate(tmp_path / "absent.json", d)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d["annotations"][0].update(image_id=12345), "1 annotations pointing at an unknown image id"),
        (lambda d: d["annotations"][0].update(category_id=77), "1 annotations with an unknown category id"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 3]), "1 boxes with zero or negative width/height"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, "1", 3]), "1 annotations whose bbox is not 4 numbers"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "1 duplicate annotation ids"),
        (lambda d: d.pop("categories"), "missing top-level key 'categories'"),
        (lambda d: d["categories"].clear(), "'categories' is empty"),
    ],
)
def test_bad_ground_truth_is_named(small_gt, mutate, fragment):
    data = json.loads(small_gt.read_text())
    mutate(data)
    small_gt.write_text(json.dumps(data))
    with pytest.raises(GroundTruthError) as e:
        load_gt(small_gt)
    assert str(e.value).startswith(str(small_gt)) and fragment in str(e.value)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, IouctlError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_party_ground_truth_scores_like_the_complete_file(small_gt, backend, tmp_path):
    """Annotation ids from 0, no area, no iscrowd, no image width/height: accepted, and scored exactly like the
    complete file (area = w * h, iscrowd 0)."""
    data = json.loads(small_gt.read_text())
    for k, a in enumerate(data["annotations"]):
        a["id"], a["iscrowd"], a["area"] = k, 0, a["bbox"][2] * a["bbox"][3]
    full = write_gt(tmp_path / "full.json", data["images"], data["annotations"], [c["id"] for c in data["categories"]])
    for a in data["annotations"]:
        a.pop("area"), a.pop("iscrowd", None)
    for im in data["images"]:
        im.pop("width"), im.pop("height")
    bare = write_gt(tmp_path / "bare.json", data["images"], data["annotations"], [c["id"] for c in data["categories"]])
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [v + 0.5 for v in a["bbox"]],
            "score": 1.0 / (k + 1)} for k, a in enumerate(data["annotations"])]
    a, b = evaluate(full, res, backend=backend), evaluate(bare, res, backend=backend)
    assert a["AP"] > 0 and all(a[k] == b[k] for k in AP_KEYS)


def test_invalid_json_ground_truth(tmp_path):
    p = tmp_path / "gt.json"
    p.write_text("{")
    with pytest.raises(GroundTruthError, match="not valid JSON"):
        load_gt(p)


# ---------------------------------------------------------------- deltas
def test_ap_deltas():
    base = {"AP": 0.30, "AP50": 0.50, "AP_S": -1.0, "AR100": 0.4, "ap_per_threshold": [0.5, -1.0]}
    other = {"AP": 0.35, "AP50": 0.45, "AP_S": 0.2, "AR100": 0.9, "ap_per_threshold": [0.6, 0.1]}
    d = ap_deltas(base, other)
    assert set(d) == {"AP", "AP50", "AP_S", "ap_per_threshold"}  # AP keys only
    assert d["AP"] == pytest.approx(0.05) and d["AP50"] == pytest.approx(-0.05)
    assert math.isnan(d["AP_S"])  # undefined on one side: no fake difference
    assert d["ap_per_threshold"][0] == pytest.approx(0.1) and math.isnan(d["ap_per_threshold"][1])
    with pytest.raises(ValueError, match="no AP key in common"):
        ap_deltas({"AR1": 0.1}, {"AR1": 0.2})
