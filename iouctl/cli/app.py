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
    found: dict = {}
    if not cfg:
        with user_errors():  # the run to resume is settled before a run directory is made
            found["resume"] = _resume_checkpoint(overrides)

    def body(conf, run):
        ckpt = found["resume"]
        if ckpt is not None:  # resumed_from: the run this one continues (`iouctl runs` shows it as resumed)
            src = ckpt.parent.parent
            run.update_meta(resume_checkpoint=str(ckpt),
                            resumed_from=str(src) if (src / "meta.json").is_file() else None)
        return _train_run(conf, run, ckpt)

    run_experiment("train", overrides, cfg, body)


# What a run to resume must share with the composed config (the rest, e.g. device, num_workers, eval_every, nms,
# logger, may change): everything that decides the weights at a given iteration.
RESUME_MATCH = ("model", "data", "augment", "pool", "optim", "schedule", "seed", "batch_size", "clip_grad_norm", "amp")
# threads and when images are opened: same data; the post-processing of the model's detections: same weights
RESUME_IGNORED = ("data.workers", "data.check_images", "model.inference", "model.cls_weight")


def _resume_checkpoint(overrides: Optional[List[str]]):
    """The checkpoint `iouctl train resume=true` continues from (None without resume): run=<dir>'s, or the newest
    train run's whose config matches at RESUME_MATCH; a run whose process is alive is refused."""
    from iouctl.cli.common import compose

    conf = compose("train", overrides)
    if not conf.resume:
        return None
    import yaml

    from iouctl import config
    from iouctl.engine.train import CHECKPOINT
    from iouctl.runs import find_resume_run, find_run_file, refuse_if_running

    if conf.run is not None:
        ckpt = find_run_file(conf.run, conf.paths.runs_dir, ["train"], CHECKPOINT, status=None)
        refuse_if_running(ckpt.parent.parent)  # run=<dir>/checkpoints/last.pt; for another file: no run, no-op
        return ckpt
    wanted = yaml.safe_load(config.to_yaml(conf))  # as config.yaml records it: values compare like for like
    run = find_resume_run(conf.paths.runs_dir, "train", CHECKPOINT, wanted, RESUME_MATCH, RESUME_IGNORED)
    return run / CHECKPOINT


def _train_run(conf, run, resume=None) -> dict:
    """Build data, model and optimizer from a train config and train (then evaluate) into `run`."""
    from iouctl import config
    from iouctl.engine.train import train as run_train

    data, model, evaluate_fn, *_ = _detector_inputs(conf, run)
    return run_train(conf, run, data, model, config.instantiate(conf.optim), resume, evaluate_fn,
                     augment=config.instantiate(conf.augment))


