"""`iouctl nms-ablate`: NMS arms on cached raw detections, AP at strict IoU thresholds and score-vs-IoU correlations;
per arm, TIDE's error breakdown and the calibration of its scores; for the grid, oracle bounds."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from iouctl.analysis import (
    AP_KEYS, TABLE_KEYS, analyze_arm, ap_deltas, calibration_markdown, correlations, errors_markdown, evaluate, fmt_ap,
    fmt_delta, matched_correlations, oracle_bounds, oracle_markdown, plot_ap_vs_threshold, plot_dap_heatmap,
    plot_reliability, plot_score_vs_iou, plot_tide_errors, synthesize_detections, true_iou,
)
from iouctl.analysis.errors import to_jsonable
from iouctl.data.detections import Detections
from iouctl.engine.prepare import check_detections_data, dataset_record, ground_truth, prepare_dataset
from iouctl.errors import IouctlError
from iouctl.postprocess.suppression import all_scores


def nms_ablate(cfg: Any, run: Any, data: Any, baseline: Any, grid: list, detections: Path | None) -> dict:
    """Every arm of `grid` (NMS objects, see iouctl.postprocess.suppression) against `baseline` on the raw detections
    file `detections` (None: synthesize them from the ground truth of `data`). `cfg` holds the plain settings of
    conf/nms_ablate.yaml; `cfg.cls_weight`, when set, replaces the model's a in the fused score."""
    with run.progress(transient=True) as progress:
        prepare_dataset(data, progress, read_pixels=False)
    gt = ground_truth(data, cfg.split)
    if detections is None:
        dets = synthesize_detections(gt, seed=int(cfg.seed))
        dets.meta.update(model="synthetic", split=cfg.split, gt=gt.name, data=dataset_record(data, cfg.split))
        dets.save(run.path("detections", f"{cfg.split}.npz"))  # so later runs can use run=<this run>
        source = f"synthesized from {gt.name} (seed {cfg.seed})"
    else:
        dets = Detections.load(detections)
        check_detections_data(dets.meta, data, cfg.split, detections)
        source = str(detections)
    if cfg.cls_weight is not None:
        dets.meta["cls_weight"] = float(cfg.cls_weight)
    run.console.print(escape(f"detections: {len(dets)} raw boxes, {len(dets.image_index())} images, "
                             f"predicted IoU: {'yes' if dets.has_ious else 'no'} ({source})"))

    base_name = baseline.name
    # The baseline stands in for its twin in the grid only when every setting agrees; otherwise both run.
    arms = [baseline] + [a for a in grid if vars(a) != vars(baseline)]
    names = unique_names(arms)
    if not dets.has_ious:
        skipped = [n for n, a in zip(names, arms) if a.needs_iou]
        if skipped:
            run.console.print(escape(f"skipped {len(skipped)} arm(s) that need predicted IoUs (the model has no IoU "
                                     f"head): {', '.join(skipped)}"), style="yellow")
        if baseline.needs_iou:
            raise IouctlError(f"the baseline {base_name} needs predicted IoUs, but these detections have none")
        names = [n for n, a in zip(names, arms) if not a.needs_iou]
        arms = [a for a in arms if not a.needs_iou]
        if len(arms) == 1 and any(a.needs_iou for a in grid):
            raise IouctlError("every selected arm needs predicted IoUs, but these detections come from a model "
                              "without an IoU head; use detections of iou_retina/iou_net or --score cls")

    # Correlations of each score with the true IoU, before NMS.
    tiou = true_iou(gt, dets)
    raw_scores = all_scores(dets)
    corr_before = correlations(tiou, raw_scores)
    matched = matched_correlations(tiou, raw_scores)  # IoU-Net's Fig. 2 protocol
    for name, c in matched.items():
        corr_before[name]["pearson_iou>0.5"] = c["pearson"]

    rows, curves, errors, calibration, predicted = [], {}, {}, {}, {}
    base_metrics = None
    t0 = time.perf_counter()
    with run.progress() as progress:
        task = progress.add_task("NMS arms", total=len(arms))
        for name, arm in zip(names, arms):
            t_arm = time.perf_counter()
            kept = arm.keep(dets)
            out = kept.apply(dets)
            metrics = evaluate(gt, out, backend=cfg.eval_backend)
            base_metrics = base_metrics or metrics
            after_scores = {"cls": dets.scores[kept.index], "reported": kept.scores}
            if dets.has_ious:
                after_scores["iou"] = dets.ious[kept.index]
            # true IoU of the kept boxes as reported: recomputed where the arm moved them (box voting, fusion)
            moved = not torch.equal(out.boxes, dets.boxes[kept.index])
            tiou_out = true_iou(gt, out) if moved else tiou[kept.index]
            corr_after = correlations(tiou_out, after_scores)
            if {"errors", "calibration"} & set(cfg.analyses):
                scored = dict(after_scores, fused=all_scores(dets)["fused"][kept.index]) if dets.has_ious \
                    else after_scores
                found = analyze_arm(gt, out, scored, true_iou=tiou_out)
                errors[name], calibration[name] = found["errors"], found["calibration"]
            predicted[name] = metrics
            deltas = ap_deltas(base_metrics, metrics)
            row = {"arm": name, "kept": int(len(kept.index)), **{k: metrics[k] for k in AP_KEYS},
                   **{f"d{k}": deltas[k] for k in TABLE_KEYS},
                   **{f"{m}_{k}_after": v[m] for k, v in corr_after.items() for m in ("pearson", "spearman", "kendall")},
                   "seconds": time.perf_counter() - t_arm}
            rows.append(row)
            curves[name] = metrics["ap_per_threshold"]
            run.log({f"{name}/{k}": row[k] for k in ("AP", "AP50", "AP75", "AP90", "dAP", "dAP90")})
            progress.advance(task)
    oracle = None
    if "oracle" in cfg.analyses:
        with run.progress(transient=True) as progress:
            progress.add_task("oracle bounds", total=None)
            oracle = oracle_bounds(gt, dets, dict(zip(names, arms)), true_iou=tiou, predicted=predicted)
    elapsed = time.perf_counter() - t0

    summary = {"source": source, "baseline": base_name, "num_detections": len(dets), "arms": rows,
               "correlation_before_nms": corr_before, "ap_per_threshold": curves, "seconds": elapsed,
               "errors": to_jsonable({n: [e.to_dict() for e in es] for n, es in errors.items()}) if errors else None,
               "calibration": to_jsonable(calibration) if calibration else None,
               "oracle": to_jsonable(oracle.to_dict()) if oracle is not None else None}
    _write_outputs(run, rows, summary, corr_before)
    analyses_md = []
    if errors and "errors" in cfg.analyses:
        analyses_md.append(errors_markdown(errors))
    if calibration and "calibration" in cfg.analyses:
        analyses_md.append(calibration_markdown(calibration))
    if oracle is not None:
        analyses_md.append(oracle_markdown(oracle))
    if analyses_md:
        run.write_text("analyses.md", "\n".join(analyses_md))
    plots = run.path("plots")
    compared = len(curves) > 1  # deltas need an arm besides the baseline
    ap_png = plot_ap_vs_threshold(curves, plots / "ap_vs_iou_threshold.png",
                                  baseline=base_name if compared else None)["path"]
    if compared:
        run.log_image("plots/dap_heatmap", plot_dap_heatmap(curves, base_name, plots / "dap_heatmap.png")["path"])
    if errors and "errors" in cfg.analyses:
        run.log_image("plots/tide_errors", plot_tide_errors(errors, plots / "tide_errors.png")["path"])
        run.log({f"errors/{n}/{e.iou_threshold:g}/d{k}": v for n, es in errors.items() for e in es
                 for k, v in to_jsonable(e.dap).items()})
    if calibration and "calibration" in cfg.analyses:
        base_cal = calibration[base_name]
        diagrams = {s: c["reliability_iou>0.5"] for s, c in base_cal.items()}
        run.log_image("plots/reliability", plot_reliability(diagrams, plots / "reliability.png")["path"])
        run.log({f"calibration/{n}/{s}/{k}": v for n, c in calibration.items() for s, r in c.items()
                 for k, v in (("ece", r["reliability"]["ece"]), ("laece", r["laece"]["value"]),
                              ("olrp", r["lrp"]["olrp"]))})
    sc_png = plot_score_vs_iou(tiou, raw_scores, plots / "score_vs_true_iou.png", seed=int(cfg.seed))["path"]
    run.log_image("plots/ap_vs_iou_threshold", ap_png)
    run.log_image("plots/score_vs_true_iou", sc_png)
    run.log({f"corr_before/{s}/{m}": v for s, c in corr_before.items() for m, v in c.items()})
    _print(run, rows, corr_before, base_name, elapsed)
    return summary


