"""COCO box AP with pycocotools (the reference) or faster-coco-eval (same numbers, C++ matching, 5-10x faster).

``iouctl.analysis.cocoeval_arrays.evaluate_arrays`` gives faster-coco-eval's numbers bit for bit from the detections
table (no dict per detection, ~5x cheaper again at COCO scale); nms-ablate evaluates its arms with it.

All values are fractions in [0, 1]. A value of -1 is cocoeval's "undefined": no non-crowd ground truth falls in
that slice (e.g. AP_S when the split has no small objects). Empty results give 0 wherever ground truth exists.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import Tensor

from iouctl.analysis.groundtruth import BACKENDS, GroundTruth, GroundTruthError, _quiet, load_gt
from iouctl.data.coco import _is_int, _is_num
from iouctl.data.detections import Detections

DEFAULT_BACKEND = "faster-coco-eval"

# Order of cocoeval's 12 summary stats (pycocotools summarize(), faster-coco-eval stats[:12]).
STAT_KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L")
# AP at one IoU threshold (area all, maxDets 100): the IoU-Net table's columns.
SINGLE_THRESHOLD_KEYS = {"AP60": 0.60, "AP70": 0.70, "AP80": 0.80, "AP90": 0.90}
# cocoeval's thresholds, built as it builds them (np.arange would drift).
IOU_THRESHOLDS = tuple(float(t) for t in np.linspace(0.5, 0.95, 10))
AP_KEYS = ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "AP_S", "AP_M", "AP_L")
TABLE_KEYS = AP_KEYS[:7]  # the columns of result tables: AP and the strict thresholds


def _results_list(g: GroundTruth, results: Any, scores: Tensor | None) -> list[dict]:
    """Fresh COCO result dicts (both loadRes implementations write 'id', 'area', ... into them)."""
    if isinstance(results, Detections):
        g.check_ids(results.image_ids, results.labels, "detections")
        return results.to_coco_results(scores)
    if scores is not None:
        raise ValueError("evaluate: 'scores' is only valid with Detections results, not a COCO results list")
    if not isinstance(results, list):
        raise ValueError(f"evaluate: results must be Detections or a COCO results list, got {type(results).__name__}")
    out = []
    for i, r in enumerate(results):
        ok = isinstance(r, dict) and all(k in r for k in ("image_id", "category_id", "bbox", "score"))
        ok = ok and _is_int(r["image_id"]) and _is_int(r["category_id"]) and _is_num(r["score"])
        ok = ok and isinstance(r["bbox"], (list, tuple)) and len(r["bbox"]) == 4 and all(map(_is_num, r["bbox"]))
        if not ok:
            raise ValueError(
                f"evaluate: result {i} is not a dict with int image_id, int category_id, bbox [x, y, w, h] and "
                f"a numeric score: {str(r)[:80]}"
            )
        out.append(
            {"image_id": r["image_id"], "category_id": r["category_id"], "bbox": list(r["bbox"]), "score": r["score"]}
        )
    if out:
        import torch

        g.check_ids(
            torch.tensor([r["image_id"] for r in out]), torch.tensor([r["category_id"] for r in out]), "results"
        )
    return out


def _run_pycocotools(g: GroundTruth, res: list[dict]) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = g.coco("pycocotools")
    with contextlib.redirect_stdout(io.StringIO()):
        if res:
            dt = gt.loadRes(res)
        else:
            # loadRes indexes res[0]; an empty result set is still a valid (all-miss) submission.
            dt = COCO()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": list(gt.dataset["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _run_faster(g: GroundTruth, res: list[dict]) -> Any:
    from faster_coco_eval import COCOeval_faster

    gt = g.coco("faster-coco-eval")
    dt = gt.loadRes(res)
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=_quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def evaluate(
    gt: str | os.PathLike | GroundTruth,
    results: Detections | list[dict],
    backend: str = DEFAULT_BACKEND,
    scores: Tensor | None = None,
) -> dict[str, Any]:
    """COCO bbox evaluation of ``results`` against the ground-truth json ``gt``.

    Args:
        gt: COCO ground-truth json path (parsed once and cached) or a GroundTruth.
        results: Detections (labels = COCO category ids) or a COCO results list.
        backend: "faster-coco-eval" (default) or "pycocotools" (the reference); both print nothing.
        scores (Tensor[N], optional): ranking score replacing ``results.scores`` (Detections only).
    Returns:
        {"AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR10", "AR100", "AR_S", "AR_M", "AR_L",
         "AP60", "AP70", "AP80", "AP90": float, "ap_per_threshold": list[float] (10, IoU 0.50:0.05:0.95)}.
        Fractions in [0, 1]; -1 = undefined (no ground truth in that slice).
    Note: cocoeval keeps the top 100 detections per image *and category*; apply ``top_k_per_image`` first
    for the usual 100-per-image budget.
    """
    if backend not in BACKENDS:
        raise ValueError(f"evaluate: unknown backend '{backend}'; valid: {list(BACKENDS)}")
    g = load_gt(gt)
    with _gc_paused():
        return _evaluate(g, results, scores, backend)


def _evaluate(g: GroundTruth, results: Any, scores: Tensor | None, backend: str) -> dict[str, Any]:
    # A function of its own so that its ~10 objects per detection are freed (by reference counting) on return,
    # before the collector resumes and would otherwise walk them once.
    res = _results_list(g, results, scores)
    ev = _run_pycocotools(g, res) if backend == "pycocotools" else _run_faster(g, res)
    return summarize_eval(ev.stats, ev.eval["precision"])


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: an evaluation allocates several dicts per detection, and the collections this
    triggers walk the cached ground truth each time (measured: median faster-coco-eval time x2 on shapes val).
    Reference counting still frees everything; the collector resumes (if it was on) on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def summarize_eval(stats: Any, precision: np.ndarray) -> dict[str, Any]:
    """Metrics dict from cocoeval's 12 stats and its precision array [T=10, R=101, K, A=4, M=3]."""
    stats = [float(s) for s in np.asarray(stats)[: len(STAT_KEYS)]]
    if len(stats) != len(STAT_KEYS) or precision.shape[0] != len(IOU_THRESHOLDS):
        raise ValueError(
            f"summarize_eval: expected 12 stats and 10 IoU thresholds, got {len(stats)} and {precision.shape[0]}"
        )
    out: dict[str, Any] = dict(zip(STAT_KEYS, stats))
    per_t = []
    for t in range(len(IOU_THRESHOLDS)):
        s = precision[t, :, :, 0, -1]  # area "all", maxDets 100, as cocoeval's AP50/AP75
        valid = s[s > -1]
        per_t.append(float(np.mean(valid)) if valid.size else -1.0)
    for name, thr in SINGLE_THRESHOLD_KEYS.items():
        out[name] = per_t[int(np.argmin(np.abs(np.asarray(IOU_THRESHOLDS) - thr)))]
    out["ap_per_threshold"] = per_t
    return out


