"""What a dataset's annotations say about the model sizes it needs: image sizes, objects per image, box sizes and
aspect ratios, per-class counts (``split_stats``), and the sizes derived from them (``suggest_sizes``).

Everything is read from a split's COCO dict; an image file is opened (its header only) just when the entry has no
``width``/``height``. Crowd boxes are counted, but left out of the box statistics: detectors ignore them in training.

The rule ``suggest_sizes`` applies (what ``model.min_size=auto``, ``max_size=auto``, ``anchor_sizes=auto`` use):

- Image size: the median image at its own resolution, i.e. ``min_size`` = the median shorter side and ``max_size`` =
  the median longer side of the training images, both scaled down together if they exceed torchvision's 800 / 1333.
  No rounding: the detector pads its batch to a multiple of 32 anyway, and resampling blurs the box edges a
  localization study measures.
- Anchors: one size per pyramid level, doubling per level (the strides double too). The smallest is the 5th
  percentile of the box size sqrt(w*h) *after the resize* times sqrt(2): a box of the same shape and centre matches
  an anchor at IoU >= 0.5 while their sides differ by at most sqrt(2) (IoU = (small / large)^2), so each anchor
  serves the sizes [a / sqrt(2), a * sqrt(2)] and the ladder covers the 5th percentile upwards without gaps. The
  number of levels is what covers the 95th percentile, clamped to the model's own range (``AnchorPyramid``).
- Aspect ratios (anchor h/w, torchvision's convention): same-area boxes whose h/w differ by a factor q overlap at
  IoU 1 / (2 sqrt(q) - 1), >= 0.5 while q <= 2.25. The configured ratios are kept while they cover the 5th..95th
  percentile of the boxes' h/w that way; otherwise the ladder is extended by factors of 2 until it does.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from iouctl.data.coco import DatasetError, image_size

PERCENTILES = (5, 25, 50, 75, 95)
MAX_MIN_SIZE, MAX_MAX_SIZE = 800, 1333  # torchvision's detection defaults: the caps of the image-size rule
SIZE_BAND = math.sqrt(2.0)  # an anchor serves box sizes within this factor (IoU >= 0.5, same shape and centre)
RATIO_BAND = 2.25  # an anchor ratio serves box h/w within this factor (IoU >= 0.5, same area and centre)


@dataclass(frozen=True)
class SplitBoxes:
    """A split's geometry as arrays: what the statistics and the size rule read.

    image_sizes: float64 [N, 2] (width, height) per image; boxes: float64 [M, 2] (width, height) of the non-crowd
    boxes; box_image: int64 [M] row of ``image_sizes`` of each box; labels: int64 [M] category ids."""

    image_sizes: np.ndarray
    boxes: np.ndarray
    box_image: np.ndarray
    labels: np.ndarray
    num_crowd: int
    categories: list = field(default_factory=list)


@dataclass(frozen=True)
class AnchorPyramid:
    """Where a detector's anchors go: the stride of its first pyramid level and how many levels it can have
    (``min_levels`` keeps every backbone stage in the FPN)."""

    first_stride: int
    min_levels: int
    max_levels: int


@dataclass(frozen=True)
class SizeSuggestion:
    """Model sizes for a dataset, each with the one-line reason for it. ``aspect_ratios`` is None when the
    configured ratios already cover the data."""

    min_size: int
    max_size: int
    anchor_sizes: list | None
    aspect_ratios: list | None
    reasons: dict = field(default_factory=dict)

    def overrides(self) -> list[str]:
        out = [f"model.min_size={self.min_size}", f"model.max_size={self.max_size}"]
        if self.anchor_sizes is not None:
            out.append(f"model.anchor_sizes=[{','.join(str(s) for s in self.anchor_sizes)}]")
        if self.aspect_ratios is not None:
            out.append(f"model.aspect_ratios=[{','.join(_fmt(r) for r in self.aspect_ratios)}]")
        return out


def read_split(coco: dict, image_dir: str | os.PathLike | None = None) -> SplitBoxes:
    """The geometry of a (validated) COCO dict. Images without width/height are measured from their file under
    ``image_dir`` (header only); without an ``image_dir`` that is a DatasetError."""
    images = coco.get("images", [])
    row = {im["id"]: i for i, im in enumerate(images)}
    sizes = np.zeros((len(images), 2), dtype=np.float64)
    for i, im in enumerate(images):
        w, h = im.get("width"), im.get("height")
        if w is None or h is None:
            w, h = _image_size(im, image_dir)
        sizes[i] = (w, h)
    anns = [a for a in coco.get("annotations", []) if a["image_id"] in row]
    kept = [a for a in anns if not a.get("iscrowd", 0)]
    boxes = np.array([a["bbox"][2:] for a in kept], dtype=np.float64).reshape(-1, 2)
    return SplitBoxes(sizes, boxes, np.array([row[a["image_id"]] for a in kept], dtype=np.int64),
                      np.array([a["category_id"] for a in kept], dtype=np.int64), len(anns) - len(kept),
                      list(coco.get("categories", [])))


def _image_size(im: dict, image_dir) -> tuple[int, int]:
    if image_dir is None:
        raise DatasetError(f"image {im['id']} ({im['file_name']}) has no width/height and no image folder was given")
    size = image_size(Path(image_dir) / im["file_name"], decode=False)
    if isinstance(size, str):
        raise DatasetError(f"cannot read image {Path(image_dir) / im['file_name']}: {size}")
    return size


def _summary(values: np.ndarray, keys: Sequence[str]) -> dict:
    """{key: value} for keys among min, median, max, mean, p<q> (numpy's linear percentiles); None when empty."""
    if values.size == 0:
        return {k: None for k in keys}
    out = {}
    for k in keys:
        if k == "min":
            v = values.min()
        elif k == "max":
            v = values.max()
        elif k == "median":
            v = np.median(values)
        elif k == "mean":
            v = values.mean()
        else:
            v = np.percentile(values, float(k[1:]))
        out[k] = float(v)
    return out


BOX_KEYS = ("min", *(f"p{q}" for q in PERCENTILES), "max")


def split_stats(s: SplitBoxes) -> dict:
    """Image sizes (min/median/max), objects per image (min/median/p95/max/mean, images without objects), box size
    sqrt(w*h), width, height and aspect ratio w/h (min, p5..p95, max), per-class counts (non-crowd boxes)."""
    per_image = np.bincount(s.box_image, minlength=len(s.image_sizes)).astype(np.float64)
    w, h = s.boxes[:, 0], s.boxes[:, 1]
    counts = {int(c): int(n) for c, n in zip(*np.unique(s.labels, return_counts=True))}
    return {
        "images": len(s.image_sizes), "boxes": len(s.boxes), "crowd_boxes": s.num_crowd,
        "image_width": _summary(s.image_sizes[:, 0], ("min", "median", "max")),
        "image_height": _summary(s.image_sizes[:, 1], ("min", "median", "max")),
        "objects_per_image": _summary(per_image, ("min", "median", "p95", "max", "mean")),
        "images_without_objects": int((per_image == 0).sum()),
        "box_size": _summary(np.sqrt(w * h), BOX_KEYS),
        "box_width": _summary(w, BOX_KEYS),
        "box_height": _summary(h, BOX_KEYS),
        "aspect_ratio": _summary(w / h if len(h) else w, BOX_KEYS),
        "classes": {c["name"]: counts.get(c["id"], 0) for c in s.categories},
    }


def resize_scales(image_sizes: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Per image, the factor the detectors' transform (torchvision's GeneralizedRCNNTransform) resizes it by:
    min(min_size / shorter side, max_size / longer side)."""
    short, long = image_sizes.min(axis=1), image_sizes.max(axis=1)
    return np.minimum(min_size / short, max_size / long)


def suggest_image_size(s: SplitBoxes) -> tuple[int, int, str]:
    """(min_size, max_size, reason): the median image at its own resolution, within 800 x 1333."""
    if len(s.image_sizes) == 0:
        raise DatasetError("no images in the training split: nothing to derive model sizes from")
    short = float(np.median(s.image_sizes.min(axis=1)))
    long = float(np.median(s.image_sizes.max(axis=1)))
    scale = min(1.0, MAX_MIN_SIZE / short, MAX_MAX_SIZE / long)
    lo, hi = max(1, round(short * scale)), max(1, round(long * scale))
    why = f"the median image ({_fmt(short)} x {_fmt(long)} px, shorter x longer side) at its own resolution"
    if scale < 1:
        why = (f"the median image ({_fmt(short)} x {_fmt(long)} px) scaled by {scale:.3f} to fit "
               f"{MAX_MIN_SIZE} x {MAX_MAX_SIZE}")
    return lo, hi, why


def suggest_anchor_sizes(s: SplitBoxes, min_size: int, max_size: int, pyramid: AnchorPyramid) -> tuple[list, str]:
    """(anchor sizes, one per level, reason): see the module docstring."""
    if len(s.boxes) == 0:
        raise DatasetError("no boxes in the training split: nothing to derive anchor sizes from")
    scale = resize_scales(s.image_sizes, min_size, max_size)[s.box_image]
    size = np.sqrt(s.boxes[:, 0] * s.boxes[:, 1]) * scale
    p5, p95 = (float(v) for v in np.percentile(size, (5, 95)))
    first = max(1, round(p5 * SIZE_BAND))
    # level l serves sizes up to first * 2^l * sqrt(2); the fewest levels that reach p95
    needed = max(1, math.ceil(math.log2(p95 / (first * SIZE_BAND)) - 1e-9) + 1)
    levels = min(max(needed, pyramid.min_levels), pyramid.max_levels)
    sizes = [first * 2 ** lvl for lvl in range(levels)]
    why = (f"box size sqrt(w*h) after the resize p5..p95 = {p5:.1f}..{p95:.1f} px: smallest anchor "
           f"p5 x sqrt(2) = {first}, doubling per level, {levels} levels (stride {pyramid.first_stride} first)")
    top = sizes[-1] * SIZE_BAND
    if top < p95:
        why += f"; boxes above {top:.0f} px rely on low-quality matches (at most {pyramid.max_levels} levels)"
    if p5 < pyramid.first_stride:
        why += (f"; p5 is under the first level's stride ({pyramid.first_stride} px): the smallest objects are "
                "finer than the anchor grid, consider upsampling (a larger model.min_size/max_size)")
    return sizes, why


def suggest_aspect_ratios(s: SplitBoxes, configured: Sequence[float]) -> tuple[list | None, str]:
    """(ratios or None when the configured ones cover the data, reason); ratios are anchor h/w."""
    ratios = sorted(float(r) for r in configured)
    if len(s.boxes) == 0 or not ratios:
        return None, "no boxes: aspect ratios kept"
    lo, hi = (float(v) for v in np.percentile(s.boxes[:, 1] / s.boxes[:, 0], (5, 95)))
    while lo < ratios[0] / RATIO_BAND:
        ratios.insert(0, ratios[0] / 2)
    while hi > ratios[-1] * RATIO_BAND:
        ratios.append(ratios[-1] * 2)
    covered = f"{_fmt(ratios[0] / RATIO_BAND)}..{_fmt(ratios[-1] * RATIO_BAND)}"
    if len(ratios) == len(configured):
        return None, (f"box h/w p5..p95 = {lo:.2f}..{hi:.2f}, within what the configured ratios "
                      f"[{', '.join(_fmt(r) for r in configured)}] match at IoU >= 0.5 ({covered}): kept")
    return ratios, (f"box h/w p5..p95 = {lo:.2f}..{hi:.2f}: ratios extended by factors of 2 to match "
                    f"{covered} at IoU >= 0.5")


def suggest_sizes(s: SplitBoxes, pyramid: AnchorPyramid | None, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                  min_size: int | None = None, max_size: int | None = None) -> SizeSuggestion:
    """The sizes for training on split ``s`` (the training split): image size, anchors (after that resize; None
    without a ``pyramid``) and aspect ratios. A given ``min_size`` / ``max_size`` is kept (the other one is derived
    and made consistent with it)."""
    lo, hi, why_size = suggest_image_size(s)
    if min_size is not None and max_size is not None:
        lo, hi, why_size = min_size, max_size, f"as configured ({min_size}, {max_size})"
    elif min_size is not None:
        lo, hi = min_size, max(hi, min_size)
        why_size = f"max_size from {why_size}; min_size {min_size} as configured"
    elif max_size is not None:
        lo, hi = min(lo, max_size), max_size
        why_size = f"min_size from {why_size}; max_size {max_size} as configured"
    anchors, why_anchors = suggest_anchor_sizes(s, lo, hi, pyramid) if pyramid is not None else (None, "")
    ratios, why_ratios = suggest_aspect_ratios(s, aspect_ratios)
    return SizeSuggestion(lo, hi, anchors, ratios, {"image size": why_size, "anchor sizes": why_anchors,
                                                     "aspect ratios": why_ratios})


def _fmt(x: float) -> str:
    return f"{x:g}" if abs(x - round(x, 3)) < 1e-9 else f"{x:.3g}"
