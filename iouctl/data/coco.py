"""COCO-format datasets: the one validation (``data check``, training and every evaluation read the same cleaned
entries), a torch Dataset, and the ``CocoData`` config target.

Validation rules (``validate_coco``). Fatal, never skippable (one line naming the file): missing file, broken JSON
(file:line:col), top level not an object, ``images`` / ``annotations`` / ``categories`` missing or not lists,
malformed, duplicate or no categories. Skippable with ``skip_bad=True`` (counted per kind in the report):

- images: missing ``id`` / ``file_name``, bad ``width`` / ``height``, duplicate id, a ``file_name`` that leads
  outside ``image_dir`` (absolute, or up through ``..``; allowed with ``allow_outside``), file missing from ``image_dir``;
  with images opened (``check_images``): unreadable (corrupt,
  truncated) files and files whose size differs from ``width`` / ``height`` (their annotations are dropped too and
  counted as ``on_skipped_image``);
- annotations: missing required keys, malformed ``bbox``, non-finite box, zero or negative width/height, box
  entirely outside its image, unknown category id, unknown image id, duplicate annotation id, bad ``iscrowd``.

Accepted as third-party files write them, never an error: annotation ids from 0, no ``area`` (computed as w * h),
no ``iscrowd`` (0), images without ``width`` / ``height`` (read from the image header when the image folder is
known); each value filled in is counted in the report's ``notes``. Boxes that stick out of the image only partly are kept unchanged (COCO itself has some).
"""
from __future__ import annotations

import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from iouctl.errors import IouctlError

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val")
_SHOW_IDS = 3  # offending ids quoted per kind in an error line

# kind -> (description, how its examples are labelled); this order is the order of the report
IMAGE_KINDS = {
    "image_missing_keys": ("image entries missing 'id' or 'file_name'", "image ids"),
    "image_bad_size": ("image entries with a bad 'width'/'height'", "image ids"),
    "image_duplicate_id": ("image entries with a duplicated id", "image ids"),
    "outside_folder": ("images whose file_name leads outside the image folder, absolute or through '..' "
                       "(allowed with data.allow_outside=true)", "image id: file"),
    "missing_file": ("images whose file is missing", "image id: file"),
    "unreadable_image": ("images that cannot be decoded (corrupt or truncated)", "image id: file"),
    "size_mismatch": ("images whose size differs from their width/height", "image id: file"),
}
ANNOTATION_KINDS = {
    "missing_keys": ("annotations missing required keys (id, image_id, category_id, bbox)", "ann ids"),
    "bad_bbox": ("annotations whose bbox is not 4 numbers", "ann ids"),
    "nonfinite_box": ("boxes with NaN/inf", "ann ids"),
    "nonpositive_size": ("boxes with zero or negative width/height", "ann ids"),
    "outside_image": ("boxes entirely outside their image", "ann ids"),
    "unknown_category": ("annotations with an unknown category id", "ann ids"),
    "unknown_image": ("annotations pointing at an unknown image id", "ann ids"),
    "duplicate_id": ("duplicate annotation ids", "ann ids"),
    "bad_iscrowd": ("annotations whose iscrowd is not 0/1", "ann ids"),
}
COCO_KINDS = {**IMAGE_KINDS, **ANNOTATION_KINDS}


class DatasetError(IouctlError, ValueError):
    """A dataset that cannot be read as asked; the message is one line naming the file and what is wrong."""


