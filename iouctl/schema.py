"""Config schemas: the type and the valid values of every key in conf/. Values live in the YAML files; these only say
what is allowed.

Each YAML option starts its defaults list with its schema (`- /schema/<group>/<name>@_here_`), so Hydra rejects a
mistyped value (`optim.lr=abc`) or an unknown key (`optim.lrr=0.1`) at composition time. Plain dataclasses: the
registration with Hydra's ConfigStore happens in iouctl.config, the only module that knows Hydra, which also checks
every composed value against what `key()` declares here (iouctl.config.check_values), before anything runs.

Valid values are data, in each field's metadata:
- range: an interval written as it is printed, "[1, inf)", "(0, 1]"; for a list, every entry. A float is also finite
  (NaN is never valid; inf only where the interval includes it). null is valid only for Optional keys.
- choices: the valid strings ("cuda:N" stands for cuda:0, cuda:1, ...); for a list, every entry.
- group: the choices are the option files of conf/<group>/, with `_` spelled `sep` (never kept twice).
- also: literal values valid besides the range (roi_sizes: "mixed").
- size: an interval for a list's length; order: "increasing" (strictly) or "nondecreasing" entries.
A class's ORDERED lists cross-key rules (low, high, gap): low + gap <= high.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from omegaconf import MISSING


def key(range: Optional[str] = None, *, default: Any = MISSING, choices: tuple = (), group: Optional[str] = None,
        sep: str = "_", also: tuple = (), size: Optional[str] = None, order: Optional[str] = None) -> Any:
    """A dataclass field whose metadata declares its valid values (see the module docstring)."""
    meta = {k: v for k, v in (("range", range), ("choices", choices), ("group", group), ("also", also),
                               ("size", size), ("order", order)) if v}
    if group:
        meta["sep"] = sep
    return field(default=default, metadata=meta)


# The enums below are also the constants of the modules that use them (a test holds them equal): those modules import
# torch, which composition must not wait for.
BACKBONES = ("small", "resnet18", "resnet50")
HEAD_NORMS = ("none", "group")
IOU_SUPERVISION = ("positives", "overlapping")
QUALITIES = ("none", "iou", "centerness", "iou_cls", "qfl")  # iouctl.models.contract.QUALITIES
IOU_LOSSES = ("smooth_l1", "bce")
SCORES = ("cls", "iou", "fused")
SOFT_METHODS = ("linear", "gaussian")
MATRIX_KERNELS = ("gaussian", "linear")  # iouctl.ops.postprocess.MATRIX_KERNELS
WBF_CONF_TYPES = ("avg", "max")  # iouctl.ops.postprocess.WBF_CONF_TYPES
REPORT_SCORES = ("cls", "cluster", "cls_times_iou")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
EVAL_BACKENDS = ("faster-coco-eval", "pycocotools")
CHECK_IMAGES = ("none", "val", "all")
SPLITS = ("train", "val")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
BENCH_IMPLS = ("all", "prroi", "prroi_reference", "roi_align", "roi_align_adaptive", "roi_pool")
BENCH_DEVICES = ("auto", "cpu", "cuda")
ANALYSES = ("errors", "calibration", "oracle")
DEMO_STEPS = ("data", "train", "nms-ablate", "refine", "train-retina", "train-iou-retina", "nms-iou-retina",
              "bench-pool")

SEED = "[0, 4294967295]"  # numpy's generators take seeds below 2**32
POSITIVE = "(0, inf)"
AT_LEAST_0 = "[0, inf)"
AT_LEAST_1 = "[1, inf)"
PROBABILITY = "[0, 1]"

# --- groups ------------------------------------------------------------------------------------------------------


@dataclass
class Paths:
    runs_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class _Option:
    """A group option: `_target_` is the plain constructor its node is instantiated with (iouctl.config.instantiate)."""
    _target_: str = MISSING


@dataclass
class ShapesData(_Option):
    ORDERED: ClassVar[tuple] = (("min_objects", "max_objects", 0), ("min_size", "max_size", 0),
                                ("max_size", "image_size", 2))  # objects keep a 1-pixel margin
    cache_dir: str = MISSING
    seed: int = key(SEED)
    num_train: int = key(AT_LEAST_1)
    num_val: int = key(AT_LEAST_1)
    image_size: int = key("[8, 4096]")
    min_objects: int = key(AT_LEAST_0)
    max_objects: int = key(AT_LEAST_0)
    min_size: float = key("[4, inf)")
    max_size: float = key("[4, inf)")
    classes: List[str] = key(choices=("circle", "square", "triangle", "cross", "ellipse", "star", "ring", "hexagon"),
                             size=AT_LEAST_1)
    cluster_prob: float = key(PROBABILITY)
    min_visible: float = key("(0, 1]")
    noise: float = key(PROBABILITY)
    texture: bool = MISSING


@dataclass
class CocoData(_Option):
    root: str = MISSING
    train_ann: str = MISSING
    val_ann: str = MISSING
    train_images: str = MISSING
    val_images: str = MISSING
    skip_bad: bool = MISSING
    check_images: str = key(choices=CHECK_IMAGES, default="val")
    workers: int = key(AT_LEAST_1, default=2)
    allow_outside: bool = False  # read image file_names that lead outside the image folder


@dataclass
class _Detector(_Option):
    backbone: str = key(choices=BACKBONES)
    pretrained: Optional[str] = None  # a local ImageNet weights file; never downloaded
    init_from: Optional[str] = None  # a local torchvision detector state_dict (iouctl.models.init_from)
    # int / List[int], or auto: derived from the training split (iouctl.engine.sizes, which also checks the values;
    # OmegaConf has no Union of a list and a string)
    min_size: Any = MISSING
    max_size: Any = MISSING
    anchor_sizes: Any = MISSING
    aspect_ratios: List[float] = key(POSITIVE, size=AT_LEAST_1)
    iou_loss_weight: float = key(AT_LEAST_0)
    # the post-processing its paper uses, as nms overrides applied before the user's (nms=... given: not applied);
    # null (RetinaNet): the paper's of its quality head (iouctl.models.contract.QUALITY_HEADS)
    inference: Optional[List[str]] = key(size=AT_LEAST_1, default=None)
    cls_weight: float = key(PROBABILITY)  # a in the fused score cls^a * IoU^(1-a)


@dataclass
class RetinaModel(_Detector):
    # the localization-quality head: none | iou | centerness | iou_cls | qfl (iouctl.models.retina)
    quality: str = key(choices=QUALITIES)
    score_thresh: float = key("[0, 1)")
    topk_candidates: int = key(AT_LEAST_1)
    detach_iou_target: bool = MISSING
    # none (the paper's heads) | group (GroupNorm in the towers, torchvision's v2)
    head_norm: str = key(choices=HEAD_NORMS, default="none")
    # positives (the paper) | overlapping (also non-positive anchors whose box hits a GT)
    iou_supervision: str = key(choices=IOU_SUPERVISION, default="positives")
    # anchors per level at size * 2^(k / n), k < n (the paper: 3)
    scales_per_octave: int = key(AT_LEAST_1, default=1)
    fg_iou_thresh: float = key(PROBABILITY, default=0.5)  # anchor-GT IoU for a positive (the paper: 0.5)
    bg_iou_thresh: float = key(PROBABILITY, default=0.4)
    # FPN and head width; null: the backbone's (64 for small, 256 for the ResNets)
    fpn_channels: Optional[int] = key(AT_LEAST_1, default=None)  # below: negative; in between: ignored (the paper: 0.4)


@dataclass
class RCNNModel(_Detector):
    detections_per_img: int = key(AT_LEAST_1)  # raw candidates kept per image: max(1000, 10x this)
    iou_head: bool = MISSING
    box_score_thresh: float = key("[0, 1)")
    iou_loss: str = key(choices=IOU_LOSSES)
    jitter_per_gt: int = key(AT_LEAST_1)
    iou_bins: int = key(AT_LEAST_1)


@dataclass
class _Pool(_Option):
    output_size: int = key(AT_LEAST_1)
    spatial_scale: float = key(POSITIVE)


@dataclass
class PrRoIPool(_Pool):
    pass


@dataclass
class RoIAlign(_Pool):
    sampling_ratio: int = key("[-1, inf)")  # <= 0: adaptive (torchvision)
    aligned: bool = MISSING


@dataclass
class _NMS(_Option):
    """The keys of every nms option (iouctl.postprocess: each arm keeps its max_per_image best per image)."""
    max_per_image: int = key(AT_LEAST_1)


@dataclass
class _RankedNMS(_NMS):
    score: str = key(choices=SCORES)  # the ranking score


@dataclass
class _ThresholdNMS(_RankedNMS):
    iou_threshold: float = key(PROBABILITY)


@dataclass
class GreedyNMS(_ThresholdNMS):
    pass


@dataclass
class IoUGuidedNMS(_NMS):  # ranks by the predicted IoU (IoU-Net Alg. 1): no score key
    iou_threshold: float = key(PROBABILITY)


@dataclass
class SoftNMS(_ThresholdNMS):
    method: str = key(choices=SOFT_METHODS)
    sigma: float = key(POSITIVE)
    score_threshold: float = key("[0, 1)")  # scores are in [0, 1]: a threshold of 1 would drop every box


@dataclass
class DIoUNMS(_ThresholdNMS):
    beta: float = key(POSITIVE)  # exponent of the centre-distance penalty


@dataclass
class MatrixNMS(_RankedNMS):  # decays every score: no threshold
    kernel: str = key(choices=MATRIX_KERNELS)
    sigma: float = key(POSITIVE)


@dataclass
class ClusterNMS(_ThresholdNMS):
    spm: bool = MISSING
    distance: bool = MISSING
    weighted: bool = MISSING
    sigma: float = key(POSITIVE)
    beta: float = key(POSITIVE)
    weight_threshold: float = key(PROBABILITY)
    score_threshold: float = key("[0, 1)")
    max_iterations: int = key(AT_LEAST_1)


@dataclass
class BoxVoting(_ThresholdNMS):
    vote_threshold: float = key("(0, 1]")  # 0 would make every box of the class a voter


@dataclass
class WeightedBoxesFusion(_ThresholdNMS):
    skip_box_threshold: float = key("[0, 1)")
    conf_type: str = key(choices=WBF_CONF_TYPES)


@dataclass
class IoURefiner(_Option):
    step: float = key(POSITIVE)  # lambda of IoU-Net Alg. 2
    omega1: float = key(AT_LEAST_0)
    omega2: float = key("(-inf, 0]")
    iterations: int = key(AT_LEAST_1)
    top_k: int = key(AT_LEAST_1)
    revert_on_degrade: bool = MISSING
    step_decay: float = key("(0, 1]")
    report_score: str = key(choices=REPORT_SCORES)


@dataclass
class _Optimizer(_Option):
    _partial_: bool = True  # instantiated to a factory; the engine passes the parameters
    lr: float = key(POSITIVE)
    weight_decay: float = key(AT_LEAST_0)


@dataclass
class SGD(_Optimizer):
    momentum: float = key("[0, 1)")
    nesterov: bool = MISSING


@dataclass
class AdamW(_Optimizer):
    betas: List[float] = key("[0, 1)", size="[2, 2]")


@dataclass
class MirrorPairs(_Option):
    pass


@dataclass
class RandomAugment(_Option):
    crop_prob: float = key(PROBABILITY)
    # [min, max] fraction of the image area
    crop_scale: List[float] = key("(0, 1]", size="[2, 2]", order="nondecreasing")
    # [min, max] factor on the image's aspect ratio
    crop_aspect: List[float] = key(POSITIVE, size="[2, 2]", order="nondecreasing")
    min_visible: float = key(PROBABILITY)
    min_box_size: float = key(AT_LEAST_1)  # SanitizeBoundingBoxes' own limit
    hflip: float = key(PROBABILITY)
    vflip: float = key(PROBABILITY)
    brightness: float = key(AT_LEAST_0)
    contrast: float = key(AT_LEAST_0)
    saturation: float = key(AT_LEAST_0)
    hue: float = key("[0, 0.5]")


@dataclass
class NoLogger(_Option):
    pass


@dataclass
class WandbLogger(_Option):
    project: str = MISSING
    entity: Optional[str] = None
    mode: str = key(choices=LOGGER_MODES)
    tags: List[str] = field(default_factory=list)
    group: Optional[str] = None
    init_timeout: float = key(POSITIVE)


# --- primary configs (one per command) ------------------------------------------------------------------------------


@dataclass
class _Command:
    name: str = MISSING
    seed: int = key(SEED)
    paths: Any = MISSING
    logger: Any = MISSING


@dataclass
class Schedule:
    max_iters: int = key(AT_LEAST_1)
    warmup_iters: int = key(AT_LEAST_0)
    warmup_factor: float = key("(0, 1]")  # the learning rate starts at lr * warmup_factor
    # a step at or after max_iters never applies (a short run of a long recipe): allowed
    lr_steps: List[int] = key(AT_LEAST_1, order="increasing")
    gamma: float = key("(0, 1]")


@dataclass
class _DetectorCommand(_Command):
    """A command that runs a detector on a dataset: train, eval, refine."""
    device: str = key(choices=DEVICES)
    run: Optional[str] = None
    batch_size: int = key(AT_LEAST_1)
    num_workers: int = key(AT_LEAST_0)
    data: Any = MISSING
    model: Any = MISSING
    pool: Any = MISSING
    nms: Any = MISSING
    eval_backend: str = key(choices=EVAL_BACKENDS)


@dataclass
class Train(_DetectorCommand):
    optim: Any = MISSING
    schedule: Schedule = MISSING
    eval_every: int = key(AT_LEAST_1)
    checkpoint_every: int = key(AT_LEAST_1)
    amp: bool = MISSING
    augment: Any = None  # None: augment=none
    clip_grad_norm: Optional[float] = key(POSITIVE, default=None)  # null: no clipping
    resume: bool = MISSING


@dataclass
class Eval(_DetectorCommand):
    checkpoint: Optional[str] = None
    split: str = key(choices=SPLITS)


@dataclass
class NmsAblate(_Command):
    run: Optional[str] = None
    synthetic: bool = MISSING
    split: str = key(choices=SPLITS)
    data: Any = MISSING
    nms: Any = MISSING
    # {nms option: {key of that option: [values swept]}}: checked by iouctl.config.grid_arms against the option's schema
    grid: Any = MISSING
    # filters of the grid (null: all): options (iou_guided written iou-guided), ranking scores, IoU thresholds
    methods: Optional[List[str]] = key(group="nms", sep="-", size=AT_LEAST_1, default=None)
    scores: Optional[List[str]] = key(choices=SCORES, size=AT_LEAST_1, default=None)
    iou_thresholds: Optional[List[float]] = key(PROBABILITY, size=AT_LEAST_1, default=None)
    cls_weight: Optional[float] = key(PROBABILITY, default=None)  # null: the model's (recorded with its detections)
    analyses: List[str] = key(choices=ANALYSES)
    max_per_image: int = key(AT_LEAST_1)
    workers: int = key(AT_LEAST_0)  # processes running the arms; 0: one per available core
    eval_backend: str = key(choices=EVAL_BACKENDS)


@dataclass
class Refine(_DetectorCommand):
    split: str = key(choices=SPLITS)
    refiner: Any = None


@dataclass
class BenchPool(_Command):
    impls: List[str] = key(choices=BENCH_IMPLS, size=AT_LEAST_1)
    devices: List[str] = key(choices=BENCH_DEVICES, size=AT_LEAST_1)
    feature_shape: List[int] = key(AT_LEAST_1, size="[4, 4]")  # N, C, H, W
    stride: int = key(AT_LEAST_1)
    output_size: int = key(AT_LEAST_1)
    num_rois: List[int] = key(AT_LEAST_1, size=AT_LEAST_1)
    roi_sizes: List[Any] = key(POSITIVE, also=("mixed",), size=AT_LEAST_1)  # side in image pixels, or "mixed"
    repeats: int = key(AT_LEAST_1)
    warmup: int = key(AT_LEAST_0)
    threads: Optional[int] = key(AT_LEAST_1, default=None)  # null: torch's default


@dataclass
class Data(_Command):
    data: Any = MISSING
    augment: Any = None  # only `data preview --augment` sets it


@dataclass
class Demo(_Command):
    data: Any = MISSING
    steps: List[str] = key(choices=DEMO_STEPS, size=AT_LEAST_1)
    train_overrides: List[str] = MISSING
    nms_ablate_overrides: List[str] = MISSING
    refine_overrides: List[str] = MISSING
    single_stage_overrides: List[str] = MISSING  # both RetinaNet steps (train-retina, train-iou-retina)
    retina_overrides: List[str] = MISSING
    iou_retina_overrides: List[str] = MISSING
    iou_retina_nms_overrides: List[str] = MISSING
    bench_pool_overrides: List[str] = MISSING


GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "paths": {"default": Paths},
    "data": {"shapes": ShapesData, "coco": CocoData},
    "model": {"retina": RetinaModel, "rcnn": RCNNModel},
    "pool": {"prroi": PrRoIPool, "roi_align": RoIAlign},
    "nms": {"greedy": GreedyNMS, "iou_guided": IoUGuidedNMS, "soft": SoftNMS, "diou": DIoUNMS, "matrix": MatrixNMS,
            "cluster": ClusterNMS, "box_voting": BoxVoting, "wbf": WeightedBoxesFusion},
    "refiner": {"iou_net": IoURefiner},
    "optim": {"sgd": SGD, "adamw": AdamW},
    "logger": {"none": NoLogger, "wandb": WandbLogger},
    "augment": {"flip": MirrorPairs, "standard": RandomAugment},
}
PRIMARY_SCHEMAS: dict[str, type] = {
    "train": Train, "eval": Eval, "nms_ablate": NmsAblate, "refine": Refine, "bench_pool": BenchPool,
    "data": Data, "demo": Demo,
}
