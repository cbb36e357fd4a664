"""Plots: valid PNGs of the promised size that show exactly the data given (read back from the artists)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from iouctl.analysis import ERROR_TYPES as ERRORS
from iouctl.analysis import IOU_THRESHOLDS, plot_ap_vs_threshold, plot_score_vs_iou
from iouctl.analysis.plots import DPI, PANEL_INCHES


def png_shape(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape  # (height, width, channels): decodes the whole image


def test_score_vs_iou_draws_all_points_when_small(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(500, generator=g, dtype=torch.float64)
    scores = {"cls": torch.rand(500, generator=g), "iou": (t + 0.05 * torch.randn(500, generator=g)).float()}
    out = plot_score_vs_iou(t, scores, tmp_path / "plots" / "score_vs_iou.png", kind="scatter")
    w, h = int(PANEL_INCHES * DPI * 2), int(PANEL_INCHES * DPI)
    assert out["size"] == (w, h)
    assert png_shape(out["path"])[:2] == (h, w)
    assert list(out["panels"]) == ["cls", "iou"]
    for name, s in scores.items():
        p = out["panels"][name]
        # The artist's offsets are the input, point for point (float32 scores widen exactly to float64).
        np.testing.assert_array_equal(p["x"], t.numpy())
        np.testing.assert_array_equal(p["y"], s.double().numpy())
        r = np.corrcoef(t.numpy(), s.double().numpy())[0, 1]
        assert p["pearson"] == pytest.approx(r, abs=1e-12)
        assert p["title"] == f"{name}: Pearson r = {r:.3f}"
    assert out["panels"]["iou"]["pearson"] > 0.9 > out["panels"]["cls"]["pearson"]


def test_score_vs_iou_subsamples_big_inputs_consistently(tmp_path):
    n = 5000
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    s = {"a": t.flip(0).float(), "b": (t * t).float()}
    out = plot_score_vs_iou(t, s, tmp_path / "big.png", max_points=300, seed=3, kind="scatter")
    idx = out["index"]
    assert len(idx) == 300 and len(set(idx.tolist())) == 300 and (np.diff(idx) > 0).all()
    for name in s:
        np.testing.assert_array_equal(out["panels"][name]["x"], t.numpy()[idx])
        np.testing.assert_array_equal(out["panels"][name]["y"], s[name].double().numpy()[idx])
    # Pearson in the title uses all n points, not the subsample.
    assert out["panels"]["a"]["pearson"] == pytest.approx(-1.0, abs=1e-12)
    again = plot_score_vs_iou(t, s, tmp_path / "big2.png", max_points=300, seed=3, kind="scatter")
    np.testing.assert_array_equal(again["index"], idx)  # seeded


def test_score_vs_iou_constant_score_and_errors(tmp_path):
    out = plot_score_vs_iou(torch.rand(10), {"c": torch.ones(10)}, tmp_path / "c.png")
    assert math.isnan(out["panels"]["c"]["pearson"]) and out["panels"]["c"]["title"] == "c: Pearson r = n/a"
    with pytest.raises(ValueError, match="'c' must be 1-d of length 10"):
        plot_score_vs_iou(torch.rand(10), {"c": torch.ones(9)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_score_vs_iou(torch.rand(10), {}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ap_vs_threshold_lines_equal_the_curves(tmp_path):
    curves = {
        "greedy": list(np.linspace(0.6, 0.05, 10)),
        "iou-guided": [0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.2, 0.1, -1.0, 0.0],
    }
    out = plot_ap_vs_threshold(curves, tmp_path / "ap.png")
    assert out["size"] == (790, 400) and png_shape(out["path"])[:2] == (400, 790)  # 6 in + one legend column
    assert list(out["lines"]) == ["greedy", "iou-guided"]
    for name, ys in curves.items():
        np.testing.assert_array_equal(out["lines"][name]["x"], np.asarray(IOU_THRESHOLDS))
        want = np.where(np.asarray(ys) == -1, np.nan, ys)  # undefined AP drawn as a gap
        np.testing.assert_array_equal(out["lines"][name]["y"], want)
    with pytest.raises(ValueError, match="curve 'x' must hold 10 finite values"):
        plot_ap_vs_threshold({"x": [0.1, 0.2]}, tmp_path / "bad.png")
    grid = {f"arm{i}": list(np.linspace(0.9, 0.1, 10) - i / 100) for i in range(25)}  # an ablation grid
    out = plot_ap_vs_threshold(grid, tmp_path / "grid.png")
    assert out["size"] == (980, 400) and len(out["lines"]) == 25  # the legend takes two columns beside the axes
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_ap_vs_threshold({}, tmp_path / "bad.png")


def test_iou_before_after_draws_the_pairs_and_counts(tmp_path):
    from iouctl.analysis import plot_iou_before_after

    before = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    after = torch.tensor([0.55, 0.6, 0.65, 0.9], dtype=torch.float64)
    out = plot_iou_before_after(before, after, tmp_path / "p.png", kind="scatter")
    np.testing.assert_array_equal(out["x"], before.numpy())
    np.testing.assert_array_equal(out["y"], after.numpy())
    assert (out["improved"], out["worse"]) == (2, 1)
    assert imread(out["path"]).shape[:2] == (out["size"][1], out["size"][0])
    big = torch.rand(30000, dtype=torch.float64)
    out = plot_iou_before_after(big, big + 0.01, tmp_path / "q.png", max_points=1000, kind="scatter")
    assert len(out["x"]) == 1000 and out["improved"] == 30000
    dense = plot_iou_before_after(big, big + 0.01, tmp_path / "d.png", max_points=1000)  # hexbin: every box
    assert dense["counts"].sum() == 30000 and len(dense["x"]) == 30000 and dense["improved"] == 30000
    with pytest.raises(ValueError, match="after"):
        plot_iou_before_after(before, after[:2], tmp_path / "r.png")


def test_score_vs_iou_hexbin_counts_every_box(tmp_path):
    g = torch.Generator().manual_seed(1)
    n = 30000
    t = torch.rand(n, generator=g, dtype=torch.float64)
    scores = {"iou": (t + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0, 1), "cls": torch.rand(n)}
    out = plot_score_vs_iou(t, scores, tmp_path / "hex.png", max_points=300, gridsize=30)
    assert png_shape(out["path"])[:2] == (out["size"][1], out["size"][0])
    for name, s in scores.items():
        p = out["panels"][name]
        assert p["counts"].sum() == n and len(p["x"]) == n  # no subsampling: density of all boxes
        assert (p["counts"] >= 1).all()  # empty hexagons are not drawn
        # the count-weighted centre of the hexagons is the data's mean, to within a hexagon (1.04 / 30 wide)
        centre = (p["centers"] * p["counts"][:, None]).sum(0) / n
        assert abs(centre[0] - t.mean().item()) < 1.04 / 30
        assert abs(centre[1] - s.double().mean().item()) < 1.04 / 30
    assert out["panels"]["iou"]["pearson"] > 0.9
    with pytest.raises(ValueError, match="kind must be one of"):
        plot_score_vs_iou(t, scores, tmp_path / "x.png", kind="violin")


GRID = {"base": [0.60, 0.55, 0.50, 0.45, 0.40, 0.30, 0.20, 0.10, 0.05, 0.01],
        "good": [0.61, 0.57, 0.53, 0.49, 0.45, 0.36, 0.27, 0.16, 0.09, 0.03],
        "bad": [0.50, 0.45, 0.40, 0.35, 0.30, 0.20, 0.10, 0.05, 0.02, 0.00],
        "gap": [0.60, 0.55, 0.50, 0.45, 0.40, 0.30, 0.20, 0.10, -1.0, 0.01],
        **{f"arm{i}": list(np.linspace(0.6, 0.0, 10) + i / 1000) for i in range(20)}}


def test_ap_deltas_lines_are_the_differences(tmp_path):
    from iouctl.analysis import plot_ap_deltas

    out = plot_ap_deltas(GRID, "base", tmp_path / "d.png", highlight=3)
    assert png_shape(out["path"])[:2] == (out["size"][1], out["size"][0]) == (420, 860)
    base = np.asarray(GRID["base"])
    assert set(out["lines"]) == set(GRID) - {"base"}
    for name, ys in GRID.items():
        if name == "base":
            continue
        want = 100 * (np.where(np.asarray(ys) == -1, np.nan, ys) - base)
        np.testing.assert_allclose(out["lines"][name]["y"], want, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(out["lines"][name]["x"], np.asarray(IOU_THRESHOLDS))
    assert out["order"][0] == "good" and out["order"][-1] == "bad"  # by mean gain
    assert [n for n, v in out["lines"].items() if v["highlighted"]] == out["order"][:3][::-1]  # drawn best last
    # the old entry point draws the same figure when given a baseline
    again = plot_ap_vs_threshold(GRID, tmp_path / "e.png", baseline="base", highlight=3)
    assert again["order"] == out["order"]
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the curves"):
        plot_ap_deltas(GRID, "nope", tmp_path / "x.png")
    with pytest.raises(ValueError, match="needs at least one arm besides the baseline"):
        plot_ap_deltas({"base": GRID["base"]}, "base", tmp_path / "x.png")


@pytest.mark.slow
def test_dap_heatmap_matrix(tmp_path):
    from iouctl.analysis import plot_dap_heatmap

    out = plot_dap_heatmap(GRID, "base", tmp_path / "h.png")
    arms = [a for a in GRID if a != "base"]
    assert out["rows"] == arms and out["cols"][0] == "0.5" and out["cols"][-2:] == ["0.95", "AP"]
    base = np.asarray(GRID["base"])
    for i, a in enumerate(arms):
        d = 100 * (np.where(np.asarray(GRID[a]) == -1, np.nan, GRID[a]) - base)
        np.testing.assert_allclose(out["matrix"][i, :-1], d, rtol=0, atol=1e-12)
        assert out["matrix"][i, -1] == pytest.approx(np.nanmean(d), abs=1e-12)  # the AP column: mean over thresholds
    assert math.isnan(out["matrix"][arms.index("gap"), 8])
    assert png_shape(out["path"])[:2] == (out["size"][1], out["size"][0])
    srt = plot_dap_heatmap(GRID, "base", tmp_path / "s.png", sort=True)
    assert srt["rows"][0] == "good" and srt["rows"][-1] == "bad"
    assert (np.diff(srt["matrix"][:, -1]) <= 1e-12).all()


def test_reliability_bars(tmp_path):
    from iouctl.analysis import plot_reliability, reliability

    conf = torch.tensor([0.05, 0.15, 0.16, 0.95, 1.0], dtype=torch.float64)
    target = torch.tensor([0.0, 0.5, 0.3, 0.9, 0.7], dtype=torch.float64)
    r = reliability(conf, target, 10)
    out = plot_reliability({"iou": r, "as dict": r.to_dict()}, tmp_path / "r.png")
    for p in out["panels"].values():
        np.testing.assert_allclose(p["x"], np.arange(10) / 10 + 0.05, rtol=0, atol=1e-12)
        want = [0.0, 0.4, 0, 0, 0, 0, 0, 0, 0, 0.8]  # empty bins drawn at 0
        np.testing.assert_allclose(p["height"], want, rtol=0, atol=1e-12)
        assert p["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
        assert p["title"].endswith(f"ECE {100 * r.ece:.1f}%")
    assert png_shape(out["path"])[:2] == (out["size"][1], out["size"][0])
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_reliability({}, tmp_path / "x.png")


def test_tide_error_heatmap(tmp_path):
    from iouctl.analysis import plot_tide_errors
    from iouctl.analysis.errors import ErrorBreakdown

    def fake(t, k):
        return ErrorBreakdown(t, 0.1, 0.5, {e: (i + k) / 100 for i, e in enumerate(ERRORS)}, {"fp": 0.2, "fn": 0.1},
                              dict.fromkeys(ERRORS, 1), 10, 5, 0, 8)

    res = {"a": [fake(0.5, 0), fake(0.75, 1)], "b": [fake(0.5, 2), fake(0.75, 3)]}
    out = plot_tide_errors(res, tmp_path / "t.png")
    assert out["rows"] == ["a", "b"] and out["cols"] == [*ERRORS, "FP", "FN"]
    np.testing.assert_allclose(out["panels"][0.75][1], [3, 4, 5, 6, 7, 8, 20, 10], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["panels"][0.5][0], [0, 1, 2, 3, 4, 5, 20, 10], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="same IoU thresholds"):
        plot_tide_errors({"a": res["a"], "b": res["b"][:1]}, tmp_path / "x.png")