@dataclass
class ValidationReport:
    """What a validation (``validate_coco``, ``convert_voc``) found. ``counts[kind]``: how many bad items of that
    kind (``kinds`` describes them), ``examples[kind]``: the first offenders (ids, ``#index`` when there is no id,
    or file names); ``notes``: counts of deliberate, non-error changes (e.g. VOC difficult -> crowd).
    ``images`` / ``annotations`` / ``categories`` hold the kept (valid) entries."""

    ann_file: Path
    image_dir: Path | None = None
    skip_bad: bool = False
    num_images: int = 0
    num_annotations: int = 0
    on_skipped_image: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(COCO_KINDS), repr=False)
    images: list[dict] = field(default_factory=list, repr=False)
    annotations: list[dict] = field(default_factory=list, repr=False)
    categories: list[dict] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def num_bad(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, ident: str) -> None:
        if kind not in self.kinds:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < _SHOW_IDS:
            ex.append(ident)

    def problems(self) -> str:
        """Bad items as one clause per kind: '2 boxes with NaN/inf (ann ids 5, 9)'."""
        parts = []
        for kind, (desc, what) in self.kinds.items():
            n = self.counts.get(kind, 0)
            if n:
                ids = ", ".join(self.examples[kind])
                more = ", ..." if n > len(self.examples[kind]) else ""
                parts.append(f"{n} {desc} ({what} {ids}{more})")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line: what was kept and what was skipped."""
        s = f"{self.ann_file.name}: {self.num_images} images, {self.num_annotations} annotations"
        s += "".join(f", {n} {k}" for k, n in self.notes.items())
        if self.ok:
            return s + ", no problems"
        verb = "skipped" if self.skip_bad else "found"
        s += f"; {verb} {self.problems()}"
        if self.on_skipped_image:
            s += f"; dropped {self.on_skipped_image} annotations of skipped images"
        return s

    def fingerprint(self) -> str:
        """A short hash of the kept images (id, file_name) and categories (id, name): detections record it, and
        scoring them against another dataset whose image ids happen to overlap is refused instead of giving zeros."""
        import hashlib

        key = json.dumps([sorted((im["id"], im["file_name"]) for im in self.images),
                          sorted((c["id"], c["name"]) for c in self.categories)])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def coco_dict(self) -> dict:
        """The kept (valid, defaults filled) entries as a COCO dict: what trains is what is scored."""
        return {"images": list(self.images), "annotations": list(self.annotations), "categories": list(self.categories)}

    def to_dict(self) -> dict:
        return {"ann_file": str(self.ann_file), "image_dir": None if self.image_dir is None else str(self.image_dir),
                "skip_bad": self.skip_bad, "num_images": self.num_images, "num_annotations": self.num_annotations,
                "on_skipped_image": self.on_skipped_image, "counts": dict(self.counts),
                "examples": {k: list(v) for k, v in self.examples.items()}, "notes": dict(self.notes)}


_NUM = {int, float}  # exact JSON number types (bool excluded); numpy scalars take the general path


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def load_json(path: str | os.PathLike, what: str = "annotation file"):
    """json.load with one-line errors: missing file, or file:line:col of a syntax error."""
    path = Path(path)
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" (folder {path.parent} does not exist either)"
        raise DatasetError(f"{what} not found: {path}{hint}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text at byte {e.start}: invalid JSON") from None


def validate_coco_dict(data, ann_file: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                       skip_bad: bool = False, open_images: bool = False, workers: int = 2,
                       progress: Callable[[int, int], object] | None = None,
                       allow_outside: bool = False) -> ValidationReport:
    """``validate_coco`` on already-loaded JSON (``ann_file`` only names it in messages). Entries are not modified:
    a kept annotation that needed a default (``area``, ``iscrowd``) or an image whose size was read from its file is
    a new dict in the report."""
    ann_file = Path(ann_file)
    rep = ValidationReport(ann_file=ann_file, image_dir=None if image_dir is None else Path(image_dir),
                           skip_bad=skip_bad)

    def fatal(msg: str):
        raise DatasetError(f"{ann_file}: {msg}")

    if not isinstance(data, dict):
        fatal(f"top level must be a JSON object with 'images', 'annotations', 'categories', got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            fatal(f"missing top-level key '{key}' (a COCO file needs 'images', 'annotations', 'categories')")
        if not isinstance(data[key], list):
            fatal(f"'{key}' must be a list, got {type(data[key]).__name__}")

    # categories: fatal on any problem, because ids/labels of everything else depend on them
    cats = []
    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            fatal(f"category #{i} needs an integer 'id' and a string 'name', got {c!r:.80}")
        if c["id"] in cat_ids:
            fatal(f"duplicate category id {c['id']} (category #{i})")
        cat_ids.add(c["id"])
        cats.append(c)
    if not cats:
        fatal("'categories' is empty; a detection dataset needs at least one category {\"id\": 1, \"name\": ...}")
    rep.categories = cats

    # images
    files = None
    if image_dir is not None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise DatasetError(f"image folder not found: {image_dir} (images of {ann_file})")
    images: dict[int, dict] = {}
    skipped_image_ids: set[int] = set()
    id_count: dict[int, int] = {}
    for im in data["images"]:
        if isinstance(im, dict) and _is_int(im.get("id")):
            id_count[im["id"]] = id_count.get(im["id"], 0) + 1
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str) \
                or not im["file_name"]:
            ident = str(im["id"]) if isinstance(im, dict) and _is_int(im.get("id")) else f"#{i}"
            rep.add("image_missing_keys", ident)
            if ident[0] != "#":
                skipped_image_ids.add(im["id"])
            continue
        iid = im["id"]
        if id_count[iid] > 1:  # every entry of a duplicated id is suspect: which one do annotations mean?
            rep.add("image_duplicate_id", str(iid))
            skipped_image_ids.add(iid)
            continue
        w, h = im.get("width"), im.get("height")
        if (w is not None or h is not None) and not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            rep.add("image_bad_size", str(iid))
            skipped_image_ids.add(iid)
            continue
        if image_dir is not None:
            name = im["file_name"]
            if not allow_outside and ("/" in name or "\\" in name) and leaves_folder(name):
                rep.add("outside_folder", f"{iid}: {name}")
                skipped_image_ids.add(iid)
                continue
            if files is None:
                files = _list_files(image_dir)
            if im["file_name"] not in files and not (image_dir / im["file_name"]).is_file():
                rep.add("missing_file", f"{iid}: {im['file_name']}")
                skipped_image_ids.add(iid)
                continue
        images[iid] = im

    if image_dir is not None:
        _check_image_files(rep, images, skipped_image_ids, image_dir, open_images, workers, progress)
    elif any(im.get("width") is None for im in images.values()):
        rep.notes["images without width/height"] = sum(im.get("width") is None for im in images.values())

    # annotations: one pass (COCO train has 860k); exact-type fast paths, the general check only when they miss
    kept = []
    ann_ids: set = set()
    n_area = n_crowd = 0
    add = rep.add
    for i, a in enumerate(data["annotations"]):
        if type(a) is not dict:
            add("missing_keys", f"#{i}")
            continue
        aid = a.get("id")
        if type(aid) is not int and not _is_int(aid):
            add("missing_keys", f"#{i}")
            continue
        if "image_id" not in a or "category_id" not in a or "bbox" not in a:
            add("missing_keys", str(aid))
            continue
        if aid in ann_ids:
            add("duplicate_id", str(aid))
            continue
        ann_ids.add(aid)
        box = a["bbox"]
        if type(box) is not list or len(box) != 4:
            add("bad_bbox", str(aid))
            continue
        x, y, w, h = box
        if not (type(x) in _NUM and type(y) in _NUM and type(w) in _NUM and type(h) in _NUM) \
                and not all(_is_num(v) for v in box):
            add("bad_bbox", str(aid))
            continue
        if not math.isfinite(x + y + w + h) and not all(math.isfinite(v) for v in box):  # a sum can overflow
            add("nonfinite_box", str(aid))
            continue
        if w <= 0 or h <= 0:
            add("nonpositive_size", str(aid))
            continue
        cid = a["category_id"]
        if not ((type(cid) is int or _is_int(cid)) and cid in cat_ids):
            add("unknown_category", str(aid))
            continue
        crowd = a.get("iscrowd")
        if crowd is not None and not (crowd in (0, 1) and (type(crowd) is int or _is_int(crowd))):
            add("bad_iscrowd", str(aid))
            continue
        iid = a["image_id"]
        im = images.get(iid) if type(iid) is int or _is_int(iid) else None
        if im is None:
            if (type(iid) is int or _is_int(iid)) and iid in skipped_image_ids:
                rep.on_skipped_image += 1
            else:
                add("unknown_image", str(aid))
            continue
        iw = im.get("width")
        if iw is not None and (x >= iw or y >= im["height"] or x + w <= 0 or y + h <= 0):
            add("outside_image", str(aid))
            continue
        area = a.get("area")
        if crowd is None or not ((type(area) in _NUM or _is_num(area)) and math.isfinite(area)):
            a = dict(a)
            if crowd is None:
                a["iscrowd"] = 0
                n_crowd += 1
            if not ((type(area) in _NUM or _is_num(area)) and math.isfinite(area)):
                a["area"] = float(w * h)
                n_area += 1
        kept.append(a)
    if n_area:
        rep.notes["area computed as w*h"] = n_area
    if n_crowd:
        rep.notes["iscrowd set to 0"] = n_crowd

    rep.images = list(images.values())
    rep.annotations = kept
    rep.num_images = len(rep.images)
    rep.num_annotations = len(kept)
    if not rep.ok and not skip_bad:
        raise DatasetError(f"{ann_file}: {rep.num_bad} bad entries: {rep.problems()}; "
                           "pass data.skip_bad=true to skip them")
    return rep


def leaves_folder(file_name: str) -> bool:
    """Whether `file_name`, joined to a folder, names a path outside it: absolute (POSIX, UNC or a drive), or up
    through '..' past its start. Lexical: a symlink inside the folder (as `data import` writes) is inside."""
    p = file_name.replace("\\", "/")  # a Windows separator too: the same JSON may be read there
    if p.startswith("/") or (len(p) > 2 and p[0].isalpha() and p[1:3] == ":/"):
        return True
    norm = posixpath.normpath(p)
    return norm == ".." or norm.startswith("../")


def image_size(path: Path, decode: bool) -> tuple[int, int] | str:
    """(width, height) of an image file, or why it cannot be read. decode: decode every pixel (finds truncated
    and corrupt files); otherwise only the header is read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            return im.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _check_image_files(rep: ValidationReport, images: dict[int, dict], skipped: set[int], image_dir: Path,
                       open_images: bool, workers: int, progress: Callable[[int, int], object] | None) -> None:
    """Open images (all of them when ``open_images``, else only those without width/height, header only): fill in
    missing sizes, report unreadable files and sizes that differ from the JSON. Threads: PIL decodes without the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [iid for iid, im in images.items() if open_images or im.get("width") is None]
    if not todo:
        return
    paths = [image_dir / images[iid]["file_name"] for iid in todo]
    total, filled = len(todo), 0
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for k, (iid, size) in enumerate(zip(todo, pool.map(image_size, paths, [open_images] * total,
                                                            chunksize=64))):
            im = images[iid]
            if isinstance(size, str):
                rep.add("unreadable_image", f"{iid}: {im['file_name']} ({size})")
                skipped.add(iid)
                del images[iid]
            elif im.get("width") is None:
                images[iid] = {**im, "width": size[0], "height": size[1]}
                filled += 1
            elif (im["width"], im["height"]) != size:
                rep.add("size_mismatch", f"{iid}: {im['file_name']} is {size[0]}x{size[1]}, "
                                         f"JSON says {im['width']}x{im['height']}")
                skipped.add(iid)
                del images[iid]
            if progress is not None and (k % 256 == 255 or k == total - 1):
                progress(k + 1, total)
    if filled:
        rep.notes["image sizes read from the files"] = filled


def _list_files(image_dir: Path) -> set[str]:
    """Relative paths of the files directly in image_dir (one listdir instead of one stat per image)."""
    try:
        return {e.name for e in os.scandir(image_dir) if not e.is_dir()}
    except OSError as e:
        raise DatasetError(f"cannot list image folder {image_dir}: {e.strerror}") from None


def validate_coco(ann_file: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                  skip_bad: bool = False, open_images: bool = False, workers: int = 2,
                  progress: Callable[[int, int], object] | None = None,
                  allow_outside: bool = False) -> ValidationReport:
    """Check a COCO detection JSON (and, given ``image_dir``, that every image file lies in it, unless
    ``allow_outside``, and exists; with ``open_images``, that each decodes and has the size the JSON says, on
    ``workers`` threads, reporting ``progress(done, total)``).

    Raises DatasetError (one line: file, what, first offending ids, totals, the skip_bad hint) on bad entries unless
    ``skip_bad``; then the bad entries are left out of the report's ``images`` / ``annotations`` and counted."""
    return validate_coco_dict(load_json(ann_file), ann_file, image_dir, skip_bad, open_images, workers, progress,
                              allow_outside)


