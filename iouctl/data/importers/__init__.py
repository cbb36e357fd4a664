"""Labelled datasets in other formats -> a COCO-format dataset folder (``iouctl data import FORMAT SOURCE``).

One module per format (``voc.py``, ``yolo.py``, ``csv.py``; the format's name is the module's name), each with
``read(source, report, **options) -> Source``: the images with their boxes in the format's own coordinates, problems
added to ``report``. Everything after reading is shared and lives here: image sizes from the file headers, box
checks, the class list, the train/val split, the COCO dicts and the output folder::

    DIR/annotations/train.json, DIR/annotations/val.json   COCO detection JSON (image and annotation ids from 1)
    DIR/images/<path relative to the source>                symlinks to the source images (or copies); file_name

Categories: ids 1..K in the order of ``classes`` (a ``--classes`` file), else the order the format defines (YOLO's
class indices), else the class names found, sorted. Both splits carry the same list.
"""
from __future__ import annotations

import importlib
import math
import inspect
import os
import pkgutil
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from iouctl.data.coco import SPLITS, DatasetError, ValidationReport, image_size, validate_coco_dict
from iouctl.fileio import atomic_write_json

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ANNOTATIONS = "annotations"
IMAGES = "images"
DEFAULT_VAL_FRACTION = 0.2


def formats() -> list[str]:
    """The importable formats: the format modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def parse_number(s: str | None) -> float | None:
    """A finite number written as text, or None (empty, missing, not a number, inf/nan)."""
    try:
        v = float(s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def problem_kinds(entry: str, format_kinds: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Report kinds of an importer: its own (file-level) kinds, then the checks every format shares. ``entry`` says
    how an offending object is named in messages, e.g. "file object #" or "file:line"."""
    return {
        **format_kinds,
        "missing_file": ("images whose file is missing", "files"),
        "unreadable_image": ("images that cannot be read as an image", "files"),
        "size_mismatch": ("images whose size differs from their annotation's", "files"),
        "duplicate_image": ("images annotated by more than one file", "files"),
        "unknown_class": ("objects of an unknown class", entry),
        "nonpositive_size": ("boxes with zero or negative width or height", entry),
        "outside_image": ("boxes entirely outside their image", entry),
    }


@dataclass
class Box:
    """One object. ``xywh``: pixels, or fractions of the image size when its Item is ``normalised``."""

    xywh: tuple[float, float, float, float]
    label: str
    where: str  # names it in messages, e.g. "Annotations/a.xml object #2"
    iscrowd: int = 0
    extra: dict = field(default_factory=dict)  # more annotation keys (VOC: difficult, truncated)


@dataclass
class Item:
    """One image of the source. ``name``: its path relative to the source (kept as ``file_name``), or None when it
    lies outside the source folder; ``width`` / ``height``: None when the source does not say (read from the file)."""

    path: Path
    name: str | None
    where: str
    boxes: list[Box] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    split: str | None = None
    normalised: bool = False
    extra: dict = field(default_factory=dict)  # more image keys (VOC: voc_id)


@dataclass
class Source:
    """What an importer read. ``classes``: the category order the format defines (YOLO), else None (sorted names);
    ``split_from``: where the items' train/val split came from, None when the source has none."""

    items: list[Item]
    classes: list[str] | None = None
    split_from: str | None = None


@dataclass
class ImportResult:
    out: Path
    report: ValidationReport
    coco: dict[str, dict]  # split -> the COCO dict written
    split_from: str  # e.g. "ImageSets/Main/train.txt, val.txt" or "random by image, val fraction 0.2, seed 0"


