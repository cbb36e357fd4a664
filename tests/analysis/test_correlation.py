"""true_iou against plain loops and torchvision; correlations against plain-Python formulas."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision

from iouctl.analysis import correlation, correlations, true_iou
from iouctl.analysis.groundtruth import GroundTruthError
from iouctl.data.detections import Detections
from tests.box_loops import loop_iou

from .conftest import jitter_dets, random_gt

# true_iou works in float64 on float32-exact inputs; a plain float64 loop differs only by operation order.
IOU_ATOL = 1e-12


def plain_true_iou(gt_path, d: Detections) -> list[float]:
    data = json.loads(gt_path.read_text())
    out = []
    for i in range(len(d)):
        box = [float(v) for v in d.boxes[i]]
        best = 0.0
        for a in data["annotations"]:
            if a["iscrowd"] or a["image_id"] != int(d.image_ids[i]) or a["category_id"] != int(d.labels[i]):
                continue
            x, y, w, h = a["bbox"]
            best = max(best, loop_iou(box, [x, y, x + w, y + h]))
        out.append(best)
    return out


@pytest.mark.parametrize("seed, block", [(0, 1 << 16), (1, 1 << 16), (2, 1 << 16), (3, 7)])
def test_true_iou_matches_a_plain_loop(tmp_path, monkeypatch, seed, block):
    monkeypatch.setattr(correlation, "_BLOCK", block)  # 7: many blocks, pairs cut at block edges
    # crowd boxes, wrong-class and background detections, images with no GT, degenerate (zero-width) boxes.
    gt = random_gt(tmp_path / "gt.json", seed=seed, crowd_frac=0.3)
    d = jitter_dets(gt, seed=seed, per_gt=5, wrong_class_frac=0.3)
    a = next(a for a in json.loads(gt.read_text())["annotations"] if not a["iscrowd"])
    x, y, w, h = a["bbox"]
    degenerate = Detections(
        torch.tensor([a["image_id"]] * 3),
        torch.tensor([[x, y, x, y + h], [x, y, x, y], [x, y, x + w, y + h]]),
        torch.tensor([a["category_id"]] * 3),
        torch.ones(3),
        torch.ones(3),
    )
    d = Detections.concat([d, degenerate])
    got = true_iou(gt, d)
    assert got[-3:-1].tolist() == [0.0, 0.0] and got[-1] > 0.99  # zero-area boxes: IoU 0, not nan
    assert got.dtype == torch.float64 and got.shape == (len(d),)
    np.testing.assert_allclose(got.numpy(), plain_true_iou(gt, d), rtol=0, atol=IOU_ATOL)
    assert (got == 0).any() and (got > 0.5).any()  # both cases occur in this data


def test_true_iou_agrees_with_torchvision_box_iou_per_image_and_class(tmp_path):
    gt = random_gt(tmp_path / "gt.json", seed=4, crowd_frac=0.0)
    d = jitter_dets(gt, seed=4, per_gt=6, n_background=0, wrong_class_frac=0.0)
    data = json.loads(gt.read_text())
    got = true_iou(gt, d)
    for (img, cat), rows in _groups(d).items():
        g = torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in data["annotations"]
                if a["image_id"] == img and a["category_id"] == cat
            ],
            dtype=torch.float64,
        )
        ref = torchvision.ops.box_iou(d.boxes[rows].double(), g).amax(1)
        # box_iou gives nan for a zero-area box against a zero-area box; no such pairs here.
        torch.testing.assert_close(got[rows], ref, rtol=0, atol=IOU_ATOL)


def _groups(d):
    out: dict = {}
    for i, key in enumerate(zip(d.image_ids.tolist(), d.labels.tolist())):
        out.setdefault(key, []).append(i)
    return {k: torch.tensor(v) for k, v in out.items()}


def test_true_iou_edge_cases(small_gt):
    assert true_iou(small_gt, Detections.empty()).shape == (0,)
    with pytest.raises(GroundTruthError, match="image id\\(s\\) absent"):
        true_iou(small_gt, Detections(torch.tensor([1]), torch.zeros(1, 4), torch.tensor([2]), torch.ones(1)))


# ---------------------------------------------------------------- correlations
def plain_pearson(x, y) -> float:
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def average_ranks(x) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share the mean rank
        i = j + 1
    return ranks


def plain_kendall_tau_b(x, y) -> float:
    conc = disc = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tx += 1
        elif dy == 0:
            ty += 1
        elif (dx > 0) == (dy > 0):
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tx) * (conc + disc + ty))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_plain_formulas(seed):
    rng = np.random.default_rng(seed)
    t = rng.random(60)
    cls = np.round(0.3 * t + rng.random(60), 1)  # rounded: ties exercise tau-b and average ranks
    iou = t + 0.05 * rng.normal(size=60)
    got = correlations(torch.tensor(t), {"cls": torch.tensor(cls, dtype=torch.float32), "iou": torch.tensor(iou)})
    assert set(got) == {"cls", "iou"}
    for name, v in (("cls", torch.tensor(cls, dtype=torch.float32).double().numpy()), ("iou", iou)):
        x, y = t.tolist(), v.tolist()
        # float64 sums over 60 values: agreement to ~1e-15; 1e-12 leaves room for summation order.
        assert got[name]["pearson"] == pytest.approx(plain_pearson(x, y), abs=1e-12)
        assert got[name]["spearman"] == pytest.approx(plain_pearson(average_ranks(x), average_ranks(y)), abs=1e-12)
        assert got[name]["kendall"] == pytest.approx(plain_kendall_tau_b(x, y), abs=1e-12)
    assert got["iou"]["pearson"] > 0.9 > got["cls"]["pearson"]


def test_correlations_degenerate_inputs_give_nan_without_warnings():
    t = torch.tensor([0.1, 0.5, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        got = correlations(t, {"const": torch.full((3,), 0.7), "ok": torch.tensor([0.2, 0.1, 0.3])})
        one = correlations(torch.tensor([0.5]), {"s": torch.tensor([0.5])})
        empty = correlations(torch.zeros(0), {"s": torch.zeros(0)})
        const_t = correlations(torch.full((4,), 0.5), {"s": torch.rand(4)})
    assert all(math.isnan(v) for v in got["const"].values())
    assert not any(math.isnan(v) for v in got["ok"].values())
    for r in (one["s"], empty["s"], const_t["s"]):
        assert all(math.isnan(v) for v in r.values())


def test_correlations_bad_input():
    with pytest.raises(ValueError, match="'s' must be 1-d of length 3, got shape \\[2\\]"):
        correlations(torch.rand(3), {"s": torch.rand(2)})
    with pytest.raises(ValueError, match="'s' has non-finite values"):
        correlations(torch.rand(2), {"s": torch.tensor([0.1, float("nan")])})
    with pytest.raises(ValueError, match="non-empty dict"):
        correlations(torch.rand(2), {})


def test_matched_correlations_use_only_boxes_above_iou_half():
    from iouctl.analysis import matched_correlations

    g = torch.Generator().manual_seed(0)
    t = torch.rand(400, generator=g, dtype=torch.float64)
    s = {"a": t + 0.1 * torch.rand(400, generator=g, dtype=torch.float64), "b": torch.rand(400, generator=g)}
    got = matched_correlations(t, s)
    keep = t > 0.5
    expect = correlations(t[keep], {k: v[keep] for k, v in s.items()})
    assert got == expect and got["a"]["pearson"] > 0.9
