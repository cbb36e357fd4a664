"""Pascal VOC XML: the reader behind ``iouctl data import voc`` and the one-file converter ``convert_voc``.

Conventions (chosen and documented here):
- Layouts: ``Annotations/*.xml`` (subfolders too) with images in ``JPEGImages/`` (same subfolder) or beside the XML
  (VOC, LabelImg, CVAT), or a folder of ``*.xml`` beside their images (LabelImg's default). An XML's image is the file
  its ``<filename>`` names, else ``<xml stem>`` with an image extension.
- Splits: ``ImageSets/Main/train.txt`` and ``val.txt`` when both exist (other names with ``split_train`` /
  ``split_val``, e.g. trainval / test); without them every XML, split at random by the importer.
- Coordinates: VOC boxes are 1-based *inclusive* pixel indices; pixel k (1-based) covers [k-1, k) in COCO's 0-based
  continuous coordinates. So x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1 (a one-pixel box
  xmin == xmax has w = 1); float coordinates follow the same formula.
- ``<size>``: missing or 0 (some tools write 0 when they do not know) -> read from the image header; any other
  value must match the image.
- ``difficult`` objects: by default ``iscrowd = 1`` (``difficult="crowd"``): COCO evaluation then ignores detections
  matched to them, as VOC evaluation ignores difficult objects (COCO matches crowd regions by intersection over the
  detection's area, so it is close but not identical to VOC). ``"keep"`` keeps them as ordinary objects, ``"drop"``
  leaves them out. Every annotation carries ``difficult`` and ``truncated`` flags (0/1) either way.
- Categories: ``iouctl data import voc`` uses the class names found (sorted) or a ``--classes`` file;
  ``convert_voc`` (one split into one file, for a fixed category list across separately converted splits) uses the
  20 VOC classes ``VOC_CLASSES`` unless given ``classes``.
- Images keep ``voc_id`` (the XML's stem).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from iouctl.data.coco import DatasetError, ValidationReport, validate_coco_dict
from iouctl.data.importers import (
    IMAGE_EXTS, Box, Item, Source, build_coco, check_items, parse_number, problem_kinds,
)
from iouctl.fileio import atomic_write_json

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DIFFICULT_POLICIES = ("crowd", "keep", "drop")
EXPECTED = ("a Pascal VOC folder: Annotations/*.xml with images in JPEGImages/ or beside the XML "
            "(ImageSets/Main/ optional), or a folder of *.xml beside their images")

VOC_KINDS = problem_kinds("file object #", {
    "missing_xml": ("split ids without an annotation XML", "files"),
    "broken_xml": ("unparsable XML files", "file:line:col"),
    "bad_size": ("XML files without a valid <size> width/height", "files"),
    "bad_box": ("objects without a numeric <bndbox> xmin/ymin/xmax/ymax", "file object #"),
    "missing_name": ("objects without a class <name>", "file object #"),
})


def _text(el, path: str) -> str | None:
    for tag in path.split("/"):  # one level at a time: C-speed Element.find (a path goes through ElementPath)
        el = None if el is None else el.find(tag)
    return None if el is None or el.text is None else el.text.strip()


class _Listing:
    """Names in a folder, listed once (one scandir per folder instead of one stat per candidate image)."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}

    def __call__(self, folder: Path) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = {e.name for e in os.scandir(folder)}
            except OSError:
                self._names[folder] = set()
        return self._names[folder]


_EXTS = IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS)
_NOTE = {"crowd": "difficult as crowd", "keep": "difficult kept", "drop": "difficult dropped"}


def _find_image(xml: Path, filename: str | None, folders: Sequence[Path], listing: _Listing) -> Path | None:
    """The image an XML annotates: the file ``<filename>`` names, else ``<stem>.<ext>``, in the first folder that
    has it."""
    names = []
    if filename:
        base = os.path.basename(filename.replace("\\", "/"))  # some tools write a path here
        for folder in folders:  # the common case, before trying extensions (some tools leave it out)
            if base in listing(folder):
                return folder / base
        names += [os.path.splitext(base)[0] + e for e in _EXTS]
    names += [xml.stem + e for e in _EXTS]
    for name in dict.fromkeys(names):
        for folder in folders:
            if name in listing(folder):
                return folder / name
    return None


