"""Config schemas: the type of every key in conf/. Values live in the YAML files; these only say what is allowed.

Each YAML option starts its defaults list with its schema (`- /schema/<group>/<name>@_here_`), so Hydra rejects a
mistyped value (`optim.lr=abc`) or an unknown key (`optim.lrr=0.1`) at composition time. Plain dataclasses: the
registration with Hydra's ConfigStore happens in iouctl.config, the only module that knows Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

# --- groups ------------------------------------------------------------------------------------------------------


@dataclass
class Paths:
    runs_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class ShapesData:
    _target_: str = MISSING
    cache_dir: str = MISSING
    seed: int = MISSING
    num_train: int = MISSING
    num_val: int = MISSING
    image_size: int = MISSING
    min_objects: int = MISSING
    max_objects: int = MISSING
    min_size: float = MISSING
    max_size: float = MISSING
    classes: List[str] = MISSING
    cluster_prob: float = MISSING
    min_visible: float = MISSING
    noise: float = MISSING
    texture: bool = MISSING


@dataclass
class CocoData:
    _target_: str = MISSING
    root: str = MISSING
    train_ann: str = MISSING
    val_ann: str = MISSING
    train_images: str = MISSING
    val_images: str = MISSING
    skip_bad: bool = MISSING
    check_images: str = "val"  # none | val | all
    workers: int = 2


@dataclass
class _Detector:
    _target_: str = MISSING
    backbone: str = MISSING  # small | resnet18 | resnet50
    pretrained: Optional[str] = None  # a local ImageNet weights file; never downloaded
    init_from: Optional[str] = None  # a local torchvision detector state_dict (iouctl.models.init_from)
    # int / List[int], or auto: derived from the training split (iouctl.engine.sizes, which also checks the values;
    # OmegaConf has no Union of a list and a string)
    min_size: Any = MISSING
    max_size: Any = MISSING
    anchor_sizes: Any = MISSING
    aspect_ratios: List[float] = MISSING
    detections_per_img: int = MISSING
    iou_head: bool = MISSING
    iou_loss_weight: float = MISSING


@dataclass
class RetinaModel(_Detector):
    score_thresh: float = MISSING
    topk_candidates: int = MISSING
    cls_weight: float = MISSING  # a in cls^a * IoU^(1-a)
    detach_iou_target: bool = MISSING
    head_norm: str = "none"  # none (the paper's heads) | group (GroupNorm in the towers, torchvision's v2)
    iou_supervision: str = "positives"  # positives (the paper) | overlapping (also non-positive anchors whose box hits a GT)


@dataclass
class RCNNModel(_Detector):
    box_score_thresh: float = MISSING
    iou_loss: str = MISSING  # smooth_l1 | bce
    jitter_per_gt: int = MISSING
    iou_bins: int = MISSING


@dataclass
class PrRoIPool:
    _target_: str = MISSING
    output_size: int = MISSING
    spatial_scale: float = MISSING


@dataclass
class RoIAlign:
    _target_: str = MISSING
    output_size: int = MISSING
    spatial_scale: float = MISSING
    sampling_ratio: int = MISSING
    aligned: bool = MISSING


@dataclass
class GreedyNMS:
    _target_: str = MISSING
    iou_threshold: float = MISSING
    score: str = MISSING  # cls | iou | fused: the ranking score
    cls_weight: float = MISSING
    max_per_image: int = MISSING


@dataclass
class IoUGuidedNMS:
    _target_: str = MISSING
    iou_threshold: float = MISSING
    max_per_image: int = MISSING


@dataclass
class SoftNMS:
    _target_: str = MISSING
    method: str = MISSING  # linear | gaussian
    sigma: float = MISSING
    iou_threshold: float = MISSING
    score_threshold: float = MISSING
    score: str = MISSING
    cls_weight: float = MISSING
    max_per_image: int = MISSING


@dataclass
class IoURefiner:
    _target_: str = MISSING
    step: float = MISSING  # lambda of IoU-Net Alg. 2
    omega1: float = MISSING
    omega2: float = MISSING
    iterations: int = MISSING
    top_k: int = MISSING
    revert_on_degrade: bool = MISSING
    step_decay: float = MISSING
    report_score: str = MISSING  # cls | cluster | cls_times_iou


@dataclass
class SGD:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    nesterov: bool = MISSING


@dataclass
class AdamW:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = MISSING
    betas: List[float] = MISSING
    weight_decay: float = MISSING


@dataclass
class MirrorPairs:
    _target_: str = MISSING


@dataclass
class RandomAugment:
    _target_: str = MISSING
    crop_prob: float = MISSING
    crop_scale: List[float] = MISSING  # [min, max] fraction of the image area
    crop_aspect: List[float] = MISSING  # [min, max] factor on the image's aspect ratio
    min_visible: float = MISSING
    min_box_size: float = MISSING
    hflip: float = MISSING
    vflip: float = MISSING
    brightness: float = MISSING
    contrast: float = MISSING
    saturation: float = MISSING
    hue: float = MISSING


@dataclass
class NoLogger:
    _target_: str = MISSING


@dataclass
class WandbLogger:
    _target_: str = MISSING
    project: str = MISSING
    entity: Optional[str] = None
    mode: str = MISSING  # auto | online | offline | disabled
    tags: List[str] = field(default_factory=list)
    group: Optional[str] = None
    init_timeout: float = MISSING


# --- primary configs (one per command) ------------------------------------------------------------------------------


@dataclass
class _Command:
    name: str = MISSING
    seed: int = MISSING
    paths: Any = MISSING
    logger: Any = MISSING


@dataclass
class Schedule:
    max_iters: int = MISSING
    warmup_iters: int = MISSING
    warmup_factor: float = MISSING
    lr_steps: List[int] = MISSING
    gamma: float = MISSING


@dataclass
class Train(_Command):
    device: str = MISSING
    data: Any = MISSING
    model: Any = MISSING
    pool: Any = MISSING
    optim: Any = MISSING
    nms: Any = MISSING
    schedule: Schedule = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    amp: bool = MISSING
    augment: Any = None  # None: augment=none
    clip_grad_norm: Optional[float] = None
    resume: bool = MISSING
    run: Optional[str] = None
    eval_backend: str = MISSING


@dataclass
class Eval(_Command):
    device: str = MISSING
    run: Optional[str] = None
    checkpoint: Optional[str] = None
    split: str = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    data: Any = MISSING
    model: Any = MISSING
    pool: Any = MISSING
    nms: Any = MISSING
    eval_backend: str = MISSING


@dataclass
class NmsAblate(_Command):
    run: Optional[str] = None
    synthetic: bool = MISSING
    split: str = MISSING
    data: Any = MISSING
    nms: Any = MISSING
    scores: List[str] = MISSING
    methods: List[str] = MISSING
    iou_thresholds: List[float] = MISSING
    cls_weight: float = MISSING
    soft_sigma: float = MISSING
    soft_score_threshold: float = MISSING
    max_per_image: int = MISSING
    eval_backend: str = MISSING


@dataclass
class Refine(_Command):
    device: str = MISSING
    run: Optional[str] = None
    split: str = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    data: Any = MISSING
    model: Any = MISSING
    pool: Any = MISSING
    nms: Any = MISSING
    refiner: Any = None
    eval_backend: str = MISSING


@dataclass
class BenchPool(_Command):
    impls: List[str] = MISSING
    devices: List[str] = MISSING
    feature_shape: List[int] = MISSING
    stride: int = MISSING
    output_size: int = MISSING
    num_rois: List[int] = MISSING
    roi_sizes: List[Any] = MISSING  # numbers (side in image pixels) or "mixed"
    repeats: int = MISSING
    warmup: int = MISSING
    threads: Optional[int] = None


@dataclass
class Data(_Command):
    data: Any = MISSING
    augment: Any = None  # only `data preview --augment` sets it


@dataclass
class Demo(_Command):
    data: Any = MISSING
    steps: List[str] = MISSING
    train_overrides: List[str] = MISSING
    nms_ablate_overrides: List[str] = MISSING
    refine_overrides: List[str] = MISSING
    bench_pool_overrides: List[str] = MISSING


GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "paths": {"default": Paths},
    "data": {"shapes": ShapesData, "coco": CocoData},
    "model": {"retina": RetinaModel, "rcnn": RCNNModel},
    "pool": {"prroi": PrRoIPool, "roi_align": RoIAlign},
    "nms": {"greedy": GreedyNMS, "iou_guided": IoUGuidedNMS, "soft": SoftNMS},
    "refiner": {"iou_net": IoURefiner},
    "optim": {"sgd": SGD, "adamw": AdamW},
    "logger": {"none": NoLogger, "wandb": WandbLogger},
    "augment": {"flip": MirrorPairs, "standard": RandomAugment},
}
PRIMARY_SCHEMAS: dict[str, type] = {
    "train": Train, "eval": Eval, "nms_ablate": NmsAblate, "refine": Refine, "bench_pool": BenchPool,
    "data": Data, "demo": Demo,
}
