"""Training-time augmentation (``conf/augment/``) from torchvision.transforms.v2, deterministic per sample.

An augmentation is a callable ``augment(image, target, variant, seed) -> (image, target)`` with an attribute
``variants``: how many deterministic versions of each image one epoch enumerates (2 for ``MirrorPairs``: each image
and its mirror; 1 otherwise). ``AugmentedDataset`` wraps a detection dataset with one; its items are addressed by
``(index, seed)`` pairs: index in ``[0, variants * n)`` picks the image (``index % n``) and the variant
(``index // n``), and every random draw of the sample comes from ``seed`` alone. The training sampler gives sample k
of the run's stream the seed ``sample_seed(run_seed, k)``, so an augmented sample depends only on (seed, iteration,
position in the batch): the same with 0 or N DataLoader workers, and after a resume.

Targets follow ``CocoDetectionDataset``: ``boxes`` float Tensor[K, 4] xyxy absolute pixels, ``labels`` and ``iscrowd``
Tensor[K], ``image_id``; per-box tensors (``PER_BOX_KEYS``) stay aligned with the boxes when boxes are dropped.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from iouctl.errors import ConfigError

PER_BOX_KEYS = ("labels", "iscrowd")  # target entries indexed like the boxes
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, k: int) -> int:
    """The augmentation seed of sample k (0-based position in the run's global stream of samples) of a run seeded
    `seed`: a 63-bit hash of both, so neighbouring samples and neighbouring seeds get unrelated random streams."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (k & _MASK64)) >> 1


def _boxes(target: dict, image: Tensor, clamping_mode: Optional[str] = None) -> tv_tensors.BoundingBoxes:
    # clamping_mode None: the crop leaves boxes unclipped, so ClipBoxes can still see their whole area
    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]),
                                    clamping_mode=clamping_mode)


def _plain(image: Any, target: dict) -> tuple[Tensor, dict]:
    """tv_tensors back to plain tensors, as the datasets give them."""
    return image.as_subclass(Tensor), {**target, "boxes": target["boxes"].as_subclass(Tensor)}


class MirrorPairs:
    """Horizontal flips, balanced: an epoch shows every image once as it is (variant 0) and once mirrored left to
    right (variant 1), in the sampler's order; no random draw. Boxes are mirrored exactly (``w - x``), never clipped."""

    variants = 2

    def __call__(self, image: Tensor, target: dict, variant: int = 0, seed: int = 0) -> tuple[Tensor, dict]:
        if variant == 0:
            return image, target
        return _plain(F.horizontal_flip(tv_tensors.Image(image)),
                      {**target, "boxes": F.horizontal_flip(_boxes(target, image))})

    def __repr__(self) -> str:
        return "MirrorPairs()"


