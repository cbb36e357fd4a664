"""`iouctl demo`: the study on the built-in dataset in one run directory, ending in a summary and report.md.

The steps (dataset; iou_net's training + evaluation, NMS ablation and refinement; the IoU-aware RetinaNet's training
with its own inference and its cls vs fused rankings, beside RetinaNet's with the same schedule; the pooling
benchmark) compose their own configs and call the engine functions the single commands call
(iouctl.engine.train.run, ...), each in its own child run (a subfolder); every number of the report is read back
from them.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from iouctl.analysis import TABLE_KEYS, fmt_ap, fmt_delta
from iouctl.engine.inputs import RESTORED
from iouctl.errors import ConfigError

STEPS = ("data", "train", "nms-ablate", "refine", "train-retina", "train-iou-retina", "nms-iou-retina", "bench-pool")
# the train step whose run each step continues from (its detections, its model)
NEEDS = {"nms-ablate": "train", "refine": "train", "nms-iou-retina": "train-iou-retina"}
FOLDERS = {"train": "train", "nms-ablate": "nms_ablate", "refine": "refine", "train-retina": "train_retina",
           "train-iou-retina": "train_iou_retina", "nms-iou-retina": "nms_iou_retina", "bench-pool": "bench_pool"}
COMMANDS = {"train": "train", "nms-ablate": "nms-ablate", "refine": "refine", "train-retina": "train",
            "train-iou-retina": "train", "nms-iou-retina": "nms-ablate", "bench-pool": "bench-pool"}
AP_COLUMNS = ("AP", "AP50", "AP75", "AP90")
SHARED = ("data", "paths", "logger", "seed")  # the demo's own overrides of these apply to every step


def check_steps(steps: list[str]) -> None:
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown demo step(s) {', '.join(map(repr, unknown))}; valid: {', '.join(STEPS)}")
    for step, needed in NEEDS.items():
        if step in steps and needed not in steps[:steps.index(step)]:
            raise ConfigError(f"demo step {step!r} needs the {needed!r} step before it (it uses the model that step "
                              f"trains)")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """A step's composed config, with the overrides and group choices it was composed from (what its child run
    records, so that later commands restore it like any run)."""

    cfg: Any
    overrides: list[str]
    choices: dict


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def plan(cfg: Any, overrides: list[str]) -> dict[str, StepConfig]:
    """Compose the config of every step of `cfg.steps` (conf/demo.yaml) from the step's own overrides and the demo's
    `overrides` of SHARED keys; a bad override of any step is one line (ConfigError) before anything runs."""
    from iouctl import config
    from iouctl.engine.compose import QUICK_BENCH, compose

    steps = list(cfg.steps)
    check_steps(steps)
    shared = [o for o in overrides if _key(o).split(".")[0] in SHARED]

    def step(command: str, step_overrides: list[str]) -> StepConfig:
        choices: dict = {}
        return StepConfig(compose(command, step_overrides, choices=choices), step_overrides, choices)

    def restore(command: str, trained: StepConfig, groups: tuple, given: list[str]) -> list[str]:
        """What the trained step's run will record, restored as later commands restore it (overrides_restoring)."""
        return config.overrides_restoring(command, config.to_dict(trained.cfg), groups, given, trained.choices,
                                          trained.overrides)

    # the two RetinaNets train with the same schedule: retina vs iou_retina compares like with like
    trains = {"train": [*cfg.train_overrides],
              "train-retina": [*cfg.single_stage_overrides, *cfg.retina_overrides],
              "train-iou-retina": [*cfg.single_stage_overrides, *cfg.iou_retina_overrides]}
    ablations = {"nms-ablate": cfg.nms_ablate_overrides, "nms-iou-retina": cfg.iou_retina_nms_overrides}
    out: dict[str, StepConfig] = {}
    for name in steps:
        if name in trains:
            out[name] = step("train", [*trains[name], *shared])
        elif name == "refine":
            given = [*cfg.refine_overrides, *shared]
            out[name] = step("refine", [*restore("refine", out["train"], RESTORED, given), *given])
        elif name in ablations:
            given = [*ablations[name], *shared]
            same_data = [o for o in restore("nms-ablate", out[NEEDS[name]], ("data",), given)
                         if _key(o).split(".")[0] == "data"]  # the ground truth of the trained model's data
            out[name] = step("nms-ablate", [*same_data, *given])
        elif name == "bench-pool":
            no_data = [o for o in shared if not _key(o).startswith("data")]
            out[name] = step("bench-pool", [*QUICK_BENCH, *cfg.bench_pool_overrides, *no_data])
    return out


def run(cfg: Any, run: Any) -> dict:
    """`iouctl demo` on a composed config (conf/demo.yaml) in an open run: each step of cfg.steps composes its config
    (:func:`plan`, with the demo's recorded overrides of SHARED keys) and calls its command's engine function in a
    child run (a subfolder that the run finders see as a run of that command); then the summary and report.md."""
    from iouctl import config
    from iouctl.runs import read_recorded

    steps = plan(cfg, read_recorded(run.dir).overrides)
    return demo(cfg, run, config.instantiate(cfg.data), {name: _action(name, steps) for name in steps})