def read_image(path: str | os.PathLike) -> "torch.Tensor":
    """Load an image file as float32 Tensor[3, H, W] in [0, 1] (RGB; grey and palette images are converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None
    import torch

    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class CocoDetectionDataset:  # a map-style dataset (__len__, __getitem__): what DataLoader needs, without importing torch
    """A COCO detection split, one item per (valid) image, images without annotations included.

    Item: ``(image, target)`` with image float32 Tensor[3, H, W] in [0, 1] and target
    ``{"boxes": float32 Tensor[K, 4] xyxy absolute pixels, "labels": int64 Tensor[K] (dataset category ids),
    "image_id": int, "iscrowd": int64 Tensor[K]}``. Crowd annotations are included (flagged); a detector's training
    loss should ignore them, as COCO evaluation does.

    Attributes: ``categories``, ``image_ids`` (list[int], item order), ``report`` (ValidationReport),
    ``coco_dict()`` (the kept entries as a COCO dict: evaluate against this when ``skip_bad`` dropped anything)."""

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, skip_bad: bool = False,
                 report: ValidationReport | None = None, allow_outside: bool = False):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.report = report if report is not None else validate_coco(self.ann_file, self.image_dir, skip_bad,
                                                                       allow_outside=allow_outside)
        self.categories = self.report.categories
        self.images = sorted(self.report.images, key=lambda im: im["id"])
        self.image_ids = [im["id"] for im in self.images]
        by_image: dict[int, list[dict]] = {iid: [] for iid in self.image_ids}
        for a in self.report.annotations:
            by_image[a["image_id"]].append(a)
        import torch

        self._targets = []
        for iid in self.image_ids:
            anns = by_image[iid]
            b = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            b[:, 2:] += b[:, :2]  # xywh -> xyxy (in float64, then one rounding to float32)
            self._targets.append((
                torch.from_numpy(b.astype(np.float32)),
                torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            ))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} images")
        im = self.images[idx]
        path = self.image_dir / im["file_name"]
        image = read_image(path)
        if im.get("width") is not None and (image.shape[2], image.shape[1]) != (im["width"], im["height"]):
            raise DatasetError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but {self.ann_file} says "
                               f"{im['width']}x{im['height']}")
        boxes, labels, iscrowd = self._targets[idx]
        return image, {"boxes": boxes.clone(), "labels": labels.clone(), "image_id": int(im["id"]),
                       "iscrowd": iscrowd.clone()}

    def coco_dict(self) -> dict:
        """The kept images / annotations / categories as a COCO dict (for pycocotools ``COCO`` / evaluation)."""
        return self.report.coco_dict()

    def __repr__(self) -> str:
        return f"CocoDetectionDataset({self.report.summary()})"


def collate_detection(batch: Iterable) -> tuple[list, list[dict]]:
    """[(image, target), ...] -> (list of images [3, H_i, W_i], list of targets): sizes may differ per image."""
    batch = list(batch)
    if not batch:
        raise ValueError("collate_detection: empty batch; expected a list of (image, target) pairs")
    images, targets = zip(*batch)
    return list(images), list(targets)


CHECK_IMAGES = ("none", "val", "all")
AUTO = "auto"
# `auto` layouts, first whose annotation file exists: COCO's own, then what `iouctl data import` writes (file_name
# relative to images/, which may itself hold train/ and val/ folders: the annotation file decides, never a guess)
_AUTO = (("annotations/instances_{split}2017.json", "{split}2017"), ("annotations/{split}.json", "images"))


class CocoData:
    """Any COCO-format dataset on disk (config target; same interface as ``ShapesData``).

    Args:
        root: dataset folder; relative ``train_ann`` / ``val_ann`` / ``*_images`` paths resolve under it.
        train_ann, val_ann: annotation JSON files; ``auto``: ``annotations/instances_<split>2017.json`` (COCO) or
            ``annotations/<split>.json`` (``iouctl data import``), the first that exists.
        train_images, val_images: image folders; ``auto``: the one of the layout whose annotation file was found
            (``<split>2017`` for COCO's, ``images`` for ``data import``'s).
        skip_bad: skip malformed annotations / missing or broken images (counted in the reports) instead of failing;
            every image of both splits is then opened at ``prepare()``.
        check_images: which splits have every image opened at ``prepare()`` (decodable, size as in the JSON):
            ``none``, ``val`` (an evaluation then never fails after training) or ``all``.
        workers: threads that open images.
        allow_outside: read images whose ``file_name`` leads outside the image folder (absolute, or up through
            ``..``); refused by default, so that a dataset file cannot make iouctl read files elsewhere.
    """

    def __init__(self, root: str, train_ann: str = AUTO, val_ann: str = AUTO, train_images: str = AUTO,
                 val_images: str = AUTO, skip_bad: bool = False, check_images: str = "val", workers: int = 2,
                 allow_outside: bool = False):
        if check_images not in CHECK_IMAGES:
            raise DatasetError(f"data.check_images={check_images!r} is not valid; valid: {', '.join(CHECK_IMAGES)}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise DatasetError(f"data.workers={workers!r} is not valid; give an integer >= 1")
        self.root = Path(root).expanduser()
        self.skip_bad = bool(skip_bad)
        self.check_images = check_images
        self.workers = workers
        self.allow_outside = bool(allow_outside)
        self._given = {("ann", "train"): train_ann, ("ann", "val"): val_ann,
                       ("img", "train"): train_images, ("img", "val"): val_images}
        self._reports: dict[str, ValidationReport] = {}
        self._categories: list[dict] | None = None

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(f"COCO dataset root not found: {self.root}")

    def _path(self, kind: str, split: str) -> Path:
        self._check_split(split)
        given = self._given[(kind, split)]
        if given != AUTO:
            return self.root / given
        ann = self._given[("ann", split)]
        for ann_auto, images in _AUTO:
            found = self.root / ann_auto.format(split=split)
            if ann == AUTO and found.is_file() or ann != AUTO and (self.root / images.format(split=split)).is_dir():
                return found if kind == "ann" else self.root / images.format(split=split)
        key = f"data.{split}_{'ann' if kind == 'ann' else 'images'}"
        self._check_root()
        tried = ", ".join(layout[0 if kind == "ann" else 1].format(split=split) for layout in _AUTO)
        raise DatasetError(f"{key}=auto: none of {tried} exists under {self.root}; give {key}=<path relative to "
                           "data.root>")

    def ann_file(self, split: str) -> Path:
        return self._path("ann", split)

    def image_dir(self, split: str) -> Path:
        return self._path("img", split)

    def report(self, split: str, progress: Callable[[int, int], object] | None = None,
               open_images: bool | None = None) -> ValidationReport:
        """Validation report of a split (validated once, then cached). Images are opened as ``check_images`` says,
        and in every split with ``skip_bad`` (a broken image is then skipped now, not met in a DataLoader worker
        hours into training); ``open_images=False``: never (for commands that read no pixels)."""
        self._check_split(split)
        if split not in self._reports:
            self._check_root()
            if open_images is None:
                open_images = self.check_images in ("all", split) or self.skip_bad
            self._reports[split] = validate_coco(self.ann_file(split), self.image_dir(split), self.skip_bad,
                                                 open_images, self.workers, progress, self.allow_outside)
        return self._reports[split]

    def prepare(self, progress: Callable[[int, int], object] | None = None, open_images: bool | None = None) -> None:
        """Validate both splits (raises DatasetError unless skip_bad) and check they share categories."""
        self._check_root()
        for split in SPLITS:
            self.report(split, progress, open_images)
        check_same_categories(self._reports["train"], self._reports["val"])

    @property
    def categories(self) -> list[dict]:
        """COCO categories [{"id", "name", ...}] (read from the val file, the smaller one in COCO)."""
        if self._categories is None:
            if "val" in self._reports:
                self._categories = self._reports["val"].categories
            else:
                self._check_root()
                data = load_json(self.ann_file("val"))
                cats = data.get("categories") if isinstance(data, dict) else None
                if not isinstance(cats, list):
                    raise DatasetError(f"{self.ann_file('val')}: missing top-level list 'categories'")
                self._categories = cats
        return self._categories

    @property
    def num_classes(self) -> int:
        """Number of categories (category ids need not be contiguous: map them, e.g. via ``categories``)."""
        return len(self.categories)

    def dataset(self, split: str) -> CocoDetectionDataset:
        rep = self.report(split)
        return CocoDetectionDataset(self.image_dir(split), self.ann_file(split), self.skip_bad, report=rep)

    def __repr__(self) -> str:
        return f"CocoData(root={str(self.root)!r}, given={ {f'{k}_{s}': v for (k, s), v in self._given.items()} })"


def check_same_categories(train: ValidationReport, val: ValidationReport) -> None:
    """Train and val must share category ids and names (the model's classes are the training split's)."""
    a, b = ({c["id"]: c["name"] for c in r.categories} for r in (train, val))
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise DatasetError(f"{train.ann_file} and {val.ann_file} have different categories (e.g. "
                           f"{', '.join(f'{i}: {n!r}' for i, n in diff)}); train and val must share category ids "
                           "and names")