def unique_names(arms: list) -> list[str]:
    """The arms' names; where several share one (a setting their name does not show was swept), every one but the
    first (the baseline) gets the settings that tell it apart: "soft-gaussian[cls] (sigma=0.7)"."""
    names = [a.name for a in arms]
    for name in dict.fromkeys(names):
        same = [i for i, n in enumerate(names) if n == name]
        differ = [k for k in vars(arms[same[0]]) if len({repr(vars(arms[i]).get(k)) for i in same}) > 1]
        for i in same[1:]:
            names[i] = f"{name} ({', '.join(f'{k}={vars(arms[i]).get(k)}' for k in differ)})"
    return names


def _table_rows(rows: list[dict]) -> tuple[list[str], list[list[Any]]]:
    cols = ["arm", *TABLE_KEYS, "dAP", "dAP50", "dAP80", "dAP90", "kept"]
    return cols, [[r[c] for c in cols] for r in rows]


def _write_outputs(run: Any, rows: list[dict], summary: dict, corr_before: dict) -> None:
    keys = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    run.write_text("results.csv", buf.getvalue())
    run.write_json("results.json", summary)
    cols, table = _table_rows(rows)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        md.append("| " + " | ".join(_cell(c, v) for c, v in zip(cols, r)) + " |")
    md += ["", "Correlation with the true IoU, before NMS (last column: boxes with true IoU > 0.5 only):", "",
           "| score | Pearson | Spearman | Kendall | Pearson, IoU > 0.5 |", "|---|---|---|---|---|"]
    md += [f"| {s} | {c['pearson']:.3f} | {c['spearman']:.3f} | {c['kendall']:.3f} | {c['pearson_iou>0.5']:.3f} |"
           for s, c in corr_before.items()]
    run.write_text("results.md", "\n".join(md) + "\n")
    run.log_table("nms_ablation", cols, table)


