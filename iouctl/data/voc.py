"""Pascal VOC -> COCO JSON.

Conventions (chosen and documented here):
- Categories: the 20 VOC classes, ids 1..20 in the usual alphabetical order (``VOC_CLASSES``), always all 20 so
  ids are stable across splits.
- Coordinates: VOC boxes are 1-based *inclusive* pixel indices; pixel k (1-based) covers [k-1, k) in COCO's 0-based
  continuous coordinates. So x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1 (a one-pixel box
  xmin == xmax has w = 1); float coordinates follow the same formula.
- ``difficult`` objects: by default ``iscrowd = 1`` (``difficult="crowd"``): COCO evaluation then ignores detections
  matched to them, as VOC evaluation ignores difficult objects (COCO matches crowd regions by intersection over the
  detection's area, so it is close but not identical to VOC). ``"keep"`` keeps them as ordinary objects, ``"drop"``
  leaves them out. Every annotation carries ``difficult`` and ``truncated`` flags (0/1) either way.
- Images: ids 1..N in split-file order, ``file_name = <voc id>.jpg`` (the JPEGImages name), ``voc_id`` kept.
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from iouctl.data.coco import DatasetError, ValidationReport, validate_coco_dict
from iouctl.fileio import atomic_write_json

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DIFFICULT_POLICIES = ("crowd", "keep", "drop")

VOC_KINDS = {
    "missing_xml": ("split ids without an annotation XML", "files"),
    "broken_xml": ("unparsable XML files", "file:line:col"),
    "bad_size": ("XML files without a valid <size> width/height", "files"),
    "missing_file": ("images whose JPEG is missing", "files"),
    "unknown_class": ("objects of an unknown class", "file object #"),
    "bad_box": ("objects without a numeric <bndbox> xmin/ymin/xmax/ymax", "file object #"),
    "nonpositive_size": ("boxes with xmax < xmin or ymax < ymin", "file object #"),
    "outside_image": ("boxes entirely outside their image", "file object #"),
}


def _text(el, tag: str) -> str | None:
    child = el.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _number(s: str | None) -> float | None:
    try:
        v = float(s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def convert_voc(voc_root: str | os.PathLike, split: str = "trainval", out: str | os.PathLike | None = None,
                skip_bad: bool = False, overwrite: bool = False,
                difficult: str = "crowd") -> tuple[Path, ValidationReport]:
    """Convert ``<voc_root>/{Annotations, ImageSets/Main/<split>.txt, JPEGImages}`` into one COCO JSON file.

    Args:
        voc_root: a VOC year folder (e.g. VOCdevkit/VOC2007).
        split: name of the ImageSets/Main split file (train, val, trainval, test).
        out: output JSON; default ``<voc_root>/annotations/instances_<split>.json``.
        skip_bad: skip bad files/objects (counted in the report) instead of raising DatasetError.
        overwrite: replace an existing output file (otherwise refuse).
        difficult: "crowd" | "keep" | "drop", see the module docstring.
    Returns: (path written, report). Written atomically; nothing is written when it raises.
    """
    root = Path(voc_root).expanduser()
    if difficult not in DIFFICULT_POLICIES:
        raise DatasetError(f"difficult={difficult!r} is not valid; valid: {', '.join(DIFFICULT_POLICIES)}")
    if not root.is_dir():
        raise DatasetError(f"VOC root not found: {root}")
    missing = [d for d in ("Annotations", "ImageSets/Main", "JPEGImages") if not (root / d).is_dir()]
    if missing:
        years = sorted(p.name for p in root.glob("VOC*") if (p / "Annotations").is_dir())
        hint = f"; did you mean {root / years[0]}?" if years else ""
        raise DatasetError(f"{root} is not a VOC folder: missing {', '.join(missing)}{hint}")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise DatasetError(f"split file not found: {split_file}; splits there: {', '.join(have) or 'none'}")
    out = root / "annotations" / f"instances_{split}.json" if out is None else Path(out).expanduser()
    if out.exists() and not overwrite:
        raise DatasetError(f"output exists: {out}; pass overwrite=true to replace it")

    # first token per line: class-specific split files have "<id> <flag>"
    ids = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    rep = ValidationReport(ann_file=out, image_dir=root / "JPEGImages", skip_bad=skip_bad, kinds=dict(VOC_KINDS))
    cat_id = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    jpegs = {e.name for e in os.scandir(root / "JPEGImages")}
    images, anns = [], []
    n_difficult = 0
    for vid in ids:
        xml = root / "Annotations" / f"{vid}.xml"
        rel = f"Annotations/{vid}.xml"
        if not xml.is_file():
            rep.add("missing_xml", rel)
            continue
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as e:
            line, col = e.position
            rep.add("broken_xml", f"{rel}:{line}:{col}")
            continue
        width, height = _number(_text(tree, "size/width")), _number(_text(tree, "size/height"))
        if width is None or height is None or width <= 0 or height <= 0 or width != int(width) \
                or height != int(height):
            rep.add("bad_size", rel)
            continue
        file_name = f"{vid}.jpg"
        if file_name not in jpegs:
            rep.add("missing_file", f"JPEGImages/{file_name}")
            continue
        image_id = len(images) + 1
        objs = []
        for k, obj in enumerate(tree.findall("object")):
            where = f"{rel} object #{k}"
            name = _text(obj, "name")
            if name not in cat_id:
                rep.add("unknown_class", f"{where} ({name!r})")
                continue
            coords = [_number(_text(obj, f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            if any(c is None for c in coords):
                rep.add("bad_box", where)
                continue
            xmin, ymin, xmax, ymax = coords
            # 1-based inclusive -> 0-based [x, y, w, h] (see module docstring)
            x, y, w, h = xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1
            if w <= 0 or h <= 0:
                rep.add("nonpositive_size", where)
                continue
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                rep.add("outside_image", where)
                continue
            is_difficult = _text(obj, "difficult") == "1"
            n_difficult += is_difficult
            if is_difficult and difficult == "drop":
                continue
            objs.append({
                "image_id": image_id, "category_id": cat_id[name], "bbox": [x, y, w, h], "area": w * h,
                "iscrowd": int(is_difficult and difficult == "crowd"), "difficult": int(is_difficult),
                "truncated": int(_text(obj, "truncated") == "1"), "segmentation": [],
            })
        images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height),
                       "voc_id": vid})
        for a in objs:
            a["id"] = len(anns) + 1
            anns.append(a)

    if not rep.ok and not skip_bad:
        raise DatasetError(f"{root}: {rep.num_bad} bad entries: {rep.problems()}; pass skip_bad=true to skip them")
    coco = {
        "info": {"description": f"Pascal VOC {root.name} {split}, converted by iouctl", "voc_root": str(root),
                 "split": split, "difficult": difficult},
        "licenses": [], "images": images, "annotations": anns,
        "categories": [{"id": i, "name": n, "supercategory": "voc"} for n, i in cat_id.items()],
    }
    # our own output must pass our own validator (a bug here would otherwise surface only at training time)
    validate_coco_dict(coco, out)
    atomic_write_json(out, coco, indent=None)
    rep.images, rep.annotations, rep.categories = images, anns, coco["categories"]
    rep.num_images, rep.num_annotations = len(images), len(anns)
    if n_difficult:
        rep.notes[{"crowd": "difficult as crowd", "keep": "difficult kept", "drop": "difficult dropped"}[difficult]] \
            = n_difficult
    return out, rep