def _parse(xml: Path, rel: str, report: ValidationReport, difficult: str):
    """One annotation XML -> (filename tag, width, height, boxes), or None (reported) when the file is unusable."""
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as e:
        line, col = e.position
        report.add("broken_xml", f"{rel}:{line}:{col}")
        return None
    if tree.tag != "annotation":
        report.add("broken_xml", f"{rel}:1:1 (root <{tree.tag}>, expected <annotation>)")
        return None
    sizes = [_text(tree, "size/width"), _text(tree, "size/height")]
    width, height = (parse_number(s) for s in sizes)
    if all(s in (None, "", "0") for s in sizes):  # size unknown to the tool that wrote it: read from the image
        width = height = None
    elif width is None or height is None or width <= 0 or height <= 0 or width != int(width) \
            or height != int(height):
        report.add("bad_size", rel)
        return None
    boxes = []
    for k, obj in enumerate(tree.findall("object")):
        where = f"{rel} object #{k}"
        bndbox = obj.find("bndbox")
        name = _text(obj, "name")
        if not name:  # an empty class would become a category named ""
            report.add("missing_name", where)
            continue
        coords = [parse_number(_text(bndbox, t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in coords):
            report.add("bad_box", where)
            continue
        xmin, ymin, xmax, ymax = coords
        is_difficult = _text(obj, "difficult") == "1"
        if is_difficult:
            report.notes[_NOTE[difficult]] = report.notes.get(_NOTE[difficult], 0) + 1
            if difficult == "drop":
                continue
        # 1-based inclusive -> 0-based [x, y, w, h] (see module docstring)
        boxes.append(Box((xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1), name, where,
                         iscrowd=int(is_difficult and difficult == "crowd"),
                         extra={"difficult": int(is_difficult), "truncated": int(_text(obj, "truncated") == "1")}))
    width = None if width is None else int(width)
    height = None if height is None else int(height)
    return _text(tree, "filename"), width, height, boxes


def _split_ids(path: Path) -> list[str]:
    # first token per line: class-specific split files have "<id> <flag>"
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _year_hint(root: Path) -> str:
    """'; did you mean <root>/VOC2007?' when given the VOCdevkit folder above the year folders."""
    years = sorted(p.name for p in root.glob("VOC*") if (p / "Annotations").is_dir())
    return f"; did you mean {root / years[0]}?" if years else ""


def _splits_there(main: Path) -> str:
    have = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
    return ", ".join(have) or "none"


def read_items(root: Path, report: ValidationReport, difficult: str = "crowd",
               split_files: dict[str, str] | None = None) -> list[Item]:
    """The images of a VOC folder. ``split_files``: {split: ImageSets/Main file stem}, or None for every XML."""
    if difficult not in DIFFICULT_POLICIES:
        raise DatasetError(f"difficult={difficult!r} is not valid; valid: {', '.join(DIFFICULT_POLICIES)}")
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    if split_files is not None:
        ids = {split: _split_ids(root / "ImageSets" / "Main" / f"{stem}.txt") for split, stem in split_files.items()}
        if len(ids) == 2:
            shared = sorted(set.intersection(*(set(v) for v in ids.values())))
            if shared:
                a, b = (f"{stem}.txt" for stem in split_files.values())
                raise DatasetError(f"{root / 'ImageSets' / 'Main'}: {a} and {b} share {len(shared)} ids "
                                   f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}); "
                                   "train and val must not overlap")
        xmls = [(split, ann_dir / f"{vid}.xml") for split, v in ids.items() for vid in v]
    else:  # Annotations/ may have subfolders; a flat folder of XML and images is read without descending
        found = ann_dir.rglob("*.xml") if ann_dir != root else root.glob("*.xml")
        xmls = [(None, p) for p in sorted(found)]
        if not xmls:
            raise DatasetError(f"{root}: no annotation XML files; expected {EXPECTED}{_year_hint(root)}")
    listing, items, folders = _Listing(), [], {}
    for split, xml in xmls:
        rel = xml.relative_to(root).as_posix()
        if split is not None and not xml.is_file():
            report.add("missing_xml", rel)
            continue
        parsed = _parse(xml, rel, report, difficult)
        if parsed is None:
            continue
        filename, width, height, boxes = parsed
        if xml.parent not in folders:  # where its images may be: JPEGImages/<same subfolder>, JPEGImages/, beside
            sub = xml.parent.relative_to(ann_dir)
            folders[xml.parent] = list(dict.fromkeys([root / "JPEGImages" / sub, root / "JPEGImages", xml.parent]))
        image = _find_image(xml, filename, folders[xml.parent], listing)
        if image is None:
            report.add("missing_file", f"{filename or xml.stem + '.*'} (named by {rel})")
            continue
        items.append(Item(image, image.relative_to(root).as_posix(), rel, boxes, width, height, split=split,
                          extra={"voc_id": xml.stem}))
    return items