class RandomAreaCrop(v2.Transform):
    """Crop a random window holding a fraction in `scale` of the image's area, its aspect ratio the image's times a
    factor in `aspect` (log-uniform), at a random position inside the image; not resized (the detector resizes).
    Draws as ``v2.RandomResizedCrop`` does (10 tries, then the whole image), from the global torch RNG."""

    def __init__(self, scale: Sequence[float], aspect: Sequence[float]) -> None:
        super().__init__()
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        for _ in range(10):
            area = torch.empty(1).uniform_(*self.scale).item()
            ratio = math.exp(torch.empty(1).uniform_(*self.log_aspect).item())
            w, h = round(width * math.sqrt(area * ratio)), round(height * math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return dict(top=top, left=left, height=h, width=w)
        return dict(top=0, left=0, height=height, width=width)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class ClipBoxes(v2.Transform):
    """Clip boxes to the image; a box left with less than `min_visible` of its area (the boxes must come unclipped
    from the crop) is collapsed to zero width, for ``SanitizeBoundingBoxes`` to drop with its labels."""

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def __init__(self, min_visible: float) -> None:
        super().__init__()
        self.min_visible = float(min_visible)

    def transform(self, inpt: tv_tensors.BoundingBoxes, params: dict[str, Any]) -> tv_tensors.BoundingBoxes:
        b = inpt.as_subclass(Tensor)
        h, w = inpt.canvas_size
        clipped = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
        hidden = visible < self.min_visible * area
        clipped[hidden, 2] = clipped[hidden, 0]
        return tv_tensors.wrap(clipped, like=inpt)


def _per_box(inputs: Any) -> tuple[Tensor, ...]:
    """SanitizeBoundingBoxes' labels_getter: every per-box entry of the target, so all stay aligned."""
    target = inputs[1]
    return tuple(target[k] for k in PER_BOX_KEYS if k in target)


class RandomAugment:
    """Random crop (scale jitter) with box clipping and a min-visible filter, horizontal and vertical flips and colour
    jitter, in that order, as one ``torchvision.transforms.v2`` pipeline; boxes are ``tv_tensors.BoundingBoxes``.

    Every draw comes from ``seed`` (a private RNG state per call: the global torch RNG is left as it was). Boxes are
    clipped to the image first; after the crop, boxes keeping less than ``min_visible`` of their area, or narrower or
    lower than ``min_box_size`` pixels, are dropped with their labels; an image may end with no boxes.

    Args:
        crop_prob: probability of cropping.
        crop_scale: (min, max) fraction of the image area the crop keeps.
        crop_aspect: (min, max) factor on the image's aspect ratio for the crop window (log-uniform).
        min_visible: boxes keeping less than this fraction of their area after the crop are dropped.
        min_box_size: boxes narrower or lower than this (pixels, >= 1) after the crop are dropped.
        hflip, vflip: probabilities of a left-right / top-bottom flip.
        brightness, contrast, saturation: colour jitter strengths (factor drawn from [1 - s, 1 + s]; 0: off).
        hue: colour jitter hue shift (drawn from [-h, h], at most 0.5; 0: off).
    """

    variants = 1

    def __init__(self, crop_prob: float, crop_scale: Sequence[float], crop_aspect: Sequence[float],
                 min_visible: float, min_box_size: float, hflip: float, vflip: float, brightness: float,
                 contrast: float, saturation: float, hue: float) -> None:
        for name, p in (("crop_prob", crop_prob), ("hflip", hflip), ("vflip", vflip), ("min_visible", min_visible)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augment.{name}={p} is not in [0, 1]")
        for name, r, hi in (("crop_scale", crop_scale, 1.0), ("crop_aspect", crop_aspect, math.inf)):
            if len(r) != 2 or not 0.0 < r[0] <= r[1] <= hi:
                bound = "<= 1" if hi == 1.0 else ""
                raise ConfigError(f"augment.{name}={list(r)} must be [min, max] with 0 < min <= max {bound}".rstrip())
        for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if s < 0:
                raise ConfigError(f"augment.{name}={s} must be >= 0 (0: off)")
        if not 0.0 <= hue <= 0.5:
            raise ConfigError(f"augment.hue={hue} is not in [0, 0.5] (0: off)")
        if not min_box_size >= 1:  # SanitizeBoundingBoxes' own limit
            raise ConfigError(f"augment.min_box_size={min_box_size} must be >= 1 (pixels)")
        self.params = dict(crop_prob=crop_prob, crop_scale=list(crop_scale), crop_aspect=list(crop_aspect),
                           min_visible=min_visible, min_box_size=min_box_size, hflip=hflip, vflip=vflip,
                           brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        jitter = {k: v for k, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation),
                                    ("hue", hue)) if v > 0}
        self.pipeline = v2.Compose([
            v2.ClampBoundingBoxes("hard"),  # the visible fraction is of the part inside the image
            v2.RandomApply([RandomAreaCrop(crop_scale, crop_aspect)], p=crop_prob),
            ClipBoxes(min_visible),
            v2.SanitizeBoundingBoxes(min_size=min_box_size, min_area=1.0, labels_getter=_per_box),
            v2.RandomHorizontalFlip(hflip),
            v2.RandomVerticalFlip(vflip),
            *([v2.ColorJitter(**jitter)] if jitter else []),
        ])

    def __call__(self, image: Tensor, target: dict, variant: int = 0, seed: int = 0) -> tuple[Tensor, dict]:
        with torch.random.fork_rng(devices=[]):  # v2 draws from the global CPU RNG: seed it here, restore it after
            torch.default_generator.manual_seed(seed)
            out = self.pipeline(tv_tensors.Image(image), {**target, "boxes": _boxes(target, image)})
        return _plain(*out)

    def __repr__(self) -> str:
        return f"RandomAugment({', '.join(f'{k}={v}' for k, v in self.params.items())})"


class AugmentedDataset(torch.utils.data.Dataset):
    """``dataset`` seen through ``augment`` (None: unchanged): ``augment.variants * len(dataset)`` items, addressed by
    ``(index, seed)`` (see the module docstring); a plain int index ``i`` means ``(i, i)``."""

    def __init__(self, dataset: Any, augment: Optional[Any] = None) -> None:
        if augment is not None and not callable(augment):  # e.g. an experiment's augment.* keys over augment=none
            raise ConfigError(f"augment is {dict(augment) if hasattr(augment, 'keys') else augment!r}, not an "
                              f"augmentation: choose one of conf/augment/ (augment=standard) with those keys")
        self.dataset, self.augment = dataset, augment
        self.variants = int(getattr(augment, "variants", 1))

    def __len__(self) -> int:
        return self.variants * len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, dict]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        n = len(self.dataset)
        if not 0 <= index < self.variants * n:
            raise IndexError(f"index {index} out of range for {self.variants * n} items "
                             f"({n} images x {self.variants} variants)")
        image, target = self.dataset[index % n]
        if self.augment is None:
            return image, target
        return self.augment(image, target, variant=index // n, seed=seed)

    @property
    def categories(self) -> list[dict]:
        return getattr(self.dataset, "categories", [])
