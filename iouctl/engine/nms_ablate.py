"""`iouctl nms-ablate`: NMS arms on cached raw detections, AP at strict IoU thresholds and score-vs-IoU correlations;
per arm, TIDE's error breakdown and the calibration of its scores; for the grid, oracle bounds.

The arms are independent: with ``workers`` > 1 they run in forked worker processes (one arm per task; the raw
detections, ground truth, true IoUs and oracle inputs are built once, before the fork, and shared copy-on-write),
and their results come back in the grid's order, equal to the serial run's. With eval_backend faster-coco-eval the
arms are evaluated on arrays (iouctl.analysis.cocoeval_arrays: the same numbers bit for bit, results.json
"arm_evaluator")."""
from __future__ import annotations

import csv
import io
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from iouctl.analysis import (
    AP_KEYS, TABLE_KEYS, analyze_arm, ap_deltas, calibration_markdown, correlations, errors_markdown, evaluate, fmt_ap,
    fmt_delta, matched_correlations, oracle_markdown, plot_ap_vs_threshold, plot_dap_heatmap, plot_reliability,
    plot_score_vs_iou, plot_tide_errors, synthesize_detections, true_iou,
)
from iouctl.analysis.cocoeval_arrays import evaluate_arrays, gt_arrays
from iouctl.analysis.errors import crowd_regions, to_jsonable
from iouctl.analysis.oracle import OracleInputs, oracle_inputs, oracle_report, oracle_row
from iouctl.data.detections import Detections
from iouctl.engine.prepare import check_detections_data, dataset_record, ground_truth, prepare_dataset
from iouctl.errors import IouctlError
from iouctl.ops import _extension
from iouctl.postprocess.suppression import all_scores, group_ids

ARM_PHASES = ("nms", "evaluate", "analyses", "oracle")  # what each arm's task times (results.json "phases")
# Raw boxes from which the analyses' cost is worth a word: at COCO scale (5,000 images x 1,000 boxes) they took about
# twice the CPU of the grid itself (docs/benchmarks.md, "nms-ablate at scale")
LARGE_SPLIT = 1_000_000


def nms_ablate(cfg: Any, run: Any, data: Any, baseline: Any, grid: list, detections: Path | None) -> dict:
    """Every arm of `grid` (NMS objects, see iouctl.postprocess.suppression) against `baseline` on the raw detections
    file `detections` (None: synthesize them from the ground truth of `data`). `cfg` holds the plain settings of
    conf/nms_ablate.yaml; `cfg.cls_weight`, when set, replaces the model's a in the fused score; `cfg.workers`
    processes run the arms (0: one per available core)."""
    clock = _Clock()
    with run.progress(transient=True) as progress:
        prepare_dataset(data, progress, read_pixels=False)
    gt = ground_truth(data, cfg.split)
    if detections is None:
        dets = synthesize_detections(gt, seed=int(cfg.seed))
        dets.meta.update(model="synthetic", split=cfg.split, gt=gt.name, data=dataset_record(data, cfg.split))
        dets.save(run.detections_path(str(cfg.split)))  # so later runs can use run=<this run>
        source = f"synthesized from {gt.name} (seed {cfg.seed})"
    else:
        dets = Detections.load(detections)
        check_detections_data(dets.meta, data, cfg.split, detections)
        source = str(detections)
    if cfg.cls_weight is not None:
        dets.meta["cls_weight"] = float(cfg.cls_weight)
    run.record_runtime(dets.boxes.device, str(dets.boxes.dtype).removeprefix("torch."))
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
            raise IouctlError(f"no arm left to compare with the baseline {base_name}: the other selected arms need "
                              "predicted IoUs, and these detections come from a model without an IoU head; select "
                              "more cls arms (e.g. methods=[greedy,soft_gaussian] or --score cls) or use detections "
                              "of iou_retina/iou_net")
    if len(dets) >= LARGE_SPLIT and cfg.analyses:
        run.console.print(escape(f"analyses={list(cfg.analyses)} cost about twice the grid itself at this size; "
                                 "analyses=[] runs the grid alone"), style="dim")
    clock.phase("load")

    # Correlations of each score with the true IoU, before NMS.
    tiou = true_iou(gt, dets)
    raw_scores = all_scores(dets)
    corr_before = correlations(tiou, raw_scores)
    matched = matched_correlations(tiou, raw_scores)  # IoU-Net's Fig. 2 protocol
    for name, c in matched.items():
        corr_before[name]["pearson_iou>0.5"] = c["pearson"]
    clock.phase("true_iou")

    t0 = time.perf_counter()
    shared = _Shared(gt, dets, tiou, raw_scores.get("fused"), list(arms), list(names), set(cfg.analyses),
                     arm_evaluator(str(cfg.eval_backend)), None)
    _warm(shared)
    clock.phase("shared")
    workers = _workers(cfg, len(arms), len(dets))
    results = []
    with run.progress() as progress:
        task = progress.add_task("NMS arms" + (f" ({workers} processes)" if workers > 1 else ""), total=len(arms))
        for res in _run_arms(shared, workers):
            results.append(res)
            progress.advance(task)
    clock.phase("arms")
    results.sort(key=lambda r: r["i"])

    rows, curves, errors, calibration = [], {}, {}, {}
    base_metrics = results[0]["metrics"]
    for name, res in zip(names, results):
        metrics = res["metrics"]
        deltas = ap_deltas(base_metrics, metrics)
        row = {"arm": name, "kept": res["kept"], **{k: metrics[k] for k in AP_KEYS},
               **{f"d{k}": deltas[k] for k in TABLE_KEYS},
               **{f"{m}_{k}_after": v[m] for k, v in res["corr_after"].items()
                  for m in ("pearson", "spearman", "kendall")},
               "seconds": res["seconds"]}
        rows.append(row)
        curves[name] = metrics["ap_per_threshold"]
        if "errors" in res:
            errors[name], calibration[name] = res["errors"], res["calibration"]
        run.log({f"{name}/{k}": row[k] for k in ("AP", "AP50", "AP75", "AP90", "dAP", "dAP90")})
    oracle = oracle_report(shared.oracle, [r["oracle"] for r in results]) if shared.oracle is not None else None
    elapsed = time.perf_counter() - t0

    summary = {"source": source, "baseline": base_name, "num_detections": len(dets), "arms": rows,
               "correlation_before_nms": corr_before, "ap_per_threshold": curves, "seconds": elapsed,
               "errors": to_jsonable({n: [e.to_dict() for e in es] for n, es in errors.items()}) if errors else None,
               "calibration": to_jsonable(calibration) if calibration else None,
               "oracle": to_jsonable(oracle.to_dict()) if oracle is not None else None,
               "workers": workers, "arm_evaluator": shared.eval_backend, "phases": None}
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
    clock.phase("outputs")
    summary["phases"] = clock.report(results)
    run.write_json("results.json", summary)  # again, with the timing of the outputs
    _print(run, rows, corr_before, base_name, elapsed)
    return summary