def read(source: Path, report: ValidationReport, difficult: str = "crowd", split_train: str | None = None,
         split_val: str | None = None) -> Source:
    """``iouctl data import voc``: ImageSets/Main/<split_train>.txt and <split_val>.txt when both exist (default
    train and val; named ones must exist), else every XML."""
    if not source.is_dir():
        raise DatasetError(f"VOC source is not a folder: {source}; expected {EXPECTED}")
    main = source / "ImageSets" / "Main"
    names = {"train": split_train or "train", "val": split_val or "val"}
    there = {s: (main / f"{n}.txt").is_file() for s, n in names.items()}
    if all(there.values()):
        items = read_items(source, report, difficult, names)
        return Source(items, split_from=f"ImageSets/Main/{names['train']}.txt, {names['val']}.txt")
    if split_train or split_val or any(there.values()):
        absent = next(f"{n}.txt" for s, n in names.items() if not there[s])
        raise DatasetError(f"split file not found: {main / absent}; splits there: {_splits_there(main)} "
                           "(choose them with --split-train NAME --split-val NAME)")
    return Source(read_items(source, report, difficult))


def convert_voc(voc_root: str | os.PathLike, split: str = "trainval", out: str | os.PathLike | None = None,
                skip_bad: bool = False, overwrite: bool = False, difficult: str = "crowd",
                classes: Sequence[str] | None = None) -> tuple[Path, ValidationReport]:
    """Convert ``<voc_root>/{Annotations, ImageSets/Main/<split>.txt, JPEGImages}`` into one COCO JSON file whose
    ``file_name`` are relative to JPEGImages/ (images are neither linked nor copied).

    Args:
        voc_root: a VOC year folder (e.g. VOCdevkit/VOC2007).
        split: name of the ImageSets/Main split file (train, val, trainval, test).
        out: output JSON; default ``<voc_root>/annotations/instances_<split>.json``.
        skip_bad: skip bad files/objects (counted in the report) instead of raising DatasetError.
        overwrite: replace an existing output file (otherwise refuse).
        difficult: "crowd" | "keep" | "drop", see the module docstring.
        classes: the category names, in id order (default: the 20 VOC classes); other classes are bad entries.
    Returns: (path written, report). Written atomically; nothing is written when it raises.
    """
    root = Path(voc_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"VOC root not found: {root}")
    missing = [d for d in ("Annotations", "ImageSets/Main", "JPEGImages") if not (root / d).is_dir()]
    if missing:
        raise DatasetError(f"{root} is not a VOC folder: missing {', '.join(missing)}{_year_hint(root)} "
                           "(`iouctl data import voc` reads folders without ImageSets/Main)")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"split file not found: {split_file}; splits there: {_splits_there(split_file.parent)}")
    out = root / "annotations" / f"instances_{split}.json" if out is None else Path(out).expanduser()
    if out.exists() and not overwrite:
        raise DatasetError(f"output exists: {out}; pass --overwrite to replace it")
    names = list(VOC_CLASSES if classes is None else classes)

    rep = ValidationReport(ann_file=out, image_dir=root / "JPEGImages", skip_bad=skip_bad, kinds=dict(VOC_KINDS))
    items = check_items(read_items(root, rep, difficult, {split: split}), rep, names)
    if not rep.ok and not skip_bad:
        hint = " (other class names: --classes FILE, or `iouctl data import voc`)" if "unknown_class" in rep.counts \
            else ""
        raise DatasetError(f"{root}: {rep.num_bad} bad entries: {rep.problems()}; pass --skip-bad to skip them{hint}")
    categories = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(names)]
    info = {"description": f"Pascal VOC {root.name} {split}, converted by iouctl", "voc_root": str(root),
            "split": split, "difficult": difficult}
    coco = build_coco(items, categories, lambda it: Path(os.path.relpath(it.path, root / "JPEGImages")).as_posix(),
                      info)
    # our own output must pass our own validator (a bug here would otherwise surface only at training time)
    validate_coco_dict(coco, out)
    atomic_write_json(out, coco, indent=None)
    rep.images, rep.annotations, rep.categories = coco["images"], coco["annotations"], categories
    rep.num_images, rep.num_annotations = len(coco["images"]), len(coco["annotations"])
    return out, rep
