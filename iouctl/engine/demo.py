"""`iouctl demo`: the study on the built-in dataset in one run directory, ending in a summary and report.md.

The steps (dataset, training + evaluation, NMS ablation, refinement, pooling benchmark) are the same functions the
single commands run, each writing into its own subfolder; every number of the report is read back from them.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from iouctl.analysis import TABLE_KEYS, fmt_ap, fmt_delta
from iouctl.errors import ConfigError

STEPS = ("data", "train", "nms-ablate", "refine", "bench-pool")
NEEDS = {"nms-ablate": "train", "refine": "train"}  # their detections and model come from the demo's training
FOLDERS = {"train": "train", "nms-ablate": "nms_ablate", "refine": "refine", "bench-pool": "bench_pool"}
AP_COLUMNS = ("AP", "AP50", "AP75", "AP90")


def check_steps(steps: list[str]) -> None:
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown demo step(s) {', '.join(map(repr, unknown))}; valid: {', '.join(STEPS)}")
    for step, needed in NEEDS.items():
        if step in steps and needed not in steps:
            raise ConfigError(f"demo step {step!r} needs the {needed!r} step (it uses the model the demo trains)")


def demo(cfg: Any, run: Any, data: Any, actions: dict[str, Callable[[Any], dict]]) -> dict:
    """Run each step of `cfg.steps` in order: `actions[step](child_run)` for all but data, each in a subfolder of
    `run`; then summarise. The data step prepares `data`."""
    steps = list(cfg.steps)
    check_steps(steps)
    summary: dict[str, Any] = {"steps": {}}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for k, step in enumerate(steps, 1):
        t0 = time.perf_counter()
        run.console.rule(f"[bold]demo step {k}/{len(steps)}: {step}[/]  ({time.perf_counter() - t_all:.0f} s so far)")
        if step == "data":
            from iouctl.engine.prepare import prepare_dataset

            with run.progress(transient=True) as progress:
                prepare_dataset(data, progress)
            summary["steps"]["data"] = {"root": str(data.root), "classes": [c["name"] for c in data.categories]}
        else:
            summary["steps"][step] = actions[step](run.child(FOLDERS[step]))
        timings[step] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    summary["seconds"] = timings
    run.write_json("summary.json", summary)
    run.write_text("report.md", _report(summary))
    run.console.rule("summary")
    _print_summary(run, summary)
    run.console.print(escape(f"report: {run.dir / 'report.md'}"), soft_wrap=True)
    return summary


# ------------------------------------------------------------------------------------------------------ report
def _corr_rows(corr: dict, matched: dict | None = None) -> list[str]:
    head = "| score | Pearson | Spearman | Kendall |" + (" Pearson, IoU > 0.5 |" if matched else "")
    out = [head, "|---|---|---|---|" + ("---|" if matched else "")]
    for s, c in corr.items():
        extra = f" {matched[s]['pearson']:.3f} |" if matched else ""
        out.append(f"| {s} | {c['pearson']:.3f} | {c['spearman']:.3f} | {c['kendall']:.3f} |{extra}")
    return out


def _train_lines(tr: dict) -> list[str]:
    ev = tr["eval"]
    m = ev["metrics"]
    return [f"{tr['model']} trained for {tr['iterations']} iterations, evaluated on the val split after "
            f"`{ev['nms']}` ({ev['num_raw']} raw detections, {ev['num_kept']} kept).", "",
            "| " + " | ".join(TABLE_KEYS) + " |", "|" + "---|" * len(TABLE_KEYS),
            "| " + " | ".join(fmt_ap(m[k]) for k in TABLE_KEYS) + " |", "",
            f"Correlation with the true IoU of the raw detections (last column: the {ev['num_matched']} with true "
            f"IoU > 0.5, IoU-Net's protocol):", "",
            *_corr_rows(ev["correlations"], ev["correlations_iou>0.5"]), "",
            "![score vs true IoU](train/plots/score_vs_true_iou_val.png)"]


def _ablation_lines(ab: dict) -> list[str]:
    out = [f"Detections: {ab['source']} ({ab['num_detections']} raw boxes). Baseline: `{ab['baseline']}`.", "",
           "| arm | AP | AP50 | AP75 | AP90 | dAP | dAP90 |", "|---|---|---|---|---|---|---|"]
    for r in ab["arms"]:
        out.append(f"| {r['arm']} | {fmt_ap(r['AP'])} | {fmt_ap(r['AP50'])} | {fmt_ap(r['AP75'])} | {fmt_ap(r['AP90'])} | "
                   f"{fmt_delta(r['dAP'])} | {fmt_delta(r['dAP90'])} |")
    out += ["", "![AP vs IoU threshold: deltas vs the baseline](nms_ablate/plots/ap_vs_iou_threshold.png)",
            "![dAP per arm and IoU threshold](nms_ablate/plots/dap_heatmap.png)"]
    if ab.get("errors"):  # TIDE: where the best arms gain over the baseline (every arm: nms_ablate/analyses.md)
        from iouctl.analysis import errors_markdown

        best = sorted(ab["arms"][1:], key=lambda r: -r["AP"])[:3]
        shown = {n: ab["errors"][n] for n in [ab["baseline"], *(r["arm"] for r in best)] if n in ab["errors"]}
        out += ["", errors_markdown(shown), "![TIDE errors per arm](nms_ablate/plots/tide_errors.png)"]
    if ab.get("calibration"):
        out += ["", "![reliability of the baseline's scores](nms_ablate/plots/reliability.png)"]
    out += ["", "Every arm's error breakdown, calibration and oracle bounds: `nms_ablate/analyses.md`."]
    return out


def _refine_lines(rf: dict) -> list[str]:
    from iouctl.engine.refine import markdown

    return [f"{rf['boxes_refined']} boxes on {rf['images']} images, `{rf['refiner']}` after `{rf['nms']}`.", "",
            *markdown(rf), "", "![true IoU before vs after](refine/plots/true_iou_before_after.png)"]


def _bench_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no timings)"]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return out


def _report(summary: dict) -> str:
    lines = ["# iouctl demo", ""]
    steps = summary["steps"]
    if "data" in steps:
        lines += ["## Dataset", "", f"Built-in shapes dataset at `{steps['data']['root']}`, classes: "
                  f"{', '.join(steps['data']['classes'])}.", ""]
    sections = (("train", "Detector (AP in %)", _train_lines), ("nms-ablate", "NMS ablation (AP in %)", _ablation_lines),
                ("refine", "Box refinement, IoU-Net Alg. 2 (AP in %)", _refine_lines))
    for key, title, lines_of in sections:
        if key in steps:
            lines += [f"## {title}", "", *lines_of(steps[key]), ""]
    if "bench-pool" in steps:
        lines += ["## RoI pooling timings", "", *_bench_lines(steps["bench-pool"]), "",
                  "![time vs RoI size](bench_pool/plots/bench_pool.png)", ""]
    lines += ["## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()]
    return "\n".join(lines) + "\n"


def _print_summary(run: Any, summary: dict) -> None:
    from rich.table import Table

    steps = summary["steps"]
    if "nms-ablate" in steps:
        ab = steps["nms-ablate"]
        t = Table(title="NMS arms on the trained detector (AP %, deltas vs the baseline, first row)")
        for c in ("arm", *AP_COLUMNS, "dAP", "dAP90"):
            t.add_column(c, justify="left" if c == "arm" else "right", no_wrap=True)
        for r in ab["arms"]:
            t.add_row(escape(r["arm"]), *(fmt_ap(r[k]) for k in AP_COLUMNS), fmt_delta(r["dAP"]),
                      fmt_delta(r["dAP90"]))
        run.console.print(t)
    if "train" in steps:
        ev = steps["train"]["eval"]
        run.console.print(escape(f"{steps['train']['model']} after {ev['nms']}: " + "  ".join(
            f"{k} {fmt_ap(ev['metrics'][k])}" for k in ("AP", "AP50", "AP75", "AP90"))))
        run.console.print("Pearson with the true IoU, raw detections: " + ", ".join(
            f"{s} {c['pearson']:.3f}" for s, c in ev["correlations"].items()) + "; true IoU > 0.5: " + ", ".join(
            f"{s} {c['pearson']:.3f}" for s, c in ev["correlations_iou>0.5"].items()))
    if "refine" in steps:
        rf = steps["refine"]
        run.console.print(escape(
            f"refinement ({rf['refiner']}): AP {fmt_ap(rf['ap_before']['AP'])} -> {fmt_ap(rf['ap_after']['AP'])} "
            f"({fmt_delta(rf['ap_delta']['AP'])}), AP90 {fmt_ap(rf['ap_before']['AP90'])} -> "
            f"{fmt_ap(rf['ap_after']['AP90'])} ({fmt_delta(rf['ap_delta']['AP90'])}), mean true IoU "
            f"{rf['mean_true_iou_before']:.3f} -> {rf['mean_true_iou_after']:.3f}"))
    if "bench-pool" in steps:
        rows = [r for r in steps["bench-pool"] if r["impl"] != "roi_align" and r["roi_size"] == "mixed"]
        run.console.print("pooling (mixed RoI sizes), time / roi_align's: " + ", ".join(
            f"{r['impl']} {r['phase'].replace('_', '+')} {r['ratio_to_roi_align']:.2f}x" for r in rows))
    t = Table(title="time per step")
    t.add_column("step")
    t.add_column("seconds", justify="right")
    for k, v in summary["seconds"].items():
        t.add_row(k, f"{v:.1f}")
    run.console.print(t)
