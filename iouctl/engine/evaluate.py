"""Inference on a split -> raw detections (the shared .npz format) -> NMS -> COCO AP and IoU-vs-score correlations."""
from __future__ import annotations

from typing import Any

import torch
from rich.markup import escape

from iouctl.analysis import (
    AP_KEYS, TABLE_KEYS, analyze_arm, correlations, evaluate, fmt_ap, matched_correlations, plot_score_vs_iou, true_iou,
)
from iouctl.analysis.errors import to_jsonable
from iouctl.data import collate_detection
from iouctl.data.detections import Detections
from iouctl.postprocess.suppression import all_scores


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Any, category_ids: torch.Tensor, device: torch.device,
            batch_size: int, num_workers: int, run: Any, meta: dict) -> Detections:
    """Raw (pre-NMS) detections of `model` on every image of `dataset`; labels mapped back to COCO category ids."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_detection)
    parts = []
    model.eval()
    with run.progress(transient=True) as progress:
        task = progress.add_task("inference", total=len(dataset))
        for images, targets in loader:
            outputs = model([im.to(device) for im in images])
            for out, t in zip(outputs, targets):
                n = len(out["boxes"])
                # kept where the model ran: NMS runs there too (evaluate_detections)
                parts.append(Detections(
                    torch.full((n,), int(t["image_id"]), dtype=torch.int64, device=out["boxes"].device),
                    out["boxes"].float(), category_ids.to(out["labels"].device)[out["labels"]], out["scores"].float(),
                    out["ious"].float() if "ious" in out else None, {}))
            progress.advance(task, len(images))
    with_ious = any(p.ious is not None for p in parts)
    return Detections.concat(parts, meta=meta) if parts else Detections.empty(with_ious, meta)


def evaluate_detections(run: Any, dets: Detections, gt: Any, nms: Any, backend: str, split: str,
                        step: int | None = None) -> dict:
    """Save the raw detections, apply `nms`, report AP, the correlation of each score with the true IoU, and of the
    kept detections TIDE's error breakdown (IoU 0.5, 0.75) and the calibration of their score."""
    dets.save(run.detections_path(split))
    kept = nms(dets).to("cpu")  # NMS where the detections are (the model's device); the analyses on the CPU
    dets = dets.to("cpu")
    metrics = evaluate(gt, kept, backend=backend)
    tiou = true_iou(gt, dets)
    scores = all_scores(dets)
    corr = correlations(tiou, scores)
    corr_matched = matched_correlations(tiou, scores)
    png = plot_score_vs_iou(tiou, scores, run.path("plots", f"score_vs_true_iou_{split}.png"))["path"]
    run.log_image(f"plots/score_vs_true_iou_{split}", png)
    row = {f"{split}/{k}": metrics[k] for k in AP_KEYS}
    row.update({f"{split}/pearson_{s}": c["pearson"] for s, c in corr.items()})
    row.update({f"{split}/pearson_{s}_iou>0.5": c["pearson"] for s, c in corr_matched.items()})
    result = {"metrics": metrics, "correlations": corr, "correlations_iou>0.5": corr_matched,
              "num_matched": int((tiou > 0.5).sum()), "num_raw": len(dets), "num_kept": len(kept),
              "nms": getattr(nms, "name", type(nms).__name__)}
    found = analyze_arm(gt, kept, {"reported": kept.scores}, true_iou=true_iou(gt, kept))
    result["errors"] = to_jsonable([e.to_dict() for e in found["errors"]])
    result["calibration"] = to_jsonable(found["calibration"])
    row.update({f"{split}/errors{e.iou_threshold:g}/d{k}": v if v == v else None for e in found["errors"]
                for k, v in e.dap.items()})
    run.log(row, step=step)
    run.write_json(f"eval_{split}.json", result)
    run.console.print(escape(
        f"{split} after {result['nms']}: " + "  ".join(f"{k} {fmt_ap(metrics[k])}" for k in TABLE_KEYS)))
    run.console.print("Pearson with the true IoU, raw detections: " +
                      ", ".join(f"{s} {c['pearson']:.3f}" for s, c in corr.items()) +
                      f"; those with true IoU > 0.5 ({result['num_matched']}): " +
                      ", ".join(f"{s} {c['pearson']:.3f}" for s, c in corr_matched.items()))
    for e in found["errors"]:  # TIDE: the AP each error type costs
        run.console.print(f"errors at IoU {e.iou_threshold:g} (dAP if fixed): " + ", ".join(
            f"{k} {100 * v:+.1f}" for k, v in e.dap.items() if v == v))
    return result


def run(cfg: Any, run: Any, checkpoint: Any = None) -> dict:
    """`iouctl eval` on a composed config (conf/eval.yaml, with the model/data/pool of the train run evaluated) in an
    open run: the weights of `checkpoint` (None: checkpoint=<file>, or run=<dir> / the newest train run's last one,
    iouctl.engine.inputs.eval_checkpoint), inference on cfg.split, the configured NMS, AP and correlations."""
    from iouctl.engine.build import detector_setup, load_weights
    from iouctl.engine.inputs import eval_checkpoint
    from iouctl.runs import write_source

    if checkpoint is None:
        checkpoint = eval_checkpoint(cfg)
    setup = detector_setup(cfg, run)
    state = load_weights(setup.model, checkpoint, cfg.model)
    write_source(run, checkpoint)  # what refine run=<this> reads
    return setup.evaluate(step=int(state.get("iteration", 0)), split=str(cfg.split))