def read_classes(path: str | os.PathLike) -> list[str]:
    """A class-list file: one name per line, blank lines ignored; the line order is the category order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"classes file not found: {path}")
    names = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    if not names:
        raise DatasetError(f"{path}: no class names; expected one name per line")
    seen: set[str] = set()
    for k, n in enumerate(names):
        if n in seen:
            raise DatasetError(f"{path}: class {n!r} is listed twice (name #{k + 1}); each name once, one per line")
        seen.add(n)
    return names


def check_items(items: list[Item], report: ValidationReport, classes: Sequence[str] | None) -> list[Item]:
    """Sizes, pixel boxes and box checks of every item: the items whose image is usable, with their good boxes in
    pixels (bad ones reported). ``classes``: the allowed names (None: any)."""
    allowed = None if classes is None else set(classes)
    kept, seen = [], {}
    for item in items:
        key = os.path.normcase(os.path.abspath(item.path))
        if key in seen:
            report.add("duplicate_image", f"{item.where} and {seen[key]} -> {item.name or item.path}")
            continue
        seen[key] = item.where
        size = image_size(item.path, False)
        if isinstance(size, str):
            missing = not item.path.is_file()
            report.add("missing_file" if missing else "unreadable_image",
                       f"{item.name or item.path}" + ("" if missing else f" ({size.split(':')[0]})"))
            continue
        if item.width is None:
            item.width, item.height = size
        elif (item.width, item.height) != size:
            report.add("size_mismatch", f"{item.name or item.path} is {size[0]}x{size[1]}, "
                                        f"{item.where} says {item.width}x{item.height}")
            continue
        good = []
        for b in item.boxes:
            x, y, w, h = b.xywh
            if item.normalised:
                x, y, w, h = x * item.width, y * item.height, w * item.width, h * item.height
            if allowed is not None and b.label not in allowed:
                report.add("unknown_class", f"{b.where} ({b.label!r})")
            elif w <= 0 or h <= 0:
                report.add("nonpositive_size", b.where)
            elif x >= item.width or y >= item.height or x + w <= 0 or y + h <= 0:
                report.add("outside_image", b.where)
            else:
                b.xywh = (float(x), float(y), float(w), float(h))
                good.append(b)
        item.boxes, item.normalised = good, False
        kept.append(item)
    return kept


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The val part of a random split by image: a seeded permutation of the sorted names, its first
    round(n * val_fraction) go to val (at least one image in each split when there are two or more)."""
    names = sorted(names)
    n = len(names)
    n_val = int(np.floor(n * val_fraction + 0.5))
    n_val = min(max(n_val, 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return {names[i] for i in perm[:n_val]}


def build_coco(items: Sequence[Item], categories: list[dict], file_name: Callable[[Item], str],
               info: dict) -> dict:
    """A COCO detection dict of checked items (pixel boxes), ids from 1 in item order."""
    cat_id = {c["name"]: c["id"] for c in categories}
    images, anns = [], []
    for item in items:
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name(item), "width": int(item.width),
                       "height": int(item.height), **item.extra})
        for b in item.boxes:
            x, y, w, h = b.xywh
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[b.label],
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(b.iscrowd), **b.extra})
    return {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": categories}


def _output_names(items: Sequence[Item]) -> list[str]:
    """file_name of each item: its path relative to the source; when some lie outside the source, every path
    relative to the images' common folder (so equal basenames in different folders never collide)."""
    if all(it.name for it in items):
        return [Path(it.name).as_posix() for it in items]
    paths = [os.path.abspath(it.path) for it in items]
    common = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    return [Path(os.path.relpath(p, common)).as_posix() for p in paths]


def _option_names(module) -> set[str]:
    """A format's own options: the keyword parameters of its ``read`` after (source, report)."""
    return set(list(inspect.signature(module.read).parameters)[2:])


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; expected a folder (new or one made by iouctl data import)")
    ours = ("train.json", "val.json")
    if (out / ANNOTATIONS).is_dir():  # replaced as a whole: only what an import wrote may be in it
        others = sorted(p.name for p in (out / ANNOTATIONS).iterdir() if p.name not in ours)
        if others:
            raise DatasetError(f"--out {out}: {out / ANNOTATIONS} holds files an import did not write ({others[0]}"
                               f"{', ...' if len(others) > 1 else ''}); choose another --out")
    existing = [p for p in (out / ANNOTATIONS / ours[0], out / ANNOTATIONS / ours[1], out / IMAGES)
                if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise DatasetError(f"output exists: {existing[0]}; pass --overwrite to replace {out}/{ANNOTATIONS} and "
                           f"{out}/{IMAGES}")


def _real_paths(items: Sequence[Item]) -> list[str]:
    """The resolved absolute path of each item's image (each folder resolved once; the file only when a link)."""
    folders: dict[str, str] = {}
    real = []
    for it in items:
        folder, base = os.path.split(os.path.abspath(it.path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        p = os.path.join(folders[folder], base)
        real.append(os.path.realpath(p) if os.path.islink(p) else p)
    return real


def _publish(out: Path, coco: dict[str, dict], real: Sequence[str], names: Sequence[str], copy: bool) -> None:
    """Write images/ and annotations/ into a staging folder inside ``out``, then rename them into place: a failure
    leaves ``out`` as it was. ``real``: the resolved source image paths, ``names``: their names under images/."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".import-", dir=out))
    try:
        made: set[str] = set()
        images = str(stage / IMAGES)
        for k, src in enumerate(real):
            dest = os.path.join(images, names[k])
            folder = os.path.dirname(dest)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            if copy:
                shutil.copyfile(src, dest)  # bytes as they are: never re-encoded
            else:
                try:
                    os.symlink(src, dest)
                except OSError as e:
                    raise DatasetError(f"cannot make symlinks in {out} ({e.strerror}); pass --copy to copy the "
                                       "images instead") from None
        for split, d in coco.items():
            atomic_write_json(stage / ANNOTATIONS / f"{split}.json", d, indent=None)
        (stage / IMAGES).mkdir(exist_ok=True)  # no images at all still gives the folder data=coco expects
        old = stage / "old"
        old.mkdir()
        moved, placed = [], []
        try:
            for name in (IMAGES, ANNOTATIONS):  # images first: annotations never point at images not there yet
                if (out / name).exists() or (out / name).is_symlink():
                    os.replace(out / name, old / name)
                    moved.append(name)
                os.replace(stage / name, out / name)
                placed.append(name)
        except BaseException:  # put back what was there (Ctrl-C included), then let the staging folder go
            for name in placed:
                os.replace(out / name, stage / f"new-{name}")
            for name in moved:
                os.replace(old / name, out / name)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # removes links, never what they point at


def import_dataset(fmt: str, source: str | os.PathLike, out: str | os.PathLike, *,
                   classes: str | os.PathLike | None = None, val_fraction: float | None = None, seed: int = 0,
                   copy: bool = False, overwrite: bool = False, skip_bad: bool = False,
                   **options) -> ImportResult:
    """Import ``source`` (format ``fmt``, see ``formats()``) into the COCO dataset folder ``out``.

    Args:
        classes: a class-list file (one name per line): the categories and their order; other classes are errors.
        val_fraction, seed: random split by image when the source has none (default 0.2, seed 0).
        copy: copy the images instead of linking them. overwrite: replace the annotations and images of ``out``.
        skip_bad: skip bad entries (counted in the report) instead of raising DatasetError.
        options: the format's own options (VOC: difficult, split_train, split_val).
    Returns: ImportResult. Raises DatasetError (one line) on bad input; nothing is written then.
    """
    if fmt not in formats():
        raise DatasetError(f"unknown format {fmt!r}; valid: {', '.join(formats())}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DatasetError(f"--val-fraction {val_fraction} is not valid; expected a number between 0 and 1")
    module = importlib.import_module(f"{__name__}.{fmt}")
    for key in options:
        if key not in _option_names(module):
            takers = [f for f in formats() if key in _option_names(importlib.import_module(f"{__name__}.{f}"))]
            raise DatasetError(f"--{key.replace('_', '-')} does not apply to {fmt}; only to: {', '.join(takers)}")
    source, out = (Path(os.path.abspath(Path(p).expanduser())) for p in (source, out))  # printed, recorded
    class_list = None if classes is None else read_classes(classes)
    if not source.exists():
        raise DatasetError(f"{fmt} source not found: {source}; expected {module.EXPECTED}")
    _check_out(out, overwrite)

    report = ValidationReport(ann_file=out / ANNOTATIONS, skip_bad=skip_bad, kinds=dict(module.KINDS))
    src: Source = module.read(source, report, **options)
    if src.split_from is not None and val_fraction is not None:
        raise DatasetError(f"{source} has its own train/val split ({src.split_from}); --val-fraction applies only "
                           "to sources without one")
    items = check_items(src.items, report, class_list)
    if not report.ok and not skip_bad:
        raise DatasetError(f"{source}: {report.num_bad} bad entries: {report.problems()}; "
                           "pass --skip-bad to skip them")

    out_images = os.path.join(os.path.realpath(out / IMAGES), "")
    real = _real_paths(items)
    for item, path in zip(items, real):
        if path.startswith(out_images):
            raise DatasetError(f"--out {out}: its {IMAGES}/ folder holds source images ({item.path}); "
                               "choose another --out")
    if not items:
        raise DatasetError(f"{source}: no usable images" + (" (all skipped)" if not report.ok else ""))
    names = class_list or src.classes or sorted({b.label for it in items for b in it.boxes})
    if not names:
        raise DatasetError(f"{source}: no objects in any image; a detection dataset needs a class: give "
                           "--classes FILE to import images without objects")
    categories = [{"id": k + 1, "name": n, "supercategory": ""} for k, n in enumerate(names)]
    for it, name in zip(items, _output_names(items)):
        it.name = name
    if src.split_from is None:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        val = split_names([it.name for it in items], fraction, seed)
        for it in items:
            it.split = "val" if it.name in val else "train"
        split_from = f"random by image, val fraction {fraction}, seed {seed}"
    else:
        split_from = src.split_from
    coco = {}
    for split in SPLITS:
        part = [it for it in items if it.split == split]
        info = {"description": f"{fmt} dataset {source}, imported by iouctl", "source": str(source),
                "format": fmt, "split": split, "split_from": split_from}
        coco[split] = build_coco(part, categories, lambda it: it.name, info)
        # our own output must pass our own validator (a bug here would otherwise surface only at training time)
        validate_coco_dict(coco[split], out / ANNOTATIONS / f"{split}.json")
    _publish(out, coco, real, [it.name for it in items], copy)
    report.images = [im for d in coco.values() for im in d["images"]]
    report.annotations = [a for d in coco.values() for a in d["annotations"]]
    report.categories = categories
    report.num_images, report.num_annotations = len(report.images), len(report.annotations)
    return ImportResult(out=out, report=report, coco=coco, split_from=split_from)
