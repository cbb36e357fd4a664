"""TIDE error breakdown: a hand-made scene with one error of each type, a plain-loop reference of the definitions,
cocoeval's AP50/AP75, and tidecv itself (when installed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from iouctl.analysis import (
    AP_KEYS, ERROR_TYPES, coco_ap, error_breakdown, errors_markdown, evaluate, load_gt, match_detections,
)
from iouctl.analysis import errors as errmod
from iouctl.analysis.groundtruth import GroundTruthError
from iouctl.data.detections import Detections

from tests.box_loops import loop_iou as box_iou

from .conftest import jitter_dets, make_dets, random_gt, write_gt

# AP values are means of float64 precisions; two correct implementations differ only by summation order (~1e-16).
AP_ATOL = 1e-12
RECALL = np.linspace(0.0, 1.0, 101)


def ann(i, image_id, xyxy, cat, crowd=0):
    x1, y1, x2, y2 = xyxy
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float((x2 - x1) * (y2 - y1)), "iscrowd": crowd}


# ---------------------------------------------------------------- a scene with one error of each type
@pytest.fixture
def scene(tmp_path):
    images = [{"id": 7, "width": 100, "height": 100, "file_name": "7.png"}]
    anns = [ann(1, 7, [0, 0, 10, 10], 1),      # A: found
            ann(2, 7, [20, 0, 30, 10], 2),     # B: found with the wrong class (cls error)
            ann(3, 7, [50, 50, 60, 60], 2),    # C: nothing near it (miss)
            ann(4, 7, [0, 20, 10, 30], 1)]     # D: found with a poor box (loc error)
    gt = write_gt(tmp_path / "scene.json", images, anns, [1, 2])
    d = make_dets([
        (7, [0, 0, 10, 10], 1, 0.9),    # TP on A
        (7, [0, 0, 10, 9], 1, 0.8),     # IoU 0.9 with A, already matched: dupe
        (7, [20, 0, 30, 10], 1, 0.7),   # IoU 1 with B of class 2: cls
        (7, [0, 20, 10, 24], 1, 0.6),   # IoU 0.4 with D: loc
        (7, [80, 80, 90, 90], 1, 0.5),  # nothing: bkg
        (7, [24, 0, 36, 10], 1, 0.4),   # IoU 0.375 with B (other class): both
    ])
    return gt, d


def test_scene_types_counts_and_dap_by_hand(scene):
    gt, d = scene
    for b in error_breakdown(gt, d, (0.5, 0.75)):
        assert b.counts == {"cls": 1, "loc": 1, "both": 1, "dupe": 1, "bkg": 1, "miss": 1}
        assert (b.num_tp, b.num_detections, b.num_gt) == (1, 6, 4)
        # Class 1: one TP of 2 ground truths ranked first -> precision 1 up to recall 0.5 (51 of 101 points);
        # class 2: nothing -> 0. mAP = 51 / 202.
        assert b.ap == pytest.approx(51 / 202, abs=AP_ATOL)
        # cls fixed: the box becomes class 2's TP on B -> both classes 51 / 101.
        assert b.dap["cls"] == pytest.approx(51 / 101 - 51 / 202, abs=AP_ATOL)
        # loc fixed: class 1 gets its 2nd TP at rank 4 (precision 2/4) -> (51 + 50 * 0.5) / 101 over 2 classes.
        assert b.dap["loc"] == pytest.approx(76 / 202 - 51 / 202, abs=AP_ATOL)
        # The FPs rank below class 1's only TP and class 2 has no detection: removing them gains nothing, and
        # removing C leaves class 2 at AP 0.
        for k in ("both", "dupe", "bkg", "miss"):
            assert b.dap[k] == pytest.approx(0.0, abs=AP_ATOL)
        assert b.special_dap["fp"] == pytest.approx(0.0, abs=AP_ATOL)
        # FN removed: class 1 keeps A only (AP 1); class 2 keeps no ground truth and no detection: out of the mean.
        assert b.special_dap["fn"] == pytest.approx(1.0 - 51 / 202, abs=AP_ATOL)


def test_scene_loc_error_on_a_used_ground_truth_is_removed_not_promoted(scene, tmp_path):
    gt, d = scene
    # A second box at IoU 0.4 with A (already matched) is a loc error that cannot claim A: fixing loc removes it.
    extra = make_dets([(7, [0, 0, 10, 4], 1, 0.85)])
    both = Detections.concat([d, extra])
    b = error_breakdown(gt, both, 0.5)[0]
    assert b.counts["loc"] == 2
    # class 1 ranks: TP .9, loc-on-A .85, dupe .8, cls .7, loc-on-D .6 ...: fixing loc removes .85 and
    # promotes .6 (3rd of the remaining: TP, FP, FP, TP -> precision 2/4 at recall 1).
    assert b.dap["loc"] == pytest.approx(76 / 202 - 51 / 202, abs=AP_ATOL)


# ---------------------------------------------------------------- plain-loop reference of the definitions
def ref_class_ap(items, n_gt):
    """items: list of (sort key, is_tp) of one class; cocoeval's 101-point interpolated AP."""
    if n_gt == 0:
        return 0.0
    items = sorted(items, key=lambda x: x[0])
    tp = fp = 0
    rc, pr = [], []
    for _, is_tp in items:
        tp, fp = tp + is_tp, fp + (not is_tp)
        rc.append(tp / n_gt)
        pr.append(tp / (tp + fp + np.spacing(1)))
    for i in range(len(pr) - 1, 0, -1):
        pr[i - 1] = max(pr[i - 1], pr[i])
    total = 0.0
    for r in RECALL:
        for i in range(len(rc)):
            if rc[i] >= r:
                total += pr[i]
                break
    return total / len(RECALL)


