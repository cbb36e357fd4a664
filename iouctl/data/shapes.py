"""Built-in ``shapes`` dataset: crowded, occluded, textured geometric shapes in COCO format.

Generated deterministically from a seed and cached once per parameter set:

    <cache_dir>/shapes-v<GENERATOR_VERSION>-<hash>/
        params.json
        annotations/instances_train.json, annotations/instances_val.json
        train/000000.png ...,  val/000000.png ...

Conventions (documented because a localization benchmark lives or dies by them):
- Pixel (row i, col j) covers the continuous square [j, j+1) x [i, i+1); shapes are rasterised by testing
  pixel centres (j+0.5, i+0.5), without anti-aliasing, so every pixel belongs to exactly one object or the background.
- GT box = tight *amodal* box of the full shape mask (occluded parts included), COCO ``[x, y, w, h]`` in pixel
  edges: x = first covered column, w = last covered column + 1 - x. Shapes are always fully inside the image.
- Objects are drawn in order, later ones occlude earlier ones. An object is only added if afterwards every object
  keeps at least ``min_visible`` of its pixels visible; so every drawn object is annotated and no GT is invisible
  (no unlabeled fragments either). ``segmentation`` is the RLE of the *visible* mask, ``area`` its pixel count,
  ``visible_fraction`` the visible / full pixel ratio.
- Crowding: with probability ``cluster_prob`` a new object joins a cluster: same class as an existing object,
  similar size, centre shifted by 0.2..0.6 of its size, so same-class boxes overlap (IoU often > 0.3) and NMS matters.
- Train image i uses seed stream (seed, 0, i), val image i (seed, 1, i): the splits never share images.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from iouctl.data.coco import DatasetError
from iouctl.fileio import atomic_write_json

# Bump when the generator's output changes for the same parameters: a new cache folder follows.
GENERATOR_VERSION = 1

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ellipse", "star", "ring", "hexagon")
DEFAULT_CLASSES = ("circle", "square", "triangle", "cross", "ellipse")
SPLITS = ("train", "val")
_SPLIT_STREAM = {"train": 0, "val": 1}
# Tries per object before giving up on placing it (a crowded image may end with fewer than requested objects).
_PLACE_TRIES = 30


class ShapesError(DatasetError):
    """Bad ``ShapesData`` parameter or a damaged cache folder."""


# ----------------------------------------------------------------------------------------------- geometry

def _polygon_mask(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon. u, v: Tensor-like float arrays [H, W]; verts: [N, 2]. Returns bool [H, W]."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x0, y0 = verts[k]
        x1, y1 = verts[(k + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        # x of the edge at height v; the division is safe where `crosses` (then y1 != y0)
        with np.errstate(divide="ignore", invalid="ignore"):
            xe = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < xe)
    return inside


def _regular(n: int, r: float, phase: float) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, size: float, angle: float, aspect: float) -> np.ndarray:
    """Mask of one shape centred at (0, 0). u, v: [H, W] offsets of pixel centres; size: nominal diameter in px;
    angle: rotation in radians; aspect: minor/major ratio (ellipse only). Returns bool [H, W]."""
    c, s = math.cos(angle), math.sin(angle)
    ur = u * c + v * s
    vr = -u * s + v * c
    r = size / 2
    if shape == "circle":
        return ur * ur + vr * vr <= r * r
    if shape == "ring":
        d2 = ur * ur + vr * vr
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if shape == "ellipse":
        return (ur / r) ** 2 + (vr / (r * aspect)) ** 2 <= 1.0
    if shape == "square":
        h = 0.8 * r
        return (np.abs(ur) <= h) & (np.abs(vr) <= h)
    if shape == "cross":
        a, b = np.abs(ur), np.abs(vr)
        t = 0.32 * r
        return ((a <= r) & (b <= t)) | ((a <= t) & (b <= r))
    if shape == "triangle":
        return _polygon_mask(ur, vr, _regular(3, r, -math.pi / 2))
    if shape == "hexagon":
        return _polygon_mask(ur, vr, _regular(6, r, 0.0))
    if shape == "star":
        outer = _regular(5, r, -math.pi / 2)
        inner = _regular(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        verts = np.empty((10, 2))
        verts[0::2], verts[1::2] = outer, inner
        return _polygon_mask(ur, vr, verts)
    raise ShapesError(f"unknown shape {shape!r}; valid: {', '.join(SHAPE_NAMES)}")


# ----------------------------------------------------------------------------------------------- rendering

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    """Bilinear upsampling of a random (cells+1)^2 grid: smooth texture in [0, 1], float32 [h, w, channels]."""
    grid = rng.random((cells + 1, cells + 1, channels)).astype(np.float32)

    def hat(n: int) -> np.ndarray:  # [n, cells+1] linear-interpolation weights (a separable bilinear resize)
        pos = np.linspace(0, cells, n, dtype=np.float32)
        return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells + 1, dtype=np.float32)[None, :]))

    rows = (hat(h) @ grid.reshape(cells + 1, -1)).reshape(h, cells + 1, channels)
    return np.matmul(hat(w)[None], rows)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outside the array counts as background)."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _pick_color(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float = 0.3) -> np.ndarray:
    """A fill colour whose fill and 0.5x outline both differ from every colour in `avoid` (max-channel distance)."""
    best, best_d = None, -1.0
    for _ in range(20):
        col = rng.uniform(0.08, 0.97, 3)
        d = min(min(np.abs(col - a).max(), np.abs(0.5 * col - a).max()) for a in avoid)
        if d >= min_dist:
            return col
        if d > best_d:
            best, best_d = col, d
    return best


class _Obj:
    __slots__ = ("cls", "size", "cx", "cy", "win", "mask", "full", "visible")


def render_image(rng: np.random.Generator, *, image_size: int, classes: Sequence[str], min_objects: int,
                 max_objects: int, min_size: float, max_size: float, cluster_prob: float, min_visible: float,
                 noise: float, texture: bool) -> tuple[np.ndarray, list[dict]]:
    """Render one image. Returns (uint8 [S, S, 3], objects) where each object is
    {"class": int index into classes, "bbox": [x, y, w, h] (ints, pixel edges), "visible_mask": bool [S, S],
    "visible_fraction": float}, in drawing order (later occludes earlier)."""
    S = image_size
    if texture:
        base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
        bg = base + 0.35 * (_smooth_noise(rng, S, S, 3, 3) - 0.5) + 0.2 * (_smooth_noise(rng, S, S, 12, 3) - 0.5)
        bg = np.clip(bg, 0.0, 1.0)
    else:
        bg = np.broadcast_to(rng.uniform(0.1, 0.9, 3).astype(np.float32), (S, S, 3)).copy()
    canvas = bg.copy()
    owner = np.full((S, S), -1, dtype=np.int32)
    objs: list[_Obj] = []
    target = int(rng.integers(min_objects, max_objects + 1))
    yy, xx = np.mgrid[0:S, 0:S]

    for _ in range(target * _PLACE_TRIES):
        if len(objs) >= target:
            break
        if objs and rng.random() < cluster_prob:
            anchor = objs[int(rng.integers(len(objs)))]
            cls = anchor.cls
            size = float(np.clip(anchor.size * rng.uniform(0.8, 1.25), min_size, max_size))
            dist = rng.uniform(0.2, 0.6) * size
            theta = rng.uniform(0, 2 * math.pi)
            cx, cy = anchor.cx + dist * math.cos(theta), anchor.cy + dist * math.sin(theta)
        else:
            cls = int(rng.integers(len(classes)))
            size = float(rng.uniform(min_size, max_size))
            cx, cy = rng.uniform(0, S), rng.uniform(0, S)
        angle = float(rng.uniform(-0.35, 0.35) if classes[cls] == "square" else rng.uniform(0, 2 * math.pi))
        aspect = float(rng.uniform(0.45, 0.7))
        # window that contains the whole shape (every shape fits in a disc of radius size/2)
        rad = size / 2 + 1
        x0, x1 = math.floor(cx - rad), math.ceil(cx + rad)
        y0, y1 = math.floor(cy - rad), math.ceil(cy + rad)
        if x0 < 0 or y0 < 0 or x1 > S or y1 > S:
            continue  # keep shapes fully inside the image so the amodal box is the drawn box
        win = (slice(y0, y1), slice(x0, x1))
        m = shape_mask(classes[cls], xx[win] + 0.5 - cx, yy[win] + 0.5 - cy, size, angle, aspect)
        full = int(m.sum())
        if full == 0:
            continue
        # pixels each existing object would lose under the new one
        covered = owner[win][m]
        lost = np.bincount(covered[covered >= 0], minlength=len(objs))
        if any(o.visible - lost[i] < min_visible * o.full for i, o in enumerate(objs)):
            continue
        for i, o in enumerate(objs):
            o.visible -= int(lost[i])
        o = _Obj()
        o.cls, o.size, o.cx, o.cy, o.win, o.mask, o.full, o.visible = cls, size, cx, cy, win, m, full, full
        owner[win][m] = len(objs)
        objs.append(o)

        # paint: a fill that contrasts with what it covers and with the plain background there (optionally
        # textured), and a darker 1-px inner outline so touching same-class instances stay separable
        col = _pick_color(rng, [canvas[win][m].mean(axis=0), bg[win][m].mean(axis=0)])
        fill = np.broadcast_to(col.astype(np.float32), m.shape + (3,)).copy()
        if texture:
            kind = int(rng.integers(3))
            if kind == 1:  # stripes, random direction and period
                phi, period = rng.uniform(0, math.pi), rng.uniform(3, 8)
                proj = (xx[win] * math.cos(phi) + yy[win] * math.sin(phi)) * (2 * math.pi / period)
                fill += (0.12 * np.sin(proj))[..., None].astype(np.float32)
            elif kind == 2:  # blotches
                fill += 0.25 * (_smooth_noise(rng, m.shape[0], m.shape[1], 3, 1) - 0.5)
        edge = m & ~_erode(m)
        fill[edge] = 0.5 * col
        region = canvas[win]
        region[m] = fill[m]

    if noise > 0:
        canvas = canvas + np.float32(noise) * rng.standard_normal(canvas.shape, dtype=np.float32)
    img = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)

    out = []
    for k, o in enumerate(objs):
        rows = np.flatnonzero(o.mask.any(axis=1))
        cols = np.flatnonzero(o.mask.any(axis=0))
        y0, x0 = o.win[0].start, o.win[1].start
        bx, by = x0 + int(cols[0]), y0 + int(rows[0])
        bbox = [bx, by, x0 + int(cols[-1]) + 1 - bx, y0 + int(rows[-1]) + 1 - by]
        out.append({"class": o.cls, "bbox": bbox, "visible_mask": owner == k,
                    "visible_fraction": o.visible / o.full})
    return img, out


# ----------------------------------------------------------------------------------------------- dataset

class ShapesData:
    """Built-in dataset (the default). ``prepare()`` writes it once; ``dataset(split)`` reads it.

    Args:
        cache_dir: parent folder of the per-parameter cache folders.
        seed: master seed; train and val use different streams of it.
        num_train, num_val: images per split.
        image_size: square image side in px.
        min_objects, max_objects: objects requested per image (uniform); a full image may end with fewer.
        classes: shape names, category ids 1..len(classes) in this order; valid: SHAPE_NAMES.
        min_size, max_size: nominal shape diameter in px.
        cluster_prob: probability that a new object joins a same-class overlapping cluster.
        min_visible: least visible fraction of every object's pixels (occlusion limit).
        noise: std of per-pixel Gaussian sensor noise, in [0, 1] intensity units.
        texture: textured background and object fills (False: flat colours, useful for exact tests).
    """

    def __init__(self, cache_dir: str, seed: int = 0, num_train: int = 2048, num_val: int = 128,
                 image_size: int = 128, min_objects: int = 3, max_objects: int = 12,
                 classes: Sequence[str] | None = None, min_size: float = 12.0, max_size: float = 40.0,
                 cluster_prob: float = 0.5, min_visible: float = 0.35, noise: float = 0.06, texture: bool = True):
        classes = tuple(str(c) for c in (DEFAULT_CLASSES if classes is None else classes))
        self.params = {
            "seed": int(seed), "num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size),
            "min_objects": int(min_objects), "max_objects": int(max_objects), "classes": list(classes),
            "min_size": float(min_size), "max_size": float(max_size), "cluster_prob": float(cluster_prob),
            "min_visible": float(min_visible), "noise": float(noise), "texture": bool(texture),
        }
        self._check(self.params)
        self.cache_dir = Path(cache_dir).expanduser()
        key = json.dumps({"version": GENERATOR_VERSION, **self.params}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        self.root = self.cache_dir / f"shapes-v{GENERATOR_VERSION}-{digest}"
        self.categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(classes)]
        self.num_classes = len(classes)
        self._reports: dict = {}

    @staticmethod
    def _check(p: dict) -> None:
        def bad(what: str) -> None:
            raise ShapesError(f"shapes dataset: {what}")
        if p["num_train"] < 0 or p["num_val"] < 0:
            bad(f"num_train/num_val must be >= 0, got {p['num_train']}/{p['num_val']}")
        if not 8 <= p["image_size"] <= 4096:
            bad(f"image_size must be in [8, 4096], got {p['image_size']}")
        if not 0 <= p["min_objects"] <= p["max_objects"]:
            bad(f"need 0 <= min_objects <= max_objects, got {p['min_objects']}, {p['max_objects']}")
        if not p["classes"]:
            bad(f"classes must not be empty; valid names: {', '.join(SHAPE_NAMES)}")
        unknown = [c for c in p["classes"] if c not in SHAPE_NAMES]
        if unknown:
            bad(f"unknown class(es) {unknown}; valid names: {', '.join(SHAPE_NAMES)}")
        if len(set(p["classes"])) != len(p["classes"]):
            bad(f"duplicate class names in {p['classes']}")
        if not (4.0 <= p["min_size"] <= p["max_size"] <= p["image_size"] - 2):
            bad(f"need 4 <= min_size <= max_size <= image_size - 2, got {p['min_size']}, {p['max_size']}, "
                f"image_size {p['image_size']}")
        if not 0.0 <= p["cluster_prob"] <= 1.0:
            bad(f"cluster_prob must be in [0, 1], got {p['cluster_prob']}")
        if not 0.0 < p["min_visible"] <= 1.0:
            bad(f"min_visible must be in (0, 1], got {p['min_visible']}")
        if not (0.0 <= p["noise"] <= 1.0):
            bad(f"noise must be in [0, 1], got {p['noise']}")

    # -- paths
    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ShapesError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")

    def ann_file(self, split: str) -> Path:
        self._check_split(split)
        return self.root / "annotations" / f"instances_{split}.json"

    def image_dir(self, split: str) -> Path:
        self._check_split(split)
        return self.root / split

    # -- generation
    def prepare(self, progress: Callable[[int, int], object] | None = None, open_images: bool | None = None) -> None:
        """Generate the dataset into ``root`` unless it is there already (then a no-op).

        Builds in a temp folder next to ``root`` and renames it into place: an interrupted run leaves no
        half dataset, and of two concurrent runs the first rename wins (both produce identical bytes).
        ``open_images`` is accepted for ``CocoData``'s interface: generated images are never opened to check them."""
        if self.root.is_dir():
            missing = [str(f) for f in (self.ann_file(s) for s in SPLITS) if not f.is_file()]
            if missing:
                raise ShapesError(f"damaged shapes cache {self.root}: missing {missing[0]}; delete the folder "
                                  "to regenerate it")
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.", suffix=".tmp", dir=self.cache_dir))
        try:
            self._generate(tmp, progress)
            try:
                os.rename(tmp, self.root)
            except OSError:
                if not self.root.is_dir():  # a concurrent prepare() won the race otherwise
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _generate(self, out: Path, progress: Callable[[int, int], object] | None) -> None:
        from PIL import Image

        p = self.params
        total = p["num_train"] + p["num_val"]
        done = 0
        atomic_write_json(out / "params.json", {"generator_version": GENERATOR_VERSION, **p})
        for split in SPLITS:
            n = p[f"num_{split}"]
            img_dir = out / split
            img_dir.mkdir(parents=True)
            images, anns = [], []
            for i in range(n):
                rng = np.random.default_rng([p["seed"], _SPLIT_STREAM[split], i])
                img, objs = render_image(
                    rng, image_size=p["image_size"], classes=p["classes"], min_objects=p["min_objects"],
                    max_objects=p["max_objects"], min_size=p["min_size"], max_size=p["max_size"],
                    cluster_prob=p["cluster_prob"], min_visible=p["min_visible"], noise=p["noise"],
                    texture=p["texture"])
                name = f"{i:06d}.png"
                # compress_level 1: ~3x faster than the default on noisy images, still lossless
                Image.fromarray(img).save(img_dir / name, format="PNG", compress_level=1)
                image_id = i + 1
                images.append({"id": image_id, "file_name": name, "width": p["image_size"],
                               "height": p["image_size"]})
                for o in objs:
                    anns.append({
                        "id": len(anns) + 1, "image_id": image_id, "category_id": o["class"] + 1,
                        "bbox": o["bbox"], "area": int(o["visible_mask"].sum()), "iscrowd": 0,
                        "segmentation": _rle(o["visible_mask"]),
                        "visible_fraction": round(float(o["visible_fraction"]), 4),
                    })
                done += 1
                if progress is not None:
                    progress(done, total)
            coco = {
                "info": {"description": f"iouctl built-in shapes dataset ({split})",
                         "generator_version": GENERATOR_VERSION, "params": p},
                "licenses": [], "images": images, "annotations": anns, "categories": self.categories,
            }
            atomic_write_json(out / "annotations" / f"instances_{split}.json", coco, indent=None)

    # -- reading
    def report(self, split: str, progress: Callable[[int, int], object] | None = None):
        """The split's ``ValidationReport`` (generating the data first if needed; validated once, then cached)."""
        from iouctl.data.coco import validate_coco

        self._check_split(split)
        if split not in self._reports:
            self.prepare()
            self._reports[split] = validate_coco(self.ann_file(split), self.image_dir(split))
        return self._reports[split]

    def dataset(self, split: str):
        """The split as a ``CocoDetectionDataset`` (generating the data first if needed)."""
        from iouctl.data.coco import CocoDetectionDataset

        return CocoDetectionDataset(self.image_dir(split), self.ann_file(split), report=self.report(split))

    def __repr__(self) -> str:
        return f"ShapesData(root={str(self.root)!r}, params={self.params})"


def _rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a bool [H, W] mask, JSON-ready (counts as str)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