# ------------------------------------------------------------------------------------------------ the arms' tasks
@dataclass
class _Shared:
    """What every arm's task reads; built once and inherited by forked workers (never pickled)."""

    gt: Any
    dets: Detections
    tiou: torch.Tensor               # float64 [N] true IoU of each raw detection
    fused: torch.Tensor | None       # [N] fused score of each raw detection (None without predicted IoUs)
    arms: list
    names: list[str]
    analyses: set[str]
    eval_backend: str                # evaluate()'s backend, or ARRAYS (arm_evaluator)
    oracle: OracleInputs | None


_SHARED: _Shared | None = None  # the workers' view of it (set before the fork)


def _warm(shared: _Shared) -> None:
    """Build once, before any fork, what every arm would otherwise build for itself: the (image, class) groups of
    the raw detections and of each oracle's copy, the evaluator's index of the ground truth (and the analyses' one
    of its crowd regions), the oracle inputs."""
    if "oracle" in shared.analyses:
        shared.oracle = oracle_inputs(shared.gt, shared.dets, true_iou=shared.tiou)
        for d in shared.oracle.dets.values():
            group_ids(d)
    group_ids(shared.dets)
    if shared.eval_backend == ARRAYS:
        gt_arrays(shared.gt)
    else:
        shared.gt.coco(shared.eval_backend)
    if {"errors", "calibration", "oracle"} & shared.analyses:
        crowd_regions(shared.gt)  # the analyses' crowd index


# The arms' evaluator when eval_backend is faster-coco-eval: the same numbers bit for bit (the same loops on arrays,
# iouctl.analysis.cocoeval_arrays; tests/analysis/test_cocoeval_arrays.py), ~6x cheaper per arm at COCO scale.
ARRAYS = "cocoeval-arrays"


def arm_evaluator(backend: str) -> str:
    """What evaluates the arms for the configured ``eval_backend``: ARRAYS in place of faster-coco-eval where the
    coco_eval kernels build (else faster-coco-eval itself, after the build's one warning); pycocotools as asked."""
    if backend == "faster-coco-eval":
        from iouctl.ops import coco_eval

        if coco_eval.available():
            return ARRAYS
    return backend


def _evaluate_arm(gt: Any, out: Detections, backend: str) -> dict:
    return evaluate_arrays(gt, out) if backend == ARRAYS else evaluate(gt, out, backend=backend)


