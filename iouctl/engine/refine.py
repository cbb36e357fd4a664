"""`iouctl refine`: IoU-guided NMS, then IoU-Net Alg. 2 on the kept boxes; AP, true and predicted IoU before/after."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torchvision.models.detection.transform import resize_boxes

from iouctl.analysis import (
    AP_KEYS, ERROR_TYPES, TABLE_KEYS, ap_deltas, error_breakdown, errors_markdown, evaluate, fmt_ap, fmt_delta,
    plot_iou_before_after, true_iou,
)
from iouctl.analysis.errors import to_jsonable
from iouctl.data.detections import Detections, rank_per_image
from iouctl.engine.prepare import check_detections_data, ground_truth
from iouctl.errors import IouctlError
from iouctl.postprocess.refine import IoURefiner


# ------------------------------------------------------------------------------------------ which run to refine
def box_differentiable(model_cfg: dict, detector: dict | None = None) -> bool:
    """Whether a model has an IoU head whose prediction is differentiable in the box (IoU-Net's, on pooled features);
    the IoU-aware RetinaNet's IoU belongs to an anchor, not to a box. `detector`: the contract its run recorded
    (meta["detector"], iouctl.models.contract.describe), which decides; runs made before it was recorded are judged
    by their model config."""
    if isinstance(detector, dict) and "box_differentiable_iou" in detector:
        return bool(detector["box_differentiable_iou"])
    return str(model_cfg.get("_target_", "")).endswith("rcnn.faster_rcnn") and bool(model_cfg.get("iou_head"))


def refinable(run_config: dict, meta: dict | None = None) -> bool:
    """Whether a run (its config.yaml and meta.json) describes a model refine can use."""
    return box_differentiable(run_config.get("model") or {}, (meta or {}).get("detector"))


# How refine looks for its run (iouctl.runs.find_model_run): which runs serve, and what to say when none does.
FIND_REFINABLE = {"usable": refinable, "wanted": "of a model with a box-differentiable IoU head",
                  "hint": "train one (iouctl train model=iou_net) or pass run=<dir>"}


def check_refinable(run_dir: Path, trained: dict, detector: dict | None = None) -> None:
    """One line (IouctlError) when the model of `trained` (the config.yaml of the train run behind `run_dir`; its
    recorded contract `detector` when there is one) has no box-differentiable IoU head."""
    model = trained.get("model") or {}
    if not box_differentiable(model, detector):
        name = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
        raise IouctlError(f"run={run_dir}: its model ({name}, iou_head={model.get('iou_head')}) has no "
                          f"box-differentiable IoU head; refinement needs model=iou_net (IoU head on PrRoI features)")


# ------------------------------------------------------------------------------------------------- refinement
def select_for_refinement(dets: Detections, nms: Any, top_k: int) -> tuple[Detections, torch.Tensor, torch.Tensor]:
    """NMS output (reporting the NMS's score), the rows of it to refine (the top_k per image by that score) and the
    cls score of each kept box."""
    kept = nms.keep(dets)
    out = kept.apply(dets)
    order, rank = rank_per_image(out.image_ids, out.scores)
    return out, order[rank < top_k], dets.scores[kept.index]


def refine_boxes(model: Any, dataset: Any, dets: Detections, rows: torch.Tensor, labels: torch.Tensor,
                 refiner: IoURefiner, device: torch.device, batch_size: int, progress: Any) -> dict:
    """Refine dets.boxes[rows] (original-image pixels) image batch by image batch: features once per image, then
    every box of the batch moves together. labels: contiguous class index of each row."""
    index = {iid: i for i, iid in enumerate(dataset.image_ids)}
    by_image = {}
    for r in rows.tolist():
        by_image.setdefault(int(dets.image_ids[r]), []).append(r)
    images = sorted(by_image, key=lambda iid: index[iid])
    boxes = dets.boxes.clone()
    n = len(dets)
    pred_before, pred_after = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    steps = torch.zeros(n, dtype=torch.int64)
    iterations, seconds = [], 0.0
    task = progress.add_task("refining", total=len(images))
    for lo in range(0, len(images), batch_size):
        ids = images[lo: lo + batch_size]
        pics = [dataset[index[iid]][0].to(device) for iid in ids]
        t0 = time.perf_counter()
        with torch.no_grad():
            features, sizes = model.features(pics)
        part_rows = [torch.tensor(by_image[iid]) for iid in ids]
        originals = [tuple(p.shape[-2:]) for p in pics]
        start = [resize_boxes(boxes[r].to(device), o, s) for r, o, s in zip(part_rows, originals, sizes)]
        flat_labels = labels[torch.cat(part_rows)].to(device)

        def predict(bs, idx, features=features, sizes=sizes, flat_labels=flat_labels):
            return model.predict_iou(features, bs, [flat_labels[i] for i in idx], sizes)

        out = refiner(predict, start, sizes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        all_rows = torch.cat(part_rows)
        for r, b, o, s in zip(part_rows, out.boxes, originals, sizes):
            boxes[r] = resize_boxes(b, s, o).cpu().to(boxes.dtype)
        pred_before[all_rows], pred_after[all_rows] = out.iou_before.cpu(), out.iou_after.cpu()
        steps[all_rows] = out.steps.cpu()
        iterations.append(out.iterations)
        progress.advance(task, len(ids))
    return {"boxes": boxes, "pred_before": pred_before, "pred_after": pred_after, "steps": steps,
            "iterations": iterations, "seconds": seconds, "images": len(images)}


def _check_match(dets: Detections, dataset: Any, category_ids: torch.Tensor, source: Path | None) -> None:
    """Detections of another dataset (other image ids or categories) are one clear error, not a wrong result."""
    where = source or "the detections"
    missing = set(dets.image_ids.unique().tolist()) - set(dataset.image_ids)
    if missing:
        raise IouctlError(f"{where}: image id {min(missing)} (and {len(missing) - 1} more) is not in the dataset's "
                          f"split; refine needs the data config the detections were made with")
    unknown = set(dets.labels.unique().tolist()) - set(category_ids.tolist())
    if unknown:
        raise IouctlError(f"{where}: category id {min(unknown)} is not one of the dataset's "
                          f"{sorted(category_ids.tolist())}")


def _scores(report: str, nms_scores: torch.Tensor, cls_scores: torch.Tensor, pred_iou: torch.Tensor) -> torch.Tensor:
    if report == "cls":
        return cls_scores
    if report == "cluster":
        return nms_scores
    return nms_scores * torch.nan_to_num(pred_iou, nan=1.0)  # unrefined rows keep their NMS score


def refine(cfg: Any, run: Any, data: Any, model: Any, refiner: IoURefiner | None, nms: Any, category_ids: Any,
           device: torch.device, detections: Path | None, predict_fn: Any) -> dict:
    """The whole command: detections (cached, or inference through `predict_fn()`), NMS, refinement, evaluation."""
    split = str(cfg.split)
    gt = ground_truth(data, split)
    if detections is not None:
        dets = Detections.load(detections)
        check_detections_data(dets.meta, data, split, detections)
        run.console.print(escape(f"detections: {len(dets)} raw boxes from {detections}"))
    else:
        run.console.print("no cached detections for this run: running inference first")
        dets = predict_fn()
        dets.save(run.detections_path(split))
    if not dets.has_ious and getattr(nms, "needs_iou", False):
        raise IouctlError(f"nms={nms.name} needs predicted IoUs, but the detections have none")
    dataset = data.dataset(split)
    _check_match(dets, dataset, category_ids, detections)
    top_k = refiner.top_k if refiner is not None else 0
    kept, rows, cls_scores = select_for_refinement(dets, nms, top_k)
    labels = torch.searchsorted(category_ids, kept.labels)
    model.eval().requires_grad_(False).to(device)
    with run.progress() as progress:
        if refiner is None:
            run.console.print("refiner=none: boxes are not moved (before = after)")
            res = {"boxes": kept.boxes.clone(), "pred_before": torch.full((len(kept),), float("nan")),
                   "steps": torch.zeros(len(kept), dtype=torch.int64), "iterations": [], "seconds": 0.0, "images": 0}
            res["pred_after"] = res["pred_before"]
        else:
            res = refine_boxes(model, dataset, kept, rows, labels, refiner, device, int(cfg.batch_size), progress)
    report = refiner.report_score if refiner is not None else "cluster"
    before = kept.select(slice(None))
    before.scores = _scores(report, kept.scores, cls_scores, res["pred_before"])
    after = kept.select(slice(None))
    after.boxes = res["boxes"]
    after.scores = _scores(report, kept.scores, cls_scores, res["pred_after"])
    after.meta.update(refined=refiner.name if refiner is not None else "none", after_nms=nms.name)
    after.save(run.path(f"detections/refined_{split}.npz"))

    m_before = evaluate(gt, before, backend=str(cfg.eval_backend))
    m_after = evaluate(gt, after, backend=str(cfg.eval_backend))
    deltas = ap_deltas(m_before, m_after)
    # TIDE's breakdown of the same detections before and after: refinement should turn localization errors into hits
    errors = {when: [e.to_dict() for e in error_breakdown(gt, d, ERROR_IOUS)] for when, d in (("before", before),
                                                                                         ("after", after))}
    moved = rows if refiner is not None else torch.zeros(0, dtype=torch.int64)
    t_before = true_iou(gt, before.select(moved))
    t_after = true_iou(gt, after.select(moved))
    diff = t_after - t_before
    matched = t_before >= 0.5

    def mean(x: torch.Tensor) -> float:
        x = x[~torch.isnan(x)] if x.is_floating_point() else x
        return float(x.double().mean()) if x.numel() else float("nan")

    summary = {
        "refiner": refiner.name if refiner is not None else "none", "nms": nms.name, "report_score": report,
        "images": res["images"], "boxes_refined": int(len(moved)),
        "ap_before": {k: m_before[k] for k in AP_KEYS}, "ap_after": {k: m_after[k] for k in AP_KEYS},
        "ap_delta": {k: deltas[k] for k in AP_KEYS},
        "ap_per_threshold": {"before": m_before["ap_per_threshold"], "after": m_after["ap_per_threshold"]},
        "mean_true_iou_before": mean(t_before), "mean_true_iou_after": mean(t_after),
        "mean_true_iou_before_matched": mean(t_before[matched]), "mean_true_iou_after_matched": mean(t_after[matched]),
        "mean_pred_iou_before": mean(res["pred_before"][moved]), "mean_pred_iou_after": mean(res["pred_after"][moved]),
        "share_improved": mean((diff > 1e-6).double()), "share_worse": mean((diff < -1e-6).double()),
        "mean_steps": mean(res["steps"][moved].double()), "iterations_per_batch": res["iterations"],
        "ms_per_image": 1000 * res["seconds"] / max(1, res["images"]),
        "errors": to_jsonable(errors),
    }
    run.write_json("refine.json", summary)
    png = plot_iou_before_after(t_before, t_after, run.path("plots", "true_iou_before_after.png"))["path"]
    run.log_image("plots/true_iou_before_after", png)
    run.log({**{f"before/{k}": m_before[k] for k in AP_KEYS}, **{f"after/{k}": m_after[k] for k in AP_KEYS},
             **{k: v for k, v in summary.items() if isinstance(v, float)},
             **{f"errors/{when}/{e['iou_threshold']:g}/{what}{k}": v for when, es in errors.items() for e in es
                for what, part in (("d", e["dap"]), ("n_", e["counts"])) for k, v in part.items()}})
    cols = ["", *TABLE_KEYS]
    table = [["before", *(m_before[k] for k in TABLE_KEYS)], ["after", *(m_after[k] for k in TABLE_KEYS)],
             ["delta", *(deltas[k] for k in TABLE_KEYS)]]
    run.log_table("refinement", cols, table)
    run.write_text("results.md", "\n".join(markdown(summary)) + "\n")
    _print(run, cols, table, summary)
    return summary


ERROR_IOUS = (0.5, 0.75)  # TIDE's foreground thresholds shown by refine (as nms-ablate)


def _error_lines(s: dict) -> list[str]:
    """One line per threshold: localization errors and their dAP before -> after (summaries without errors: none)."""
    errors = s.get("errors") or {}
    out = []
    for b, a in zip(errors.get("before", []), errors.get("after", [])):
        out.append(f"TIDE at IoU {b['iou_threshold']:g}: localization errors {b['counts']['loc']} -> "
                   f"{a['counts']['loc']} (dAP {_pts(b['dap']['loc'])} -> {_pts(a['dap']['loc'])}), duplicates "
                   f"{b['counts']['dupe']} -> {a['counts']['dupe']}, missed {b['counts']['miss']} -> "
                   f"{a['counts']['miss']}")
    return out


def _pts(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _lines(s: dict) -> list[str]:
    return [
        f"boxes refined: {s['boxes_refined']} on {s['images']} images ({s['refiner']}, after {s['nms']}, "
        f"score reported: {s['report_score']})",
        f"mean true IoU of the refined boxes: {s['mean_true_iou_before']:.4f} -> {s['mean_true_iou_after']:.4f}; "
        f"of those with true IoU >= 0.5 before: {s['mean_true_iou_before_matched']:.4f} -> "
        f"{s['mean_true_iou_after_matched']:.4f}",
        f"mean predicted IoU: {s['mean_pred_iou_before']:.4f} -> {s['mean_pred_iou_after']:.4f}",
        f"true IoU improved for {100 * s['share_improved']:.1f}% of the boxes, worse for "
        f"{100 * s['share_worse']:.1f}%; mean accepted steps {s['mean_steps']:.2f}",
        f"time: {s['ms_per_image']:.1f} ms per image (features + refinement)",
        *_error_lines(s),
    ]


def _cell(row: str, v: Any) -> str:
    return fmt_delta(v) if row == "delta" else fmt_ap(v)


def markdown(s: dict) -> list[str]:
    """The AP table (before / after / delta) and the summary lines of a refine summary, as markdown lines: the
    command's results.md and the demo's report both use it."""
    md = ["| | " + " | ".join(TABLE_KEYS) + " |", "|---|" + "---|" * len(TABLE_KEYS)]
    for row, key in (("before", "ap_before"), ("after", "ap_after"), ("delta", "ap_delta")):
        md.append(f"| {row} | " + " | ".join(_cell(row, s[key][k]) for k in TABLE_KEYS) + " |")
    md += [""] + [f"- {line}" for line in _lines(s)]
    if s.get("errors"):
        md += ["", *errors_markdown(dict(s["errors"])).rstrip("\n").split("\n")]
    return md


def _print(run: Any, cols: list[str], table: list[list[Any]], summary: dict) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title="refinement (AP in %)", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        t.add_column(c, justify="left" if not c else "right", no_wrap=True)
    for r in table:
        t.add_row(r[0], *(_cell(r[0], v) for v in r[1:]))
    run.console.print(t)
    for line in _lines(summary):
        run.console.print(escape(line))
    if summary.get("errors"):
        et = Table(title="TIDE errors: AP points gained by fixing each type alone (count)", box=box.SIMPLE_HEAD,
                   pad_edge=False)
        for c in ("", "IoU", "AP", *ERROR_TYPES):
            et.add_column(c, justify="left" if not c else "right", no_wrap=True)
        for when, es in summary["errors"].items():
            for e in es:
                et.add_row(when, f"{e['iou_threshold']:g}", fmt_ap(e["ap"]),
                           *(f"{_pts(e['dap'][k])} ({e['counts'][k]})" for k in ERROR_TYPES))
        run.console.print(et)
    run.console.print("files: refine.json, results.md, detections/refined_*.npz, plots/true_iou_before_after.png")


def run(cfg: Any, run: Any, source: Any = None) -> dict:
    """`iouctl refine` on a composed config (conf/refine.yaml, with the model/data/pool of the run refined) in an open
    run: the weights of `source` (iouctl.runs.Source; None: found from cfg.run or the newest refinable run,
    iouctl.engine.inputs.refine_source) on its cached detections (inference first when it has none)."""
    from iouctl import config
    from iouctl.engine.build import detector_setup, load_weights
    from iouctl.engine.inputs import refine_source
    from iouctl.runs import write_source

    if source is None:
        source = refine_source(cfg)
    setup = detector_setup(cfg, run)
    load_weights(setup.model, source.checkpoint, cfg.model)
    write_source(run, source.checkpoint)
    return refine(cfg, run, setup.data, setup.model, config.instantiate(cfg.refiner), setup.nms, setup.cats.ids,
                  setup.device, source.detections, lambda: setup.predict(split=str(cfg.split)))
