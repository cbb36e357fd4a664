"""What a command continues from, found and checked before its run folder is made: the checkpoint train resumes, the
train run eval evaluates, the detections nms-ablate scores, the run refine refines; and the overrides that restore
that run's model, data and pool settings from what it recorded (iouctl.runs.read_recorded,
iouctl.config.overrides_restoring).

`find(command, overrides)` is the one entry point (the CLI calls it before opening the run); the engine's run
functions call the per-command functions on their composed config when given nothing.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from iouctl.engine.compose import compose, override_key

RESTORED = ("model", "data", "pool")  # what eval and refine take from the train run

# What a run to resume must share with the composed config (the rest, e.g. device, num_workers, eval_every, nms,
# logger, may change): everything that decides the weights at a given iteration.
RESUME_MATCH = ("model", "data", "augment", "pool", "optim", "schedule", "seed", "batch_size", "clip_grad_norm", "amp")
# threads and when images are opened: same data; the post-processing of the model's detections: same weights
RESUME_IGNORED = ("data.workers", "data.check_images", "model.inference", "model.cls_weight")


@dataclasses.dataclass(frozen=True)
class Found:
    """What `find` found for a command: `overrides` restoring the run it continues from (applied before the user's),
    and one of `checkpoint` (train: to resume; eval: to evaluate), `detections` (nms-ablate; None: synthetic) or
    `source` (refine: iouctl.runs.Source)."""

    overrides: list[str] = dataclasses.field(default_factory=list)
    checkpoint: Optional[Path] = None
    detections: Optional[Path] = None
    source: Any = None


def find(command: str, overrides: Optional[Sequence[str]]) -> Found:
    """The inputs of `command` given the user's `overrides`; one line (IouctlError) when they are missing or unfit.
    Commands that continue from nothing get an empty Found."""
    finder: dict[str, Callable[[list[str]], Found]] = {
        "train": _for_train, "eval": _for_eval, "nms-ablate": _for_nms_ablate, "refine": _for_refine}
    return finder[command](list(overrides or [])) if command in finder else Found()


def compose_for_lookup(command: str, overrides: Sequence[str]) -> Any:
    """The command's config for finding its run, without the user's overrides of the groups the train run restores
    (those are checked later, against the run's own model: model.box_score_thresh is valid for iou_net only)."""
    kept = [o for o in overrides if "." not in override_key(o) or override_key(o).split(".", 1)[0] not in RESTORED]
    return compose(command, kept, allow_missing=True)  # data=coco without its data.root: the run restores it


def restoring(command: str, run_dir: Any, groups: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """Overrides that bring `groups` of the run in `run_dir` back into `command`'s config, from its recorded group
    choices, overrides and config (config.overrides_restoring); the user's `overrides` keep what they set."""
    from iouctl import config
    from iouctl.runs import read_recorded

    rec = read_recorded(run_dir)
    return config.overrides_restoring(command, rec.config, groups, list(overrides), rec.choices, rec.overrides)


# --------------------------------------------------------------------------------------------------- train
def resume_checkpoint(cfg: Any) -> Optional[Path]:
    """The checkpoint `iouctl train resume=true` continues from (None without resume): run=<dir>'s, or the newest
    train run's whose config matches at RESUME_MATCH; a run whose process is alive is refused."""
    if not cfg.resume:
        return None
    import yaml

    from iouctl import config
    from iouctl.engine.train import CHECKPOINT
    from iouctl.runs import find_resume_run, find_run_file, refuse_if_running

    if cfg.run is not None:
        ckpt = find_run_file(cfg.run, cfg.paths.runs_dir, ["train"], CHECKPOINT, status=None)
        refuse_if_running(ckpt.parent.parent)  # run=<dir>/checkpoints/last.pt; for another file: no run, no-op
        return ckpt
    wanted = yaml.safe_load(config.to_yaml(cfg))  # as config.yaml records it: values compare like for like
    run = find_resume_run(cfg.paths.runs_dir, "train", CHECKPOINT, wanted, RESUME_MATCH, RESUME_IGNORED)
    return run / CHECKPOINT


def _for_train(overrides: list[str]) -> Found:
    return Found(checkpoint=resume_checkpoint(compose("train", overrides)))


# ---------------------------------------------------------------------------------------------------- eval
def eval_checkpoint(cfg: Any) -> Path:
    """The checkpoint eval evaluates: checkpoint=<file>, or the last one of run=<train run> (default: the newest)."""
    from iouctl.engine.train import CHECKPOINT
    from iouctl.errors import IouctlError
    from iouctl.runs import find_run_file

    if cfg.checkpoint is not None:
        ckpt = Path(cfg.checkpoint).expanduser()
        if not ckpt.is_file():
            raise IouctlError(f"checkpoint={cfg.checkpoint}: no such file")
        return ckpt
    return find_run_file(cfg.run, cfg.paths.runs_dir, ["train"], CHECKPOINT)


def _for_eval(overrides: list[str]) -> Found:
    conf = compose_for_lookup("eval", overrides)
    ckpt = eval_checkpoint(conf)
    if conf.checkpoint is not None:  # a file: its model is the config's
        return Found(checkpoint=ckpt)
    return Found(restoring("eval", ckpt.parent.parent, RESTORED, overrides), checkpoint=ckpt)


# ---------------------------------------------------------------------------------------------- nms-ablate
def ablation_detections(cfg: Any) -> Optional[Path]:
    """The raw detections nms-ablate scores (None: synthetic=true): run=<dir or file>'s, or the newest completed
    eval or train run's."""
    if cfg.synthetic:
        return None
    from iouctl.runs import detections_file, find_run_file

    return find_run_file(cfg.run, cfg.paths.runs_dir, ["eval", "train"], detections_file(str(cfg.split)))


def _for_nms_ablate(overrides: list[str]) -> Found:
    """The detections are scored against their own dataset unless data is overridden."""
    from iouctl.errors import IouctlError
    from iouctl.runs import detections_file

    conf = compose_for_lookup("nms-ablate", overrides)
    try:
        detections = ablation_detections(conf)
    except IouctlError as e:
        compose("nms-ablate", overrides)  # no run to restore data from: a value still missing is the first error
        raise IouctlError(f"{e}, or use --synthetic") from None
    if detections is None:
        return Found()
    made_by = detections.parents[len(Path(detections_file(str(conf.split))).parts) - 1]
    if not (made_by / "config.yaml").is_file():  # a detections file given directly, outside any run: the data given
        return Found(detections=detections)
    return Found(restoring("nms-ablate", made_by, ["data"], overrides), detections=detections)


# -------------------------------------------------------------------------------------------------- refine
def refine_source(cfg: Any) -> Any:
    """The :class:`iouctl.runs.Source` refine works on: run=<train or eval run>, or the newest completed one whose
    detector has a box-differentiable IoU head; one line (IouctlError) when it has none."""
    from iouctl.engine.refine import FIND_REFINABLE, check_refinable
    from iouctl.engine.train import CHECKPOINT
    from iouctl.runs import find_model_run, read_meta, read_recorded

    source = find_model_run(cfg.run, str(cfg.paths.runs_dir), CHECKPOINT, str(cfg.split), **FIND_REFINABLE)
    check_refinable(source.run, read_recorded(source.train_run).config, read_meta(source.train_run).get("detector"))
    return source


def _for_refine(overrides: list[str]) -> Found:
    source = refine_source(compose_for_lookup("refine", overrides))
    # the run's own record: an eval run's data may differ from its train run's
    return Found(restoring("refine", source.run, RESTORED, overrides), source=source)