def ref_map(entries, n_gt, had_gt):
    """entries: list of (class, sort key, is_tp); a class counts if it had ground truth and still has some or has
    detections."""
    aps = []
    for c in had_gt:
        items = [(k, t) for cc, k, t in entries if cc == c]
        if n_gt.get(c, 0) == 0 and not items:
            continue
        aps.append(ref_class_ap(items, n_gt.get(c, 0)))
    return sum(aps) / len(aps)


def ref_tide(gt_path, dets, t, bg=0.1, max_dets=100):
    data = json.loads(gt_path.read_text())
    gts = [dict(a, xyxy=[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
           for a in data["annotations"]]
    normal = [g for g in gts if not g["iscrowd"]]
    crowd = [g for g in gts if g["iscrowd"]]
    rows = [{"row": i, "image": int(dets.image_ids[i]), "cat": int(dets.labels[i]), "score": float(dets.scores[i]),
             "box": dets.boxes[i].double().tolist()} for i in range(len(dets))]
    images = sorted({im["id"] for im in data["images"]})
    preds = []
    for im in images:
        mine = sorted([r for r in rows if r["image"] == im], key=lambda r: (-r["score"], r["row"]))[:max_dets]
        used = set()
        for r in mine:
            best, best_g = -1.0, None
            for g in normal:
                if g["image_id"] == im and g["category_id"] == r["cat"] and g["id"] not in used:
                    v = box_iou(r["box"], g["xyxy"])
                    if v > best:
                        best, best_g = v, g
            r["tp"] = best >= t
            if r["tp"]:
                used.add(best_g["id"])
            r["ignored"] = False
            if not r["tp"]:
                for g in crowd:
                    if g["image_id"] == im and g["category_id"] == r["cat"]:
                        b, c = r["box"], g["xyxy"]
                        iw = max(0.0, min(b[2], c[2]) - max(b[0], c[0]))
                        inter = iw * max(0.0, min(b[3], c[3]) - max(b[1], c[1]))
                        area = (b[2] - b[0]) * (b[3] - b[1])
                        if area > 0 and inter / area >= t:
                            r["ignored"] = True
        for r in mine:
            r["used_gt"] = set(used)
        preds += mine
    used_all = set().union(*[r["used_gt"] for r in preds]) if preds else set()
    counts = dict.fromkeys(ERROR_TYPES, 0)
    for r in preds:
        r["type"] = None
        if r["tp"] or r["ignored"]:
            continue
        img_g = [g for g in normal if g["image_id"] == r["image"]]
        if not img_g:
            r["type"] = "bkg"
        else:
            same = [(box_iou(r["box"], g["xyxy"]), g) for g in img_g if g["category_id"] == r["cat"]]
            other = [(box_iou(r["box"], g["xyxy"]), g) for g in img_g if g["category_id"] != r["cat"]]
            m1 = max(same, key=lambda x: x[0], default=(-1.0, None))  # max() keeps the first of equal keys
            m2 = max(other, key=lambda x: x[0], default=(-1.0, None))
            m3 = max([v for v, g in same if g["id"] in used_all], default=-1.0)
            m4 = max(box_iou(r["box"], g["xyxy"]) for g in img_g)
            if bg <= m1[0] <= t:
                r["type"], r["target"] = "loc", m1[1]
            elif m2[0] >= t:
                r["type"], r["target"] = "cls", m2[1]
            elif m3 >= t:
                r["type"] = "dupe"
            elif m4 <= bg:
                r["type"] = "bkg"
            else:
                r["type"] = "both"
        counts[r["type"]] += 1
    # loc / cls errors on unused ground truth: the best-scored one claims it (first on ties).
    best_for = {}
    for r in preds:
        if r["type"] in ("loc", "cls") and r["target"]["id"] not in used_all:
            gid = r["target"]["id"]
            if gid not in best_for or r["score"] > best_for[gid]["score"]:
                best_for[gid] = r
    missed = [g for g in normal if g["id"] not in used_all and g["id"] not in best_for]
    counts["miss"] = len(missed)
    n_gt = {}
    for g in normal:
        n_gt[g["category_id"]] = n_gt.get(g["category_id"], 0) + 1
    had = sorted(n_gt)
    key = {id(r): (-r["score"], images.index(r["image"]), r["row"]) for r in preds}

    def entries(fix=None):
        out = []
        for r in preds:
            if r["ignored"]:
                continue
            if r["type"] is not None and r["type"] == fix:
                if fix in ("loc", "cls") and best_for.get(r["target"]["id"]) is r:
                    out.append((r["target"]["category_id"], key[id(r)], True))
                continue
            if fix == "fp" and not r["tp"]:
                continue
            out.append((r["cat"], key[id(r)], r["tp"]))
        return out

    base = ref_map(entries(), n_gt, had)
    dap = {k: ref_map(entries(k), n_gt, had) - base for k in ("cls", "loc", "both", "dupe", "bkg")}
    fewer = dict(n_gt)
    for g in missed:
        fewer[g["category_id"]] -= 1
    dap["miss"] = ref_map(entries(), fewer, had) - base
    tp_only = {c: sum(1 for r in preds if r["tp"] and r["cat"] == c) for c in had}
    special = {"fp": ref_map(entries("fp"), n_gt, had) - base, "fn": ref_map(entries(), tp_only, had) - base}
    return base, dap, special, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_plain_loop_reference(tmp_path, seed):
    gt_path = random_gt(tmp_path / "gt.json", seed=seed, num_images=10, crowd_frac=0.15)
    d = jitter_dets(gt_path, seed=seed + 10, per_gt=6, n_background=25, wrong_class_frac=0.2)
    for b in error_breakdown(gt_path, d, (0.5, 0.75)):
        base, dap, special, counts = ref_tide(gt_path, d, b.iou_threshold)
        assert b.counts == counts
        assert b.ap == pytest.approx(base, abs=AP_ATOL)
        for k in ERROR_TYPES:
            assert b.dap[k] == pytest.approx(dap[k], abs=AP_ATOL), k
            assert b.dap[k] >= -AP_ATOL  # a fix never lowers AP
        for k in ("fp", "fn"):
            assert b.special_dap[k] == pytest.approx(special[k], abs=AP_ATOL), k
        assert sum(counts.values()) - counts["miss"] + b.num_tp + b.num_ignored == b.num_detections
    # the cases exercised are not trivial
    b = error_breakdown(gt_path, d, 0.5)[0]
    assert sum(v > 0 for v in b.counts.values()) >= 4 and b.dap["loc"] > 0


def test_ap_equals_cocoeval_ap50_ap75_with_crowd_regions(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=5, num_images=15, crowd_frac=0.2)
    d = jitter_dets(gt_path, seed=6, per_gt=10, n_background=40)
    g = load_gt(gt_path)
    m = evaluate(g, d.top_k_per_image(100), backend="pycocotools")
    b50, b75 = error_breakdown(g, d.top_k_per_image(100), (0.5, 0.75))
    assert b50.ap == pytest.approx(m["AP50"], abs=AP_ATOL)
    assert b75.ap == pytest.approx(m["AP75"], abs=AP_ATOL)
    assert b50.num_ignored > 0  # crowd regions were hit
    # a ranking score other than the stored one
    s = torch.rand(len(d), generator=torch.Generator().manual_seed(0))
    m2 = evaluate(g, d, backend="pycocotools", scores=s)
    assert error_breakdown(g, d, 0.5, scores=s)[0].ap == pytest.approx(m2["AP50"], abs=AP_ATOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_ap_equals_pycocotools(tmp_path, seed):
    gt_path = random_gt(tmp_path / "gt.json", seed=seed + 20, num_images=15, crowd_frac=0.2)
    d = jitter_dets(gt_path, seed=seed + 21, per_gt=10, n_background=40, score_decimals=2)  # ties too
    g = load_gt(gt_path)
    many = Detections.concat([d] * 8)  # > 100 per image and class: cocoeval's maxDets cap applies
    for dd in (d, many, Detections.empty()):
        want = evaluate(g, dd, backend="pycocotools")
        got = coco_ap(g, dd)
        assert set(got) == {k for k in AP_KEYS if not k.startswith("AP_")} | {"ap_per_threshold"}
        for k, v in got.items():
            np.testing.assert_allclose(v, want[k], rtol=0, atol=AP_ATOL, err_msg=k)
    assert coco_ap(g, d)["AP"] > 0.1


def test_matching_equals_pycocotools_per_detection(tmp_path):
    """match_detections' TP / ignored flags equal cocoeval's dtMatches / dtIgnore, detection by detection."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path = random_gt(tmp_path / "gt.json", seed=8, num_images=10, crowd_frac=0.2)
    d = jitter_dets(gt_path, seed=9, per_gt=8, n_background=30)
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(gt_path))
        cd = cg.loadRes(d.to_coco_results())  # result i gets id i + 1
        for t in (0.1, 0.5, 0.75):
            ev = COCOeval(cg, cd, "bbox")
            ev.params.iouThrs = np.array([t])
            ev.evaluate()
            tp = np.zeros(len(d), bool)
            ign = np.zeros(len(d), bool)
            for e in ev.evalImgs:
                if e is None or e["aRng"] != ev.params.areaRng[0]:
                    continue
                for did, m, ig in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
                    tp[did - 1] |= bool(m > 0) and not ig
                    ign[did - 1] |= bool(ig)
            got = match_detections(gt_path, d, t)
            np.testing.assert_array_equal(got["tp"], tp)
            np.testing.assert_array_equal(got["ignored"], ign)
            assert got["evaluated"].all()
            # matched IoU: against the matched ground-truth box
            g = load_gt(gt_path)
            i = np.flatnonzero(got["tp"])
            want = [box_iou(d.boxes[k].double().tolist(), g.boxes[got["gt_index"][k]].tolist()) for k in i]
            np.testing.assert_allclose(got["iou"][i], want, rtol=0, atol=1e-12)
            assert (got["iou"][i] >= t).all()


def test_tidecv_agrees(tmp_path, monkeypatch):
    """Same counts and dAPs as tidecv 1.0.1 once its recall grid is used: tidecv builds its 101 recall points as
    x / 100, cocoeval (and this module) as np.linspace(0, 1, 101); they differ in the last bit at some points,
    enough to move an AP by ~1e-4 when a recall lands exactly on one (see docs/benchmarks.md)."""
    pytest.importorskip("tidecv")
    from tidecv import TIDE, Data
    from tidecv.errors import main_errors as me

    gt_path = random_gt(tmp_path / "gt.json", seed=3, num_images=14, crowd_frac=0.0)
    d = jitter_dets(gt_path, seed=4, per_gt=8, n_background=30, wrong_class_frac=0.2)
    data = json.loads(gt_path.read_text())
    assert {a["category_id"] for a in data["annotations"]} == {c["id"] for c in data["categories"]}
    names = {me.ClassError: "cls", me.BoxError: "loc", me.OtherError: "both", me.DuplicateError: "dupe",
             me.BackgroundError: "bkg", me.MissedError: "miss"}
    monkeypatch.setattr(errmod, "RECALL_THRESHOLDS", np.array([x / 100 for x in range(101)]))
    for b in error_breakdown(gt_path, d, (0.5, 0.75)):
        g, p = Data("gt"), Data("dets")
        for im in data["images"]:
            g.add_image(im["id"], str(im["id"]))  # images without annotations too (see the module docstring)
        for a in data["annotations"]:
            g.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
        for r in d.to_coco_results():
            p.add_detection(r["image_id"], r["category_id"], r["score"], r["bbox"])
        run = TIDE().evaluate(g, p, pos_threshold=b.iou_threshold, mode=TIDE.BOX)
        assert b.ap == pytest.approx(run.ap / 100, abs=1e-12)
        counts = run.count_errors()
        for err, v in run.fix_main_errors().items():
            k = names[err]
            assert b.counts[k] == counts[err], k
            assert max(b.dap[k], 0.0) == pytest.approx(v / 100, abs=1e-12), k  # tidecv clamps at 0
        special = {("fp" if "Pos" in e.short_name else "fn"): v for e, v in run.fix_special_errors().items()}
        for k in ("fp", "fn"):
            assert b.special_dap[k] == pytest.approx(special[k] / 100, abs=1e-12), k


def test_empty_detections_miss_everything(tmp_path):
    gt_path = random_gt(tmp_path / "gt.json", seed=1)
    n = len(load_gt(gt_path).keys)
    b = error_breakdown(gt_path, Detections.empty(), 0.5)[0]
    assert b.ap == 0.0 and b.counts["miss"] == n and b.num_detections == 0
    # every class loses its ground truth and has no detection: no AP left to average (tidecv divides by zero)
    assert math.isnan(b.dap["miss"]) and math.isnan(b.special_dap["fn"])
    assert b.dap["bkg"] == 0.0 and json.loads(json.dumps(b.to_dict(), allow_nan=False))["dap"]["miss"] is None


def test_max_dets_keeps_the_best_of_each_image(tmp_path):
    images = [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}]
    gt = write_gt(tmp_path / "g.json", images, [ann(1, 1, [0, 0, 10, 10], 1)], [1])
    rows = [(1, [50, 50, 60, 60], 1, 0.5 + i / 1000) for i in range(100)] + [(1, [0, 0, 10, 10], 1, 0.1)]
    d = make_dets(rows)
    capped = error_breakdown(gt, d, 0.5, max_dets=100)[0]
    assert capped.num_detections == 100 and capped.num_tp == 0 and capped.counts["miss"] == 1
    full = error_breakdown(gt, d, 0.5, max_dets=101)[0]
    # the TP ranks last of 101: precision 1/101 at every recall point
    assert full.num_tp == 1 and full.ap == pytest.approx(1 / 101, abs=AP_ATOL)


def test_markdown_and_json(scene):
    gt, d = scene
    res = {"arm a": error_breakdown(gt, d, (0.5, 0.75)), "arm b": error_breakdown(gt, d, (0.5, 0.75))}
    md = errors_markdown(res)
    assert md.count("| arm a | 25.2 | 25.25 (1) | 12.38 (1) | 0.00 (1) |") == 2  # 51/202 and the dAPs, both tables
    assert "| arm | AP50 |" in md and "| arm | AP75 |" in md
    js = json.loads(json.dumps([b.to_dict() for b in res["arm a"]], allow_nan=False))
    assert js[0]["counts"]["miss"] == 1 and js[1]["iou_threshold"] == 0.75
    assert errors_markdown({"arm a": js, "arm b": res["arm b"]}) == md  # the JSON form renders the same


def test_bad_arguments(tmp_path, scene):
    gt, d = scene
    with pytest.raises(ValueError, match=r"iou_thresholds must be .* in \(0, 1\]"):
        error_breakdown(gt, d, (0.5, 1.5))
    with pytest.raises(ValueError, match="background_threshold must be in"):
        error_breakdown(gt, d, 0.5, background_threshold=0.5)
    with pytest.raises(ValueError, match="max_dets must be an integer >= 1"):
        error_breakdown(gt, d, 0.5, max_dets=0)
    bad = make_dets([(99, [0, 0, 1, 1], 1, 0.5)])
    with pytest.raises(GroundTruthError, match=r"image id\(s\) absent"):
        error_breakdown(gt, bad)
    with pytest.raises(ValueError, match="scores must be a float Tensor"):
        error_breakdown(gt, d, scores=torch.ones(2))
    assert math.isclose(error_breakdown(gt, d, 0.5)[0].background_threshold, 0.1)
