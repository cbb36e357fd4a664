"""The `iouctl` command line. Each command: parse, compose the config, open a run, call one plain function."""
from __future__ import annotations

from enum import Enum
from typing import List, Optional

import typer

from iouctl.cli.common import Overrides, PrintCfg, run_experiment, user_errors
from iouctl.cli.data import data_app

app = typer.Typer(
    name="iouctl",
    help="Experiments on localization confidence in object detection: IoU-Net and the IoU-aware RetinaNet.\n\n"
         "Every experiment command takes Hydra overrides (key=value, group=option) and --cfg to show the config. "
         "Runs land in runs/<command>/<timestamp>_<name>/.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


@app.command()
def train(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """Train a detector (model=retina|iou_retina|faster_rcnn|iou_net) and evaluate it at the end."""
    _needs_detector("train", overrides, cfg)


@app.command("eval")
def evaluate(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """Evaluate a trained run (run=<dir> or checkpoint=<file>): raw detections, NMS, AP table, correlations."""
    _needs_detector("eval", overrides, cfg)


def _needs_detector(command: str, overrides: Optional[List[str]], print_cfg: bool) -> None:
    """Commands whose machinery is the detectors: the config is checked, then building the model stops with one
    clear line, before any run directory is made."""
    from iouctl.cli.common import compose, print_config

    with user_errors():
        conf = compose(command, overrides, allow_missing=print_cfg)
        if print_cfg:
            print_config(conf)
            return
        from iouctl import config

        config.instantiate(conf.model, num_classes=1)


class Score(str, Enum):
    cls = "cls"
    iou = "iou"
    fused = "fused"


class Method(str, Enum):
    greedy = "greedy"
    iou_guided = "iou-guided"
    soft_linear = "soft-linear"
    soft_gaussian = "soft-gaussian"


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

    def body(conf, run):
        from iouctl.engine.nms_ablate import nms_ablate as run_ablation

        return run_ablation(conf, run, *_ablation_inputs(conf))

    run_experiment("nms-ablate", overrides, cfg, body, extra_overrides=extra)


def _ablation_inputs(conf) -> tuple:
    """(data, baseline NMS arm, raw detections file or None for synthetic) of an nms_ablate config."""
    from iouctl import config
    from iouctl.errors import IouctlError
    from iouctl.runs import find_run_file

    detections = None
    if not conf.synthetic:
        try:
            detections = find_run_file(conf.run, conf.paths.runs_dir, ["eval", "train"], f"detections/{conf.split}.npz")
        except IouctlError as e:
            raise IouctlError(f"{e}, or use --synthetic") from None
    return config.instantiate(conf.data), config.instantiate(conf.nms), detections


@app.command()
def refine(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """IoU-guided box refinement (IoU-Net Alg. 2) of an iou_net run's detections, with AP before/after."""
    _needs_detector("refine", overrides, cfg)


# `bench-pool --quick` and the demo's pooling step: seconds, not minutes, on a 2-core CPU.
QUICK_BENCH = ["feature_shape=[1,64,50,76]", "num_rois=[128]", "roi_sizes=[mixed,32,128]", "repeats=3", "warmup=1"]


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
    extra = [] if impl is Impl.all else [f"impls=[{impl.value}]"]
    if quick:
        extra += QUICK_BENCH

    def body(conf, run):
        from iouctl.engine.bench_pool import bench_pool as run_bench

        return run_bench(conf, run)

    run_experiment("bench-pool", overrides, cfg, body, extra_overrides=extra)


@app.command()
def demo(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """The study on the built-in dataset in one command (CPU): dataset, NMS ablation, pooling bench, report.md."""
    shared = [o for o in (overrides or []) if _key(o).split(".")[0] in ("data", "paths", "logger", "seed")]
    steps: dict = {}
    if not cfg:
        with user_errors():  # a bad override of a step fails before any run directory is made
            from iouctl.cli.common import compose

            steps["ablate"] = compose("nms-ablate", ["synthetic=true", *shared])
            steps["bench"] = compose("bench-pool", [*QUICK_BENCH, *[o for o in shared if not _key(o).startswith("data")]])

    def body(conf, run):
        from iouctl import config
        from iouctl.engine.demo import demo as run_demo

        ablate = steps["ablate"]
        return run_demo(conf, run, config.instantiate(conf.data), (ablate, *_ablation_inputs(ablate)), steps["bench"])

    run_experiment("demo", overrides, cfg, body)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def main() -> None:
    app()