# What one worker process adds at its peak, per raw detection and fixed (measured at COCO scale, 1000 raw boxes per
# image: ~1.6 GiB per worker for 5000 images; docs/benchmarks.md): workers=0 takes no more than half the free memory.
WORKER_BYTES_PER_DET = 400
WORKER_BYTES_FIXED = 200 * 2**20


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _workers(cfg: Any, num_arms: int, num_dets: int) -> int:
    """cfg.workers, or for 0 one per available core, as many as half the free memory holds."""
    w = int(cfg.workers)
    if w == 0:
        w = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        free = _available_memory()
        if free is not None:
            w = min(w, int(0.5 * free // (WORKER_BYTES_FIXED + WORKER_BYTES_PER_DET * num_dets)))
    return max(1, min(w, num_arms))


def _run_arms(shared: _Shared, workers: int):
    """Yield each arm's result (``_arm``) as it completes: in this process, or in `workers` forked processes."""
    global _SHARED
    _SHARED = shared
    try:
        if workers == 1:
            for i in range(len(shared.arms)):
                yield _arm(i)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork: the workers inherit _SHARED without a copy; one thread each, the cores are the processes'
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(_arm_in_worker, i) for i in range(len(shared.arms))]
            try:
                for f in as_completed(futures):
                    res, ops = f.result()
                    for op, entry in ops.items():  # the run's meta.json names what its workers ran
                        for device_type, kind in entry["devices"].items():
                            _extension.record_impl(entry["library"], op, device_type, kind)
                    yield res
            except BaseException:
                pool.shutdown(cancel_futures=True)  # an arm failed (or ^C): do not run the rest first
                raise
    finally:
        _SHARED = None


def _arm_in_worker(i: int) -> tuple[dict, dict]:
    """_arm(i) in a worker process, with the ops implementations it resolved (iouctl.ops.implementations)."""
    mark = _extension.sequence()
    res = _arm(i)
    return res, _extension.implementations(since=mark)


def _arm(i: int) -> dict:
    """Arm i of the shared grid: NMS, evaluation, correlations after NMS, errors/calibration and the oracle runs
    (as the analyses ask). Returns plain, picklable results with the time of each phase."""
    sh = _SHARED
    arm, dets = sh.arms[i], sh.dets
    times: dict[str, list[float]] = {}
    t = (time.perf_counter(), time.process_time())

    def lap(phase: str) -> None:
        nonlocal t
        now = (time.perf_counter(), time.process_time())
        times[phase] = [now[0] - t[0], now[1] - t[1]]
        t = now

    kept = arm.keep(dets)
    out = kept.apply(dets)
    lap("nms")
    metrics = _evaluate_arm(sh.gt, out, sh.eval_backend)
    lap("evaluate")
    after_scores = {"cls": dets.scores[kept.index], "reported": kept.scores}
    if dets.has_ious:
        after_scores["iou"] = dets.ious[kept.index]
    # true IoU of the kept boxes as reported: recomputed where the arm moved them (box voting, fusion)
    moved = not torch.equal(out.boxes, dets.boxes[kept.index])
    tiou_out = true_iou(sh.gt, out) if moved else sh.tiou[kept.index]
    res = {"i": i, "kept": int(len(kept.index)), "metrics": metrics, "corr_after": correlations(tiou_out, after_scores)}
    if {"errors", "calibration"} & sh.analyses:
        scored = dict(after_scores, fused=sh.fused[kept.index]) if sh.fused is not None else after_scores
        found = analyze_arm(sh.gt, out, scored, true_iou=tiou_out)
        res["errors"], res["calibration"] = found["errors"], found["calibration"]
    lap("analyses")
    res["seconds"] = sum(w for w, _ in times.values())  # the arm without its oracle runs
    if sh.oracle is not None:
        res["oracle"] = oracle_row(sh.gt, sh.names[i], arm, sh.oracle, predicted=metrics)
    lap("oracle")
    res["times"] = times
    res["peak_rss_mib"] = _peak_rss_mib()
    return res


# ------------------------------------------------------------------------------------------------------ timing
def _peak_rss_mib() -> float:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Wall and CPU seconds (this process and its finished children) of the command's phases."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.t = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.perf_counter(), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def phase(self, name: str) -> None:
        now = self._now()
        self.phases[name] = {"wall_s": now[0] - self.t[0], "cpu_s": now[1] - self.t[1],
                             "peak_rss_mib": _peak_rss_mib(), "end_unix": time.time()}
        self.t = now

    def report(self, results: list[dict]) -> dict:
        """The phases, and inside "arms" each task phase summed over the arms (wall: as if serial) with the largest
        worker peak RSS."""
        per = {p: {"wall_s": sum(r["times"][p][0] for r in results), "cpu_s": sum(r["times"][p][1] for r in results)}
               for p in ARM_PHASES}
        out = dict(self.phases)
        out["arms"] = dict(out["arms"], per_arm_phase=per,
                           worker_peak_rss_mib=max((r["peak_rss_mib"] for r in results), default=0.0))
        return to_jsonable(out)


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


def run(cfg: Any, run: Any, detections: Path | None = None) -> dict:
    """`iouctl nms-ablate` on a composed config (conf/nms_ablate.yaml) in an open run: the baseline `cfg.nms` and
    every arm of the grid on `detections` (None: run=<dir> or the newest eval/train run's,
    iouctl.engine.inputs.ablation_detections; with synthetic=true, detections synthesized from the ground truth)."""
    from iouctl import config
    from iouctl.engine.inputs import ablation_detections

    if cfg.synthetic:
        detections = None
    elif detections is None:
        detections = ablation_detections(cfg)
    grid = [config.instantiate(arm) for arm in config.grid_arms(cfg)]
    return nms_ablate(cfg, run, config.instantiate(cfg.data), config.instantiate(cfg.nms), grid, detections)
