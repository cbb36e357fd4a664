"""COCO AP, IoU-vs-score correlation, oracle bounds, TIDE errors, calibration and plots for raw or post-processed
detections (plain functions)."""

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
from iouctl.analysis.correlation import correlations, matched_correlations, pearson, true_iou
from iouctl.analysis.groundtruth import BACKENDS, GroundTruth, GroundTruthError, clear_gt_cache, load_gt
from iouctl.analysis.plots import (
    plot_ap_deltas, plot_ap_vs_threshold, plot_dap_heatmap, plot_iou_before_after, plot_reliability, plot_score_vs_iou,
    plot_tide_errors,
)
from iouctl.analysis.synthetic import synthesize_detections
from iouctl.analysis.errors import (
    ERROR_TYPES, ErrorBreakdown, coco_ap, error_breakdown, errors_markdown, match_detections,
)
from iouctl.analysis.calibration import (
    LRP, LaECE, Reliability, analyze_arm, calibration_markdown, calibration_report, iou_calibration, laece, lrp,
    reliability,
)
from iouctl.analysis.oracle import (
    ORACLES, OracleReport, oracle_bounds, oracle_markdown, perfect_classification, with_true_iou,
)

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
    "pearson",
    "plot_ap_deltas",
    "plot_ap_vs_threshold",
    "plot_dap_heatmap",
    "plot_iou_before_after",
    "plot_reliability",
    "plot_score_vs_iou",
    "plot_tide_errors",
    "ERROR_TYPES",
    "ErrorBreakdown",
    "coco_ap",
    "error_breakdown",
    "errors_markdown",
    "match_detections",
    "LRP",
    "LaECE",
    "analyze_arm",
    "Reliability",
    "calibration_markdown",
    "calibration_report",
    "iou_calibration",
    "laece",
    "lrp",
    "reliability",
    "ORACLES",
    "OracleReport",
    "oracle_bounds",
    "oracle_markdown",
    "perfect_classification",
    "with_true_iou",
    "summarize_eval",
    "synthesize_detections",
    "true_iou",
]