def _cell(col: str, v: Any) -> str:
    if col in ("arm", "kept"):
        return str(v)
    return fmt_delta(v) if col.startswith("d") else fmt_ap(v)


def _print(run: Any, rows: list[dict], corr_before: dict, base_name: str, elapsed: float) -> None:
    from rich import box
    from rich.table import Table

    cols = ["arm", *TABLE_KEYS, "dAP", "dAP90"]  # the screen's share; files have every column
    t = Table(title=escape(f"NMS ablation (AP in %, deltas vs {base_name})"), box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        t.add_column(c, justify="left" if c == "arm" else "right", no_wrap=True)
    for r in rows:
        t.add_row(*[escape(_cell(c, r[c])) for c in cols])  # arm names hold [score], not markup
    run.console.print(t)
    ct = Table(title="correlation with the true IoU (raw detections, before NMS)")
    for c in ("score", "Pearson", "Spearman", "Kendall", "Pearson, IoU > 0.5"):
        ct.add_column(c, justify="right")
    for s, c in corr_before.items():
        ct.add_row(s, *(f"{c[k]:.3f}" for k in ("pearson", "spearman", "kendall", "pearson_iou>0.5")))
    run.console.print(ct)
    run.console.print(f"{len(rows)} arms in {elapsed:.1f} s; files: results.csv, results.md, results.json, plots/")
