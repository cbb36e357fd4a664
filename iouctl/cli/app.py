"""The `iouctl` command line. Each command: parse, compose the config, open a run, call one plain function."""
from __future__ import annotations

from enum import Enum
from typing import List, Optional

import typer

from iouctl.cli.common import OneLineErrors, Overrides, PrintCfg, run_experiment, user_errors
from iouctl.cli.data import data_app

app = typer.Typer(
    name="iouctl",
    help="Experiments on localization confidence in object detection: IoU-Net and the IoU-aware RetinaNet.\n\n"
         "Every experiment command takes Hydra overrides (key=value, group=option) and --cfg to show the config. "
         "Runs land in runs/<command>/<timestamp>_<name>/.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # usage errors (unknown flag, bad choice) are one line too
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


@app.command()
def train(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """Train a detector (model=retina|iou_retina|faster_rcnn|iou_net), then evaluate it on the val split.
    resume=true continues run=<dir>, or the newest train run with this config's model, data and schedule."""
    def body(conf, run, found):
        from iouctl.engine.train import run as train_run

        return train_run(conf, run, resume=found.checkpoint)

    _command("train", overrides, cfg, body)


@app.command("eval")
def evaluate(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """Evaluate a trained run (run=<dir>, default the latest) or checkpoint=<file>: raw detections, NMS, AP table,
    correlations. A run's own model, data and pool settings are used unless overridden."""
    def body(conf, run, found):
        from iouctl.engine.evaluate import run as evaluate_run

        return evaluate_run(conf, run, checkpoint=found.checkpoint)

    _command("eval", overrides, cfg, body)


def _command(command: str, overrides: Optional[List[str]], print_cfg: bool, body, extra: Optional[List[str]] = None):
    """The shape of every experiment command: find what it continues from (iouctl.engine.inputs: a missing or unfit
    run fails before a run directory is made), compose its config with the overrides restoring that run, open the
    run and call `body(cfg, run, found)`, one engine function."""
    from iouctl.engine.inputs import Found, find

    given = [*(extra or []), *(overrides or [])]
    found = Found()
    if not print_cfg:
        with user_errors():
            found = find(command, given)
    run_experiment(command, overrides, print_cfg, lambda conf, run: body(conf, run, found),
                   extra_overrides=[*(extra or []), *found.overrides])


class Score(str, Enum):
    cls = "cls"
    iou = "iou"
    fused = "fused"


def _nms_options() -> list[str]:
    from iouctl.config import group_options

    return [o.replace("_", "-") for o in group_options("nms")]


Method = Enum("Method", {o.replace("-", "_"): o for o in _nms_options()}, type=str)  # the options of conf/nms/


@app.command("nms-ablate")
def nms_ablate(
    overrides: Optional[List[str]] = Overrides,
    score: Optional[Score] = typer.Option(None, "--score", help="Ranking score; alone, iou means IoU-guided NMS."),
    nms: Optional[Method] = typer.Option(None, "--nms", help="NMS method (default: the whole grid of the config)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Use detections synthesized from the ground truth."),
    cfg: bool = PrintCfg,
) -> None:
    """Compare NMS variants on cached raw detections: AP at strict IoU thresholds and score-vs-IoU correlations."""
    extra = []
    if score is not None:
        extra.append(f"scores=[{score.value}]")
        if nms is None:
            extra.append(f"methods=[{'iou-guided' if score is Score.iou else 'greedy'}]")
    if nms is not None:
        extra.append(f"methods=[{nms.value}]")
    if synthetic:
        extra.append("synthetic=true")

    def body(conf, run, found):
        from iouctl.engine.nms_ablate import run as ablate_run

        return ablate_run(conf, run, detections=found.detections)

    _command("nms-ablate", overrides, cfg, body, extra)


@app.command()
def refine(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """IoU-guided box refinement (IoU-Net Alg. 2) of an iou_net run's detections (run=<train or eval run>, default
    the latest): IoU-guided NMS, gradient ascent on the predicted IoU, AP / true IoU / predicted IoU before and after."""
    def body(conf, run, found):
        from iouctl.engine.refine import run as refine_run

        return refine_run(conf, run, source=found.source)

    _command("refine", overrides, cfg, body)


class Impl(str, Enum):
    all = "all"
    prroi = "prroi"
    prroi_reference = "prroi_reference"
    roi_align = "roi_align"
    roi_align_adaptive = "roi_align_adaptive"
    roi_pool = "roi_pool"


@app.command("bench-pool")
def bench_pool(
    overrides: Optional[List[str]] = Overrides,
    impl: Impl = typer.Option(Impl.all, "--impl", help="Which pooling op to time (roi_align is always the baseline)."),
    quick: bool = typer.Option(False, "--quick", help="Small shapes and few repeats: a smoke run in seconds."),
    cfg: bool = PrintCfg,
) -> None:
    """Time RoI pooling ops (forward, forward+backward) over RoI counts and sizes; ratios to roi_align."""
    from iouctl.engine.compose import QUICK_BENCH

    extra = [] if impl is Impl.all else [f"impls=[{impl.value}]"]
    if quick:
        extra += QUICK_BENCH

    def body(conf, run):
        from iouctl.engine.bench_pool import run as bench_run

        return bench_run(conf, run)

    run_experiment("bench-pool", overrides, cfg, body, extra_overrides=extra)


@app.command("runs")
def runs(
    command: Optional[str] = typer.Argument(None, metavar="[COMMAND]", show_default=False,
                                            help="Only the runs of this command (train, eval, nms-ablate, ...)."),
    limit: int = typer.Option(20, "--limit", "-n", help="Show the newest N runs."),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", show_default=False,
                                           help="Where the runs are (default: paths.runs_dir, i.e. "
                                                "$IOUCTL_RUNS_DIR or ./runs)."),
) -> None:
    """List runs, newest first: folder, command, name, real state (a RUNNING run whose process is gone is KILLED;
    one started on another host RUNNING?), start time, duration, val AP."""
    with user_errors():
        import sys

        from rich.console import Console

        from iouctl import config
        from iouctl.cli.common import err_console
        from iouctl.engine.compose import compose
        from iouctl.errors import IouctlError
        from iouctl.runs import list_runs, runs_table

        if command is not None and command not in config.COMMAND_CONFIGS:
            raise IouctlError(f"unknown command {command!r}; valid: {', '.join(config.COMMAND_CONFIGS)}")
        if limit < 1:
            raise IouctlError(f"--limit {limit}: give a number of runs >= 1")
        base = runs_dir or str(compose("data", [], allow_missing=True).paths.runs_dir)
        found = list_runs(base, [command] if command else None, limit)
        if not found:
            err_console.print(f"no {command + ' ' if command else ''}runs under {base}", markup=False)
            return
        # piped (grep, awk): one line per run, however long the folder names
        Console(width=None if sys.stdout.isatty() else 10_000).print(runs_table(found))


@app.command()
def demo(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """The whole study on the built-in dataset in one command (CPU, minutes): dataset, train + evaluate iou_net,
    NMS ablation on its detections, box refinement; train + evaluate iou_retina with its own inference, its cls vs
    fused rankings (retina beside it: the train-retina step); a short pooling benchmark; summary table and report.md."""
    if not cfg:
        with user_errors():  # a bad override of any step fails before any run directory is made
            from iouctl.engine.compose import compose
            from iouctl.engine.demo import plan

            plan(compose("demo", overrides), overrides or [])

    def body(conf, run):
        from iouctl.engine.demo import run as demo_run

        return demo_run(conf, run)

    run_experiment("demo", overrides, cfg, body)


def main() -> None:
    app()
