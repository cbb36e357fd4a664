"""Plots: valid PNGs of the promised size that show exactly the data given."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from iouctl.analysis import IOU_THRESHOLDS, plot_ap_vs_threshold, plot_score_vs_iou
from iouctl.analysis.plots import DPI, PANEL_INCHES


def png_shape(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape  # (height, width, channels): decodes the whole image


def test_score_vs_iou_draws_all_points_when_small(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(500, generator=g, dtype=torch.float64)
    scores = {"cls": torch.rand(500, generator=g), "iou": (t + 0.05 * torch.randn(500, generator=g)).float()}
    out = plot_score_vs_iou(t, scores, tmp_path / "plots" / "score_vs_iou.png")
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
    out = plot_score_vs_iou(t, s, tmp_path / "big.png", max_points=300, seed=3)
    idx = out["index"]
    assert len(idx) == 300 and len(set(idx.tolist())) == 300 and (np.diff(idx) > 0).all()
    for name in s:
        np.testing.assert_array_equal(out["panels"][name]["x"], t.numpy()[idx])
        np.testing.assert_array_equal(out["panels"][name]["y"], s[name].double().numpy()[idx])
    # Pearson in the title uses all n points, not the subsample.
    assert out["panels"]["a"]["pearson"] == pytest.approx(-1.0, abs=1e-12)
    again = plot_score_vs_iou(t, s, tmp_path / "big2.png", max_points=300, seed=3)
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
    out = plot_iou_before_after(before, after, tmp_path / "p.png")
    np.testing.assert_array_equal(out["x"], before.numpy())
    np.testing.assert_array_equal(out["y"], after.numpy())
    assert (out["improved"], out["worse"]) == (2, 1)
    assert imread(out["path"]).shape[:2] == (out["size"][1], out["size"][0])
    big = torch.rand(30000, dtype=torch.float64)
    out = plot_iou_before_after(big, big + 0.01, tmp_path / "q.png", max_points=1000)
    assert len(out["x"]) == 1000 and out["improved"] == 30000
    with pytest.raises(ValueError, match="after"):
        plot_iou_before_after(before, after[:2], tmp_path / "r.png")
