"""`iouctl demo`: the study on the built-in dataset in one run directory, ending in a summary and report.md."""
from __future__ import annotations

import time
from typing import Any, Optional

from iouctl.analysis import fmt_ap, fmt_delta

STEPS = ("data", "nms-ablate", "bench-pool")


def demo(cfg: Any, run: Any, data: Any, ablation: Optional[tuple] = None, bench_cfg: Optional[Any] = None) -> dict:
    """Run each step of `cfg.steps` into a subfolder of `run`, then summarise; numbers come from these runs only.

    data: the dataset object; ablation: the arguments of engine.nms_ablate after `run` (config, data, baseline,
    detections); bench_cfg: the bench_pool config."""
    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        from iouctl.errors import ConfigError

        raise ConfigError(f"unknown demo step(s) {', '.join(map(repr, unknown))}; valid: {', '.join(STEPS)}")
    summary: dict[str, Any] = {"steps": {}}
    timings: dict[str, float] = {}

    if "data" in cfg.steps:
        t0 = time.perf_counter()
        from iouctl.engine.prepare import prepare_dataset

        with run.progress(transient=True) as progress:
            prepare_dataset(data, progress)
        summary["steps"]["data"] = {"root": str(data.root), "classes": [c["name"] for c in data.categories]}
        timings["data"] = time.perf_counter() - t0
        run.console.print(f"[bold]dataset[/]: {data.root} ({timings['data']:.1f} s)")

    if "nms-ablate" in cfg.steps and ablation is not None:
        from iouctl.engine.nms_ablate import nms_ablate

        t0 = time.perf_counter()
        run.console.rule("NMS ablation")
        ablate_cfg, *inputs = ablation
        summary["steps"]["nms-ablate"] = nms_ablate(ablate_cfg, run.child("nms_ablate"), *inputs)
        timings["nms-ablate"] = time.perf_counter() - t0

    if "bench-pool" in cfg.steps and bench_cfg is not None:
        from iouctl.engine.bench_pool import bench_pool

        t0 = time.perf_counter()
        run.console.rule("RoI pooling benchmark")
        summary["steps"]["bench-pool"] = bench_pool(bench_cfg, run.child("bench_pool"))
        timings["bench-pool"] = time.perf_counter() - t0

    summary["seconds"] = timings
    run.write_json("summary.json", summary)
    report = _report(summary)
    run.write_text("report.md", report)
    run.console.rule("summary")
    _print_summary(run, summary)
    run.console.print(f"report: {run.dir / 'report.md'}")
    return summary


def _ablation_lines(ab: dict) -> list[str]:
    out = [f"Detections: {ab['source']} ({ab['num_detections']} raw boxes). Baseline: `{ab['baseline']}`.", "",
           "| arm | AP | AP50 | AP75 | AP90 | dAP | dAP90 |", "|---|---|---|---|---|---|---|"]
    for r in ab["arms"]:
        out.append(f"| {r['arm']} | {fmt_ap(r['AP'])} | {fmt_ap(r['AP50'])} | {fmt_ap(r['AP75'])} | {fmt_ap(r['AP90'])} | "
                   f"{fmt_delta(r['dAP'])} | {fmt_delta(r['dAP90'])} |")
    out += ["", "| score | Pearson with true IoU | Spearman | Kendall |", "|---|---|---|---|"]
    out += [f"| {s} | {c['pearson']:.3f} | {c['spearman']:.3f} | {c['kendall']:.3f} |"
            for s, c in ab["correlation_before_nms"].items()]
    out += ["", "![AP vs IoU threshold](nms_ablate/plots/ap_vs_iou_threshold.png)",
            "![score vs true IoU](nms_ablate/plots/score_vs_true_iou.png)"]
    return out


def _bench_lines(rows: Any) -> list[str]:
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
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
    if "nms-ablate" in steps:
        lines += ["## NMS ablation (AP in %)", "", *_ablation_lines(steps["nms-ablate"]), ""]
    if "bench-pool" in steps:
        lines += ["## RoI pooling timings", "", *_bench_lines(steps["bench-pool"]), "",
                  "![time vs RoI size](bench_pool/plots/bench_pool.png)", ""]
    lines += ["## Time per step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()]
    return "\n".join(lines) + "\n"


def _print_summary(run: Any, summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    steps = summary["steps"]
    if "nms-ablate" in steps:
        ab = steps["nms-ablate"]
        best = max(ab["arms"], key=lambda r: r["AP"])
        t = Table(title="demo summary: NMS arms (AP %, baseline first, best AP last)")
        for c in ("arm", "AP", "AP90", "dAP", "dAP90"):
            t.add_column(c, justify="left" if c == "arm" else "right")
        for r in [ab["arms"][0], best] if best is not ab["arms"][0] else [best]:
            t.add_row(escape(r["arm"]), fmt_ap(r["AP"]), fmt_ap(r["AP90"]), fmt_delta(r["dAP"]), fmt_delta(r["dAP90"]))
        run.console.print(t)
        corr = ab["correlation_before_nms"]
        run.console.print("Pearson with the true IoU: " + ", ".join(f"{s} {c['pearson']:.3f}" for s, c in corr.items()))
    t = Table(title="time per step")
    t.add_column("step")
    t.add_column("seconds", justify="right")
    for k, v in summary["seconds"].items():
        t.add_row(k, f"{v:.1f}")
    run.console.print(t)