def ap_deltas(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """other - base for each AP key present in both (and element-wise for ``ap_per_threshold``).

    A value that is -1 (undefined) on either side gives nan, not a fake difference.
    """

    def d(a: float, b: float) -> float:
        return math.nan if a == -1 or b == -1 else float(b) - float(a)

    out: dict[str, Any] = {k: d(base[k], other[k]) for k in AP_KEYS if k in base and k in other}
    if "ap_per_threshold" in base and "ap_per_threshold" in other:
        a, b = base["ap_per_threshold"], other["ap_per_threshold"]
        if len(a) != len(b):
            raise ValueError(f"ap_deltas: ap_per_threshold lengths differ ({len(a)} vs {len(b)})")
        out["ap_per_threshold"] = [d(x, y) for x, y in zip(a, b)]
    if not out:
        raise ValueError(f"ap_deltas: no AP key in common; expected some of {list(AP_KEYS)}")
    return out


__all__ = [
    "AP_KEYS",
    "DEFAULT_BACKEND",
    "GroundTruthError",
    "IOU_THRESHOLDS",
    "STAT_KEYS",
    "TABLE_KEYS",
    "ap_deltas",
    "evaluate",
    "summarize_eval",
]


def fmt_ap(v: Any) -> str:
    """An AP fraction as a percentage for tables; '-' when undefined (None, nan or cocoeval's -1)."""
    return "-" if v is None or v == -1 or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def fmt_delta(v: Any) -> str:
    """An AP difference as signed percentage points; '-' when undefined."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f}"
