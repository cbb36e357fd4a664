"""Valid values of every config key, declared in iouctl.schema and checked at composition (iouctl.config.check_values):
one line naming the key, the value and what is valid, before a run folder or the data is touched."""
import dataclasses
import math
import re

import pytest
from typer.testing import CliRunner

from iouctl import config, schema
from iouctl.cli import app
from iouctl.config import Interval
from iouctl.errors import ConfigError
from tests.lanes import sample

SCHEMAS = sorted({c for opts in schema.GROUP_SCHEMAS.values() for c in opts.values()}
                 | set(schema.PRIMARY_SCHEMAS.values()) | {schema.Schedule}, key=lambda c: c.__name__)
# str keys that are free text (paths, names, targets), not enums
FREE_TEXT = {"_target_", "name", "runs_dir", "cache_dir", "root", "train_ann", "val_ann", "train_images", "val_images",
             "pretrained", "init_from", "project", "entity", "group", "tags", "run", "checkpoint",
             "train_overrides", "nms_ablate_overrides", "refine_overrides", "bench_pool_overrides",
             "single_stage_overrides", "retina_overrides", "iou_retina_overrides", "iou_retina_nms_overrides",
             "inference"}  # model.inference: nms overrides, checked when composed (iouctl.cli.common)
# typed Any: checked elsewhere at composition (iouctl.engine.sizes) or group nodes
UNTYPED = {"min_size", "max_size", "anchor_sizes", "paths", "logger", "data", "model", "pool", "optim", "nms",
           "augment", "refiner", "schedule"}


