"""COCO AP, IoU-vs-score correlation and plots for raw or post-processed detections (plain functions)."""

from iouctl.analysis.coco_eval import (
    AP_KEYS,
    DEFAULT_BACKEND,
    IOU_THRESHOLDS,
    STAT_KEYS,
    TABLE_KEYS,
    ap_deltas,
    evaluate,
    fmt_ap,
    fmt_delta,
    summarize_eval,
)
from iouctl.analysis.correlation import correlations, matched_correlations, pairwise_iou_xyxy, pearson, true_iou
from iouctl.analysis.groundtruth import BACKENDS, GroundTruth, GroundTruthError, clear_gt_cache, load_gt
from iouctl.analysis.plots import plot_ap_vs_threshold, plot_iou_before_after, plot_score_vs_iou
from iouctl.analysis.synthetic import synthesize_detections

__all__ = [
    "AP_KEYS",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "GroundTruth",
    "GroundTruthError",
    "IOU_THRESHOLDS",
    "STAT_KEYS",
    "TABLE_KEYS",
    "ap_deltas",
    "fmt_ap",
    "fmt_delta",
    "clear_gt_cache",
    "correlations",
    "evaluate",
    "load_gt",
    "matched_correlations",
    "pairwise_iou_xyxy",
    "pearson",
    "plot_ap_vs_threshold",
    "plot_iou_before_after",
    "plot_score_vs_iou",
    "summarize_eval",
    "synthesize_detections",
    "true_iou",
]
