"""Oracle bounds of NMS arms: the AP a perfect localisation score, or a perfect classifier, would give.

IoU-Net (Jiang et al., ECCV 2018) motivates IoU-guided NMS by how much better detections ranked by their *true* IoU
would be; these oracles measure that headroom for any arm, next to what the predicted IoU buys. Each oracle is a
modified copy of the raw detections that the unmodified arm then runs on (``arm.keep`` / ``arm(dets)``), so every
arm gets the same treatment and no NMS is reimplemented here:

- ``true_iou``: each raw detection's predicted IoU (``ious``) is replaced by its true IoU, the IoU with its best
  ground truth of the same class in the image (0 when there is none). Arms that rank by the predicted IoU (IoU-guided
  NMS, ``score=iou``) now rank by the truth; ``score=fused`` uses cls^a x true IoU^(1-a). Arms that never read
  ``ious`` (``score=cls``) are unchanged by it: reported as not applicable.
- ``perfect_cls``: a perfect foreground/background classifier, the rule detectors are trained with: detections whose
  true IoU is below ``fg_iou`` (0.5) are background and removed; the others keep their scores and predicted IoUs.
  What is left to NMS is ranking and suppressing true objects' boxes: the headroom of classification.
- ``perfect_cls_true_iou``: both at once.

Headroom = oracle AP - AP of the arm on the real detections.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from iouctl.analysis.coco_eval import AP_KEYS, fmt_ap, fmt_delta
from iouctl.analysis.correlation import true_iou as _true_iou
from iouctl.analysis.errors import coco_ap, to_jsonable
from iouctl.analysis.groundtruth import GroundTruth, load_gt
from iouctl.data.detections import Detections

ORACLES = ("true_iou", "perfect_cls", "perfect_cls_true_iou")


def with_true_iou(dets: Detections, true_iou: Tensor) -> Detections:
    """A copy of ``dets`` (N rows) whose ``ious`` are ``true_iou`` (Tensor[N], e.g. ``true_iou(gt, dets)``)."""
    t = _check_true_iou(dets, true_iou)
    return Detections(dets.image_ids, dets.boxes, dets.labels, dets.scores, t.to(dets.device),
                      {**dets.meta, "oracle": "true_iou"})


def perfect_classification(dets: Detections, true_iou: Tensor, fg_iou: float = 0.5) -> tuple[Detections, Tensor]:
    """The rows of ``dets`` a perfect classifier keeps: true IoU (Tensor[N]) >= ``fg_iou`` with a ground truth of
    their class. Returns (Detections[M], their row indices Tensor[M] int64)."""
    if isinstance(fg_iou, bool) or not isinstance(fg_iou, (int, float)) or not (0.0 < fg_iou <= 1.0):
        raise ValueError(f"perfect_classification: fg_iou must be in (0, 1], got {fg_iou!r}")
    t = _check_true_iou(dets, true_iou)
    index = torch.nonzero(t >= fg_iou).flatten().to(dets.device)
    out = dets.select(index)
    out.meta = {**dets.meta, "oracle": f"perfect_cls@{fg_iou:g}"}
    return out, index


def _check_true_iou(dets: Detections, true_iou: Tensor) -> Tensor:
    if not isinstance(true_iou, Tensor) or true_iou.shape != (len(dets),) or not true_iou.dtype.is_floating_point:
        got = f"{true_iou.dtype} {list(true_iou.shape)}" if isinstance(true_iou, Tensor) else type(true_iou).__name__
        raise ValueError(f"true_iou must be a float Tensor[{len(dets)}] (one per detection), got {got}")
    # float64 IoUs may round just above 1 in float32
    return true_iou.detach().cpu().to(torch.float32).clamp(0.0, 1.0)


@dataclass
class OracleRow:
    """One arm. ``ap``: {variant: {AP key: value}} for "predicted" and each oracle run (None: not applicable, e.g.
    true_iou for an arm that never reads the predicted IoU, or predicted for an IoU arm on a model without IoU head).
    ``headroom``: {oracle: {AP key: oracle - predicted}}."""

    arm: str
    reads_iou: bool
    ap: dict[str, dict[str, float] | None]
    headroom: dict[str, dict[str, float] | None]
    kept: dict[str, int | None] = field(default_factory=dict)  # detections each variant kept

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


@dataclass
class OracleReport:
    fg_iou: float
    oracles: tuple[str, ...]
    num_raw: int          # raw detections
    num_foreground: int   # raw detections with true IoU >= fg_iou (what perfect_cls keeps)
    rows: list[OracleRow]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"fg_iou": self.fg_iou, "oracles": list(self.oracles), "num_raw": self.num_raw,
                            "num_foreground": self.num_foreground, "rows": [r.to_dict() for r in self.rows]})


def oracle_bounds(
    gt: str | os.PathLike | GroundTruth,
    dets: Detections,
    arms: dict[str, Any] | list[Any],
    oracles: tuple[str, ...] = ORACLES,
    fg_iou: float = 0.5,
    true_iou: Tensor | None = None,
    predicted: dict[str, dict[str, Any]] | None = None,
    evaluate_fn: Callable[[Any, Detections], dict[str, Any]] | None = None,
) -> OracleReport:
    """AP of each arm on the real raw detections and under each oracle (module docstring).

    Args:
        gt: COCO ground-truth json path (cached) or a GroundTruth.
        dets: N raw (pre-NMS) detections; with or without predicted IoUs (the true_iou oracle supplies them).
        arms: {name: arm} or a list of arms (named by ``arm.name``); an arm has ``arm(dets) -> Detections`` and,
            optionally, ``needs_iou`` (whether it reads the predicted IoU; assumed True when absent).
        oracles: a subset of ORACLES, in the order to report.
        true_iou (Tensor[N], optional): IoU of each raw detection with its best same-class ground truth;
            computed when absent (pass nms-ablate's to reuse it).
        predicted: {name: evaluate(...) metrics} already computed for the real detections (saves one
            evaluation per arm); missing arms are evaluated here.
        evaluate_fn: (gt, Detections) -> metrics dict with some of AP_KEYS; default ``coco_ap`` (cocoeval's AP,
            AP50..AP90 for area "all", equal to ``evaluate``'s to float rounding and ~3x cheaper), e.g.
            ``lambda g, d: evaluate(g, d)`` for AP_S/M/L too.
    Returns:
        OracleReport; ``to_dict()`` is JSON-ready, ``oracle_markdown`` renders it.
    Cost: one NMS run and one evaluation per arm and oracle that applies (arms that never read the IoU skip the
    true-IoU runs).
    """
    g = load_gt(gt)
    named = arms if isinstance(arms, dict) else {a.name: a for a in arms}
    if not named:
        raise ValueError("oracle_bounds: no arms given")
    inputs = oracle_inputs(g, dets, oracles, fg_iou, true_iou)
    rows = [oracle_row(g, name, arm, inputs, (predicted or {}).get(name), evaluate_fn)
            for name, arm in named.items()]
    return oracle_report(inputs, rows)


@dataclass
class OracleInputs:
    """The raw detections each oracle hands to the arms, built once for any number of arms (``oracle_inputs``)."""

    oracles: tuple[str, ...]
    fg_iou: float
    num_raw: int
    num_foreground: int
    dets: dict[str, Detections]  # "predicted" and each oracle that needs its own input -> Detections


def oracle_inputs(gt: str | os.PathLike | GroundTruth, dets: Detections, oracles: tuple[str, ...] = ORACLES,
                  fg_iou: float = 0.5, true_iou: Tensor | None = None) -> OracleInputs:
    """The oracles' copies of the N raw detections ``dets`` (module docstring); ``true_iou`` (Tensor[N]) as in
    ``oracle_bounds``."""
    oracles = tuple(oracles)
    bad = [o for o in oracles if o not in ORACLES]
    if bad or not oracles:
        raise ValueError(f"oracle_bounds: unknown oracle(s) {bad}; valid: {list(ORACLES)}")
    g = load_gt(gt)
    tiou = _true_iou(g, dets) if true_iou is None else true_iou
    inputs: dict[str, Detections] = {"predicted": dets}
    if "true_iou" in oracles or "perfect_cls_true_iou" in oracles:
        inputs["true_iou"] = with_true_iou(dets, tiou)
    fg, fg_index = perfect_classification(dets, tiou, fg_iou)
    if "perfect_cls" in oracles:
        inputs["perfect_cls"] = fg
    if "perfect_cls_true_iou" in oracles:
        inputs["perfect_cls_true_iou"] = with_true_iou(fg, tiou[fg_index.cpu()])
    return OracleInputs(oracles, float(fg_iou), len(dets), len(fg), inputs)


def oracle_row(gt: str | os.PathLike | GroundTruth, name: str, arm: Any, inputs: OracleInputs,
               predicted: dict[str, Any] | None = None,
               evaluate_fn: Callable[[Any, Detections], dict[str, Any]] | None = None) -> OracleRow:
    """One arm under every oracle of ``inputs``; ``predicted``: its metrics on the real detections, when known."""
    g = load_gt(gt)
    ev = evaluate_fn or coco_ap
    reads = bool(getattr(arm, "needs_iou", True))
    ap: dict[str, dict[str, float] | None] = {}
    kept: dict[str, int | None] = {}
    for variant in ("predicted", *inputs.oracles):
        d = inputs.dets[variant]
        if variant == "true_iou" and not reads:
            ap[variant], kept[variant] = None, None  # the arm never reads ious: identical to predicted
            continue
        if variant == "perfect_cls_true_iou" and not reads:
            ap[variant], kept[variant] = None, None  # identical to perfect_cls
            continue
        if reads and d.ious is None:
            ap[variant], kept[variant] = None, None  # an IoU arm on a model without IoU head
            continue
        if variant == "predicted" and predicted is not None:
            ap[variant], kept[variant] = {k: predicted[k] for k in AP_KEYS if k in predicted}, None
            continue
        out = arm(d)
        m = ev(g, out)
        ap[variant], kept[variant] = {k: m[k] for k in AP_KEYS if k in m}, len(out)
    headroom = {o: _delta(ap["predicted"], ap[o]) for o in inputs.oracles}
    return OracleRow(name, reads, ap, headroom, kept)


def oracle_report(inputs: OracleInputs, rows: list[OracleRow]) -> OracleReport:
    """The report of ``rows`` (``oracle_row`` of each arm, in the order to show) built on ``inputs``."""
    return OracleReport(inputs.fg_iou, inputs.oracles, inputs.num_raw, inputs.num_foreground, list(rows))


def _delta(base: dict[str, float] | None, other: dict[str, float] | None) -> dict[str, float] | None:
    if base is None or other is None:
        return None
    return {k: (math.nan if base[k] == -1 or other[k] == -1 else other[k] - base[k]) for k in base if k in other}


def oracle_markdown(report: OracleReport, keys: tuple[str, ...] = ("AP", "AP75", "AP90")) -> str:
    """A markdown table: per arm, each AP key for the real detections and each oracle, with the headroom in
    brackets (AP points); '-' where an oracle does not apply."""
    labels = {"predicted": "predicted", "true_iou": "true IoU", "perfect_cls": "perfect cls",
              "perfect_cls_true_iou": "perfect cls + true IoU"}
    cols = ["arm"] + [f"{k} {labels[v]}" for k in keys for v in ("predicted", *report.oracles)]
    out = [f"Oracle bounds (AP in %, headroom over the real detections in brackets): true IoU = the arm ranks by each "
           f"box's true IoU instead of the predicted one; perfect cls = raw boxes with true IoU < {report.fg_iou:g} "
           f"removed before NMS ({report.num_foreground} of {report.num_raw} raw boxes stay).", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report.rows:
        cells = [r.arm]
        for k in keys:
            for v in ("predicted", *report.oracles):
                a = r.ap.get(v)
                if a is None or k not in a:
                    cells.append("-")
                    continue
                h = r.headroom.get(v) if v != "predicted" else None
                cells.append(fmt_ap(a[k]) + (f" ({fmt_delta(h[k])})" if h is not None and k in h else ""))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


__all__ = ["ORACLES", "OracleInputs", "OracleReport", "OracleRow", "oracle_bounds", "oracle_inputs", "oracle_markdown",
           "oracle_report", "oracle_row", "perfect_classification", "with_true_iou"]