@app.command("eval")
def evaluate(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """Evaluate a trained run (run=<dir>, default the latest) or checkpoint=<file>: raw detections, NMS, AP table,
    correlations. A run's own model, data and pool settings are used unless overridden."""
    found: dict = {}
    if not cfg:
        with user_errors():  # a missing run or checkpoint fails before a run directory is made
            found["checkpoint"], found["extra"] = _train_run_overrides(overrides)

    def body(conf, run):
        from iouctl.runs import write_source

        _, model, evaluate_fn, *_ = _detector_inputs(conf, run)
        state = _load_weights(model, found["checkpoint"], conf)
        write_source(run, found["checkpoint"])  # what refine run=<this> reads
        return evaluate_fn(model, step=int(state.get("iteration", 0)), split=str(conf.split))

    run_experiment("eval", overrides, cfg, body, extra_overrides=found.get("extra"))


RESTORED = ("model", "data", "pool")  # what eval and refine take from the train run


def _compose_for_lookup(command: str, overrides: Optional[List[str]]):
    """The command's config for finding its run, without the user's overrides of the groups the train run restores
    (those are checked later, against the run's own model: model.box_score_thresh is valid for iou_net only)."""
    from iouctl.cli.common import compose

    kept = [o for o in overrides or [] if "." not in _key(o) or _key(o).split(".", 1)[0] not in RESTORED]
    return compose(command, kept, allow_missing=True)  # data=coco without its data.root: the run restores it


def _restoring(command: str, run_dir, groups, overrides: Optional[List[str]]) -> List[str]:
    """Overrides that bring `groups` of the run in `run_dir` back into `command`'s config, from its recorded group
    choices, overrides and config (config.overrides_restoring); the user's `overrides` keep what they set."""
    from iouctl import config
    from iouctl.runs import read_recorded

    rec = read_recorded(run_dir)
    return config.overrides_restoring(command, rec.config, groups, overrides or [], rec.choices, rec.overrides)


def _train_run_overrides(overrides: Optional[List[str]]) -> tuple:
    """(checkpoint file, overrides that restore the train run's model/data/pool) for `iouctl eval`."""
    from pathlib import Path

    from iouctl.engine.train import CHECKPOINT
    from iouctl.errors import IouctlError
    from iouctl.runs import find_run_file

    conf = _compose_for_lookup("eval", overrides)
    if conf.checkpoint is not None:
        ckpt = Path(conf.checkpoint).expanduser()
        if not ckpt.is_file():
            raise IouctlError(f"checkpoint={conf.checkpoint}: no such file")
        return ckpt, []
    ckpt = find_run_file(conf.run, conf.paths.runs_dir, ["train"], CHECKPOINT)
    return ckpt, _restoring("eval", ckpt.parent.parent, RESTORED, overrides)


def _load_weights(model, checkpoint, conf) -> dict:
    """Load a train checkpoint into `model`; a mismatch is one line. Returns the checkpoint."""
    from iouctl.engine.train import load_checkpoint, load_model_state

    state = load_checkpoint(checkpoint)
    load_model_state(model, state, checkpoint, str(conf.model._target_), conf.model)
    return state


def _detector_inputs(conf, run) -> tuple:
    """(data (prepared), model, evaluation closure (inference, the configured NMS, AP), inference closure, device,
    category map) for train, eval and refine."""
    from iouctl import config
    import torch

    from iouctl.engine.evaluate import evaluate_detections, predict
    from iouctl.engine.prepare import dataset_record, ground_truth, prepare_dataset
    from iouctl.engine.train import CategoryMap, resolve_device

    data = config.instantiate(conf.data)
    with run.progress(transient=True) as progress:
        prepare_dataset(data, progress)
    from iouctl.engine.sizes import resolve_auto_sizes
    conf = resolve_auto_sizes(conf, data, run)  # model sizes `auto` -> values from the train split, in config.yaml
    torch.manual_seed(int(conf.seed))  # the initial weights are part of the experiment
    model = config.instantiate_model(conf.model, num_classes=data.num_classes, pool=config.instantiate(conf.pool))
    nms = config.instantiate(conf.nms)
    device = resolve_device(str(conf.device))
    amp = bool(conf.get("amp", False)) and device.type == "cuda"  # as engine.train decides it: autocast on CUDA only
    run.record_runtime(device, "float16 autocast" if amp else "float32")
    cats = CategoryMap(data.categories)

    def predict_fn(net, split="val"):
        return predict(net.to(device), data.dataset(split), cats.ids, device, int(conf.batch_size),
                       int(conf.num_workers), run, {"model": conf.model._target_, "split": split,
                                                    "data": dataset_record(data, split),
                                                    "cls_weight": float(conf.model.cls_weight)})

    gts: dict = {}  # one ground truth per split: its COCO index is built once for all the run's evaluations

    def evaluate_fn(net, step=None, split="val"):
        if split not in gts:
            gts[split] = ground_truth(data, split)
        return evaluate_detections(run, predict_fn(net, split), gts[split], nms, str(conf.eval_backend), split, step)

    return data, model, evaluate_fn, predict_fn, device, cats


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
    found: dict = {}
    if not cfg:
        with user_errors():  # a missing run fails before a run directory is made
            found["detections"], found["extra"] = _detections_run_overrides([*extra, *(overrides or [])])

    def body(conf, run):
        from iouctl import config
        from iouctl.engine.nms_ablate import nms_ablate as run_ablation

        grid = [config.instantiate(arm) for arm in config.grid_arms(conf)]
        return run_ablation(conf, run, config.instantiate(conf.data), config.instantiate(conf.nms), grid,
                            found["detections"])

    run_experiment("nms-ablate", overrides, cfg, body, extra_overrides=[*extra, *found.get("extra", [])])


def _detections_run_overrides(overrides: List[str]) -> tuple:
    """(raw detections file or None for synthetic ones, overrides restoring the data config of the run that made
    them) for `iouctl nms-ablate`: the detections are scored against their own dataset unless data is overridden."""
    from pathlib import Path

    from iouctl.cli.common import compose
    from iouctl.errors import IouctlError
    from iouctl.runs import detections_file, find_run_file

    conf = _compose_for_lookup("nms-ablate", overrides)
    if conf.synthetic:
        return None, []
    relpath = detections_file(str(conf.split))
    try:
        detections = find_run_file(conf.run, conf.paths.runs_dir, ["eval", "train"], relpath)
    except IouctlError as e:
        compose("nms-ablate", overrides)  # no run to restore data from: a value still missing is the first error
        raise IouctlError(f"{e}, or use --synthetic") from None
    made_by = detections.parents[len(Path(relpath).parts) - 1]
    if not (made_by / "config.yaml").is_file():  # a detections file given directly, outside any run: the data given
        return detections, []
    return detections, _restoring("nms-ablate", made_by, ["data"], overrides)


@app.command()
def refine(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """IoU-guided box refinement (IoU-Net Alg. 2) of an iou_net run's detections (run=<train or eval run>, default
    the latest): IoU-guided NMS, gradient ascent on the predicted IoU, AP / true IoU / predicted IoU before and after."""
    found: dict = {}
    if not cfg:
        with user_errors():  # a missing or unsuitable run fails before a run directory is made
            from iouctl.engine.refine import FIND_REFINABLE, check_refinable
            from iouctl.engine.train import CHECKPOINT
            from iouctl.runs import find_model_run, read_recorded

            conf = _compose_for_lookup("refine", overrides)
            source = find_model_run(conf.run, str(conf.paths.runs_dir), CHECKPOINT, str(conf.split), **FIND_REFINABLE)
            check_refinable(source.run, read_recorded(source.train_run).config)
            found["checkpoint"], found["detections"] = source.checkpoint, source.detections
            # the run's own record: an eval run's data may differ from its train run's
            found["extra"] = _restoring("refine", source.run, RESTORED, overrides)

    def body(conf, run):
        return _refine_run(conf, run, found["checkpoint"], found["detections"])

    run_experiment("refine", overrides, cfg, body, extra_overrides=found.get("extra"))


def _refine_run(conf, run, checkpoint, detections):
    """Refine with the model of `checkpoint` on cached raw `detections` (None: run inference first)."""
    from iouctl import config
    from iouctl.engine.refine import refine as run_refine
    from iouctl.runs import write_source

    data, model, _, predict_fn, device, cats = _detector_inputs(conf, run)
    _load_weights(model, checkpoint, conf)
    write_source(run, checkpoint)
    return run_refine(conf, run, data, model, config.instantiate(conf.refiner), config.instantiate(conf.nms),
                      cats.ids, device, detections, lambda: predict_fn(model, str(conf.split)))


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
        from iouctl.cli.common import compose, err_console
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
    NMS ablation on its detections, box refinement, a short pooling benchmark; summary table and report.md."""
    shared = [o for o in (overrides or []) if _key(o).split(".")[0] in ("data", "paths", "logger", "seed")]
    steps: dict = {}
    if not cfg:
        with user_errors():  # a bad override of any step fails before any run directory is made
            from iouctl import config
            from iouctl.cli.common import compose
            from iouctl.engine.demo import check_steps

            conf = compose("demo", overrides)
            check_steps(list(conf.steps))
            train_overrides, train_choices = [*conf.train_overrides, *shared], {}
            steps["train"] = compose("train", train_overrides, choices=train_choices)
            steps["train record"] = (train_overrides, train_choices)  # what the train step records, as runs do
            restore = config.overrides_restoring("refine", config.to_dict(steps["train"]), RESTORED,
                                                 [*conf.refine_overrides, *shared], train_choices, train_overrides)
            steps["refine"] = compose("refine", [*restore, *conf.refine_overrides, *shared])
            same_data = [o for o in restore if _key(o).split(".")[0] == "data"]  # the GT of the trained model's data
            steps["ablate"] = compose("nms-ablate", [*same_data, *conf.nms_ablate_overrides, *shared])
            no_data = [o for o in shared if not _key(o).startswith("data")]
            steps["bench"] = compose("bench-pool", [*QUICK_BENCH, *conf.bench_pool_overrides, *no_data])

    def body(conf, run):
        from iouctl import config
        from iouctl.engine.bench_pool import bench_pool as run_bench
        from iouctl.engine.demo import demo as run_demo
        from iouctl.engine.nms_ablate import nms_ablate as run_ablation
        from iouctl.engine.train import CHECKPOINT
        from iouctl.runs import detections_file

        trained: dict = {}

        def train_step(child):
            tconf = steps["train"]
            child.record_config(config.to_yaml(tconf), *steps["train record"])  # a run refine/eval can restore
            result = _train_run(tconf, child)
            trained["dir"] = child.dir
            return {"model": str(tconf.name), **result}

        def ablate_step(child):
            aconf = steps["ablate"]
            grid = [config.instantiate(arm) for arm in config.grid_arms(aconf)]
            return run_ablation(aconf, child, config.instantiate(aconf.data), config.instantiate(aconf.nms), grid,
                                trained["dir"] / detections_file(str(aconf.split)))

        def refine_step(child):
            dets = trained["dir"] / detections_file(str(steps["refine"].split))
            return _refine_run(steps["refine"], child, trained["dir"] / CHECKPOINT, dets if dets.is_file() else None)

        actions = {"train": train_step, "nms-ablate": ablate_step, "refine": refine_step,
                   "bench-pool": lambda child: run_bench(steps["bench"], child)}
        return run_demo(conf, run, config.instantiate(conf.data), actions)

    run_experiment("demo", overrides, cfg, body)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def main() -> None:
    app()