def _fields():
    return [(cls.__name__, f) for cls in SCHEMAS for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("owner,f", _fields(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_key_declares_its_valid_values(owner, f):
    kind = str(f.type)
    if f.name in UNTYPED and f.name not in ("min_size", "max_size") or kind == "Any":
        return
    if re.search(r"\b(int|float)\b", kind):
        assert "range" in f.metadata, f"{owner}.{f.name} ({kind}) declares no range"
        Interval.parse(f.metadata["range"])  # written as an interval
    elif re.search(r"\bstr\b", kind) and f.name not in FREE_TEXT:
        assert f.metadata.get("choices") or f.metadata.get("group"), f"{owner}.{f.name} declares no choices"
    if "size" in f.metadata:
        Interval.parse(f.metadata["size"])


def test_the_schema_enums_are_the_library_constants():
    from iouctl.analysis import BACKENDS
    from iouctl.data.coco import CHECK_IMAGES
    from iouctl.data.shapes import SHAPE_NAMES
    from iouctl.engine import bench_pool, demo
    from iouctl.models import rcnn, retina
    from iouctl.models.backbones import BACKBONES
    from iouctl.ops.nms import SOFT_METHODS
    from iouctl.postprocess.refine import REPORT_SCORES
    from iouctl.postprocess.suppression import SCORES

    assert schema.EVAL_BACKENDS == BACKENDS and schema.CHECK_IMAGES == CHECK_IMAGES
    assert schema.ShapesData.__dataclass_fields__["classes"].metadata["choices"] == SHAPE_NAMES
    assert schema.BENCH_IMPLS == ("all", *bench_pool.IMPLS) and schema.DEMO_STEPS == demo.STEPS
    assert schema.HEAD_NORMS == retina.HEAD_NORMS and schema.IOU_SUPERVISION == retina.IOU_SUPERVISION
    assert schema.IOU_LOSSES == rcnn.IOU_LOSSES and schema.BACKBONES == BACKBONES
    assert schema.SOFT_METHODS == SOFT_METHODS and schema.REPORT_SCORES == REPORT_SCORES and schema.SCORES == SCORES
    # the ablation's methods are the nms group's options, derived from conf/nms/
    from iouctl.cli.app import Method

    assert config._choices(schema.NmsAblate.__dataclass_fields__["methods"].metadata) == \
        tuple(sorted(m.value for m in Method)) == tuple(o.replace("_", "-") for o in config.group_options("nms"))


@pytest.mark.parametrize("text,inside,outside,words", [
    ("[1, inf)", [1, 10**9], [0, -1, math.nan, math.inf], ">= 1"),
    ("(0, 1]", [1e-12, 1.0], [0.0, -5.0, 1.0000001, math.nan], "in (0, 1]"),
    ("[0, 1)", [0.0, 0.999], [1.0, -1e-9, math.nan], "in [0, 1)"),
    ("(-inf, 0]", [0.0, -3.0], [0.01, math.nan, -math.inf], "<= 0"),
    ("(0, inf)", [1e-300, 1e300], [0.0, math.inf, math.nan], "> 0"),
])
def test_interval(text, inside, outside, words):
    iv = Interval.parse(text)
    assert all(x in iv for x in inside) and not any(x in iv for x in outside)
    assert iv.describe().endswith(words)


# (command, overrides, the exact message): every kind-1 and kind-2 value of the report, and one per kind of rule
BAD = [
    ("train", "schedule.max_iters=0", "schedule.max_iters=0 is not valid; valid: an integer >= 1"),
    ("train", "schedule.max_iters=-1", "schedule.max_iters=-1 is not valid; valid: an integer >= 1"),
    ("train", "schedule.warmup_factor=-5",
     "schedule.warmup_factor=-5.0 is not valid; valid: a finite number in (0, 1]"),
    ("train", "schedule.gamma=nan", "schedule.gamma=nan is not valid; valid: a finite number in (0, 1]"),
    ("train", "clip_grad_norm=-1", "clip_grad_norm=-1.0 is not valid; valid: a finite number > 0 or null"),
    ("train", "optim.lr=0", "optim.lr=0.0 is not valid; valid: a finite number > 0"),
    ("train", "optim.lr=-0.1", "optim.lr=-0.1 is not valid; valid: a finite number > 0"),
    ("train", "optim.lr=nan", "optim.lr=nan is not valid; valid: a finite number > 0"),
    ("train", "optim.lr=inf", "optim.lr=inf is not valid; valid: a finite number > 0"),
    ("train", "batch_size=0", "batch_size=0 is not valid; valid: an integer >= 1"),
    ("train", "eval_every=0", "eval_every=0 is not valid; valid: an integer >= 1"),
    ("train", "checkpoint_every=0", "checkpoint_every=0 is not valid; valid: an integer >= 1"),
    ("train", "num_workers=-1", "num_workers=-1 is not valid; valid: an integer >= 0"),
    ("train", "device=tpu", "device=tpu is not valid; valid: one of auto, cpu, cuda, cuda:N"),
    ("train", "device=cuda:x", "device=cuda:x is not valid; valid: one of auto, cpu, cuda, cuda:N"),
    ("train", "eval_backend=bogus", "eval_backend=bogus is not valid; valid: one of faster-coco-eval, pycocotools"),
    ("train", "seed=-1", "seed=-1 is not valid; valid: an integer in [0, 4294967295]"),
    ("train", "schedule.lr_steps=[1800,1500]", "schedule.lr_steps=[1800,1500] is not valid; valid: increasing values"),
    ("train", "schedule.lr_steps=[0,5]",
     "schedule.lr_steps=[0,5] is not valid (entry 0); valid: each entry an integer >= 1"),
    ("train", "model.score_thresh=1", "model.score_thresh=1.0 is not valid; valid: a finite number in [0, 1)"),
    ("train", "model.head_norm=batch", "model.head_norm=batch is not valid; valid: one of none, group"),
    ("train", "model.iou_supervision=all",
     "model.iou_supervision=all is not valid; valid: one of positives, overlapping"),
    ("train", "model.backbone=vgg16", "model.backbone=vgg16 is not valid; valid: one of small, resnet18, resnet50"),
    ("train", "model=iou_net model.iou_loss=l2", "model.iou_loss=l2 is not valid; valid: one of smooth_l1, bce"),
    ("train", "model=iou_net model.box_score_thresh=-0.1",
     "model.box_score_thresh=-0.1 is not valid; valid: a finite number in [0, 1)"),
    ("train", "model.aspect_ratios=[]", "model.aspect_ratios=[] is not valid; valid: at least 1 entry"),
    ("train", "pool.output_size=0", "pool.output_size=0 is not valid; valid: an integer >= 1"),
    ("train", "optim=adamw optim.betas=[0.9]", "optim.betas=[0.9] is not valid; valid: exactly 2 entries"),
    ("train", "augment=standard augment.crop_scale=[0.9,0.3]",
     "augment.crop_scale=[0.9,0.3] is not valid; valid: [min, max] with min <= max"),
    ("train", "augment=standard augment.hue=0.7", "augment.hue=0.7 is not valid; valid: a finite number in [0, 0.5]"),
    ("train", "logger=wandb logger.mode=sometimes",
     "logger.mode=sometimes is not valid; valid: one of auto, online, offline, disabled"),
    ("train", "data.max_objects=2", "data.min_objects=3 and data.max_objects=2 are not valid together; "
                                    "valid: data.min_objects <= data.max_objects"),
    ("train", "data.max_size=200", "data.max_size=200.0 and data.image_size=128 are not valid together; "
                                   "valid: data.max_size + 2 <= data.image_size"),
    ("train", "data.classes=[dog]", "data.classes=[dog] is not valid (entry dog); valid: each entry one of circle, "
                                    "square, triangle, cross, ellipse, star, ring, hexagon"),
    ("train", "data=coco data.root=/d data.check_images=some",
     "data.check_images=some is not valid; valid: one of none, val, all"),
    ("eval", "split=test", "split=test is not valid; valid: one of train, val"),
    ("eval", "nms=soft_linear nms.sigma=0", "nms.sigma=0.0 is not valid; valid: a finite number > 0"),
    ("nms-ablate", "cls_weight=2", "cls_weight=2.0 is not valid; valid: a finite number in [0, 1] or null"),
    ("nms-ablate", "iou_thresholds=[1.5]",
     "iou_thresholds=[1.5] is not valid (entry 1.5); valid: each entry a finite number in [0, 1]"),
    ("nms-ablate", "max_per_image=0", "max_per_image=0 is not valid; valid: an integer >= 1"),
    ("nms-ablate", "methods=[greedy,nms]", "methods=[greedy,nms] is not valid (entry nms); valid: each entry one of "
                                           + ", ".join(o.replace("_", "-") for o in config.group_options("nms"))),
    ("nms-ablate", "scores=[]", "scores=[] is not valid; valid: at least 1 entry"),
    ("refine", "refiner.step=0", "refiner.step=0.0 is not valid; valid: a finite number > 0"),
    ("refine", "refiner.omega2=0.5", "refiner.omega2=0.5 is not valid; valid: a finite number <= 0"),
    ("refine", "refiner.report_score=max",
     "refiner.report_score=max is not valid; valid: one of cls, cluster, cls_times_iou"),
    ("bench-pool", "roi_sizes=[mixed,-3]",
     "roi_sizes=[mixed,-3] is not valid (entry -3); valid: each entry a finite number > 0 or mixed"),
    ("bench-pool", "feature_shape=[1,64,50]", "feature_shape=[1,64,50] is not valid; valid: exactly 4 entries"),
    ("bench-pool", "impls=[fast]", "impls=[fast] is not valid (entry fast); valid: each entry one of all, prroi, "
                                   "prroi_reference, roi_align, roi_align_adaptive, roi_pool"),
    ("bench-pool", "devices=[tpu]", "devices=[tpu] is not valid (entry tpu); valid: each entry one of auto, cpu, cuda"),
    ("bench-pool", "threads=0", "threads=0 is not valid; valid: an integer >= 1 or null"),
    ("bench-pool", "repeats=0", "repeats=0 is not valid; valid: an integer >= 1"),
    ("demo", "steps=[train,eval]", "steps=[train,eval] is not valid (entry eval); valid: each entry one of data, "
                                   "train, nms-ablate, refine, train-retina, train-iou-retina, nms-iou-retina, "
                                   "bench-pool"),
]


@pytest.mark.parametrize("command,overrides,message", sample(BAD, 3, ids=[b[1] for b in BAD]))
def test_a_bad_value_is_one_line_naming_key_value_and_valid_range(command, overrides, message):
    with pytest.raises(ConfigError) as info:
        config.compose(command, overrides.split(" "))
    assert str(info.value) == message


@pytest.mark.parametrize("command,overrides", sample([
    ("train", "schedule.warmup_factor=1 schedule.gamma=1 clip_grad_norm=null device=cuda:3 num_workers=0"),
    ("train", "model.score_thresh=0 schedule.lr_steps=[] seed=4294967295 eval_backend=pycocotools"),
    ("train", "schedule.max_iters=10 schedule.lr_steps=[5,50]"),  # a step after the end never applies: allowed
    ("train", "data.min_objects=4 data.max_objects=4 data.max_size=126 augment=standard augment.crop_scale=[1,1]"),
    ("nms-ablate", "iou_thresholds=[0,1] cls_weight=0 methods=[iou-guided,soft-gaussian]"),
    ("bench-pool", "roi_sizes=[mixed,0.5,7] threads=null impls=[roi_pool] devices=[cpu]"),
    ("refine", "refiner.omega2=0 refiner.step_decay=1 refiner=iou_net"),
], 2))
def test_boundary_values_are_accepted(command, overrides):
    config.compose(command, overrides.split(" "))


@pytest.mark.slow
def test_plus_keys_are_held_to_the_schema():
    with pytest.raises(ConfigError) as plain:
        config.compose("train", ["foo=bar"])
    for added in ("+foo=bar", "++foo=bar"):
        with pytest.raises(ConfigError) as info:
            config.compose("train", [added])
        assert str(info.value) == str(plain.value)
        assert str(info.value).startswith("unknown config key 'foo' for `iouctl train`; valid keys at the top level")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.zz' .*valid keys under 'optim': _partial_"):
        config.compose("train", ["+optim.zz=1"])
    with pytest.raises(ConfigError) as info:
        config.compose("train", ["+optim.lr=0.1"])
    assert str(info.value) == "config key 'optim.lr' exists already: set it without '+', as optim.lr=0.1"
    # `+group=option` adds a group the command does not compose by default (data preview --augment): still valid,
    # and the group's values are held to its schema
    assert config.compose("data", ["+augment=standard"]).augment.hflip == 0.5
    with pytest.raises(ConfigError, match=r"^augment.hflip=2.0 is not valid"):
        config.compose("data", ["+augment=standard", "augment.hflip=2"])


def test_a_bad_value_stops_the_cli_before_any_run_folder(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("IOUCTL_RUNS_DIR", str(runs))
    r = CliRunner().invoke(app, ["train", "experiment=tiny", "schedule.max_iters=0"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: schedule.max_iters=0 is not valid; valid: an integer >= 1"
    assert not runs.exists()