def _action(name: str, steps: dict[str, StepConfig]) -> Callable[[Any], dict]:
    """The step `name` run in a child run: record its config, call its command's engine function."""
    from iouctl import config

    def act(child: Any) -> dict:
        s = steps[name]
        child.record_config(config.to_yaml(s.cfg), s.overrides, s.choices)  # a run later commands can restore
        trained = child.dir.parent / FOLDERS[NEEDS[name]] if name in NEEDS else None
        return STEP_RUNS[COMMANDS[name]](s.cfg, child, trained)

    return act


def _train(cfg: Any, child: Any, trained: Path | None) -> dict:
    from iouctl.engine import train

    return {"model": str(cfg.name), **train.run(cfg, child)}


def _nms_ablate(cfg: Any, child: Any, trained: Path) -> dict:
    from iouctl.engine import nms_ablate
    from iouctl.runs import detections_file

    return nms_ablate.run(cfg, child, detections=trained / detections_file(str(cfg.split)))


def _refine(cfg: Any, child: Any, trained: Path) -> dict:
    from iouctl.engine import refine
    from iouctl.engine.train import CHECKPOINT
    from iouctl.runs import Source, detections_file

    dets = trained / detections_file(str(cfg.split))
    return refine.run(cfg, child, Source(trained, trained, trained / CHECKPOINT, dets if dets.is_file() else None))


def _bench_pool(cfg: Any, child: Any, trained: Path | None) -> list[dict]:
    from iouctl.engine import bench_pool

    return bench_pool.run(cfg, child)


STEP_RUNS = {"train": _train, "nms-ablate": _nms_ablate, "refine": _refine, "bench-pool": _bench_pool}


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
            summary["steps"][step] = actions[step](run.child(FOLDERS[step], COMMANDS[step]))
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


def _retina_lines(steps: dict) -> list[str]:
    """iou_retina with its own inference, its cls and fused arms on the same detections, and retina beside it."""
    iou = steps["train-iou-retina"]
    ev, base, ab = iou["eval"], steps.get("train-retina"), steps.get("nms-iou-retina")
    same = f"; {base['model']} with the same schedule" if base else ""
    out = [f"{iou['model']} trained for {iou['iterations']} iterations{same}; each evaluated on the val split with "
           f"its own inference. A short schedule, sized for the demo: what it costs in AP, and the figures at the "
           f"train default: docs/benchmarks.md.", "", "| model | NMS | " + " | ".join(AP_COLUMNS) + " |",
           "|---|---|" + "---|" * len(AP_COLUMNS)]

    def row(model: str, nms: str, m: dict) -> str:
        return f"| {model} | {nms} | " + " | ".join(fmt_ap(m[k]) for k in AP_COLUMNS) + " |"

    if base:
        out.append(row(base["model"], f"`{base['eval']['nms']}` (its own)", base["eval"]["metrics"]))
    out.append(row(iou["model"], f"`{ev['nms']}` (its own)", ev["metrics"]))
    if ab:
        out += [row(iou["model"], f"`{r['arm']}`", r) for r in ab["arms"] if r["arm"] != ev["nms"]]
    out.append("")
    if ab and len(ab["arms"]) > 1:
        first, *rest = ab["arms"]
        out += [f"On the same detections, `{r['arm']}` vs `{first['arm']}`: " + ", ".join(
            f"d{k} {fmt_delta(r[k] - first[k])}" for k in AP_COLUMNS) + "." for r in rest]
    if base:
        out.append(f"{iou['model']} (its own inference) vs {base['model']}: " + ", ".join(
            f"d{k} {fmt_delta(ev['metrics'][k] - base['eval']['metrics'][k])}" for k in AP_COLUMNS) + ".")
    else:
        out.append("retina was not trained (add the `train-retina` step for retina vs iou_retina, same schedule).")
    out += ["", f"Correlation with the true IoU of {iou['model']}'s raw detections (last column: the "
            f"{ev['num_matched']} with true IoU > 0.5):", "",
            *_corr_rows(ev["correlations"], ev["correlations_iou>0.5"]), "", "![score vs true IoU](train_iou_retina/plots/score_vs_true_iou_val.png)"]
    return out


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
    if "train-iou-retina" in steps:
        lines += ["## IoU-aware RetinaNet: cls vs fused inference, retina vs iou_retina (AP in %)", "",
                  *_retina_lines(steps), ""]
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
    if "train-iou-retina" in steps:
        iou = steps["train-iou-retina"]
        arms = steps["nms-iou-retina"]["arms"] if "nms-iou-retina" in steps else []
        ranked = [f"{r['arm']} AP {fmt_ap(r['AP'])} AP90 {fmt_ap(r['AP90'])}" for r in arms]
        base = steps.get("train-retina")
        run.console.print(escape(
            f"{iou['model']} ({iou['iterations']} iterations) after {iou['eval']['nms']}: AP "
            f"{fmt_ap(iou['eval']['metrics']['AP'])}" + (f"; on its detections: {', '.join(ranked)}" if ranked else "")
            + (f"; {base['model']} after {base['eval']['nms']}: AP {fmt_ap(base['eval']['metrics']['AP'])}"
               if base else "")))
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
