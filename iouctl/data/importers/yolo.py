"""YOLO txt labels as Ultralytics writes them.

``data.yaml``: ``names`` (a list, or a dict {index: name}; the class indices define the category order), ``train``
and ``val`` (a folder of images, a .txt list of image paths, or a list of those), relative to ``path`` if given, else
to the yaml's folder (a leading ``../`` that leads nowhere is dropped, as Ultralytics does). Without ``val`` the train
images are split at random. An image's labels: the same path with the last ``images`` folder replaced by ``labels``
and the extension by ``.txt``; no file, or an empty one, means no boxes. Label lines: ``class cx cy w h``, fractions of
the image size in [0, 1]; a polygon ``class x1 y1 x2 y2 ...`` (segmentation labels) gives its bounding box.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from iouctl.data.coco import DatasetError, ValidationReport
from iouctl.data.importers import Box, Item, Source, is_image, problem_kinds

EXPECTED = "an Ultralytics data.yaml (names, train, val) or the folder holding it"
KINDS = problem_kinds("file:line", {
    "bad_line": ("label lines that are not 'class cx cy w h' with a class index and fractions in [0, 1]",
                 "file:line"),
})


def _yaml_file(source: Path) -> Path:
    if source.is_file():
        return source
    found = [source / "data.yaml"] if (source / "data.yaml").is_file() else sorted(source.glob("*.y*ml"))
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise DatasetError(f"{source}: expected {EXPECTED}; yaml files there: {what}")
    return found[0]


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise DatasetError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text at byte {e.start}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names', 'train' and 'val', got {type(data).__name__}")
    return data


def _names(data: dict, path: Path) -> dict[int, str]:
    names = data.get("names")
    if isinstance(names, list) and names:
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and names and all(isinstance(k, int) and k >= 0 for k in names):
        return {k: str(names[k]) for k in sorted(names)}
    raise DatasetError(f"{path}: 'names' must be a non-empty list of class names or a mapping {{index: name}}, "
                       f"got {names!r:.80}")


def _resolve(base: Path, entry: str) -> Path:
    p = Path(entry).expanduser()
    if p.is_absolute():
        return p
    q = base / p
    if not q.exists() and entry.startswith("../"):
        q = base / entry[3:]
    return q


def _images(base: Path, entry, key: str, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for e in entries:
        if not isinstance(e, str) or not e:
            raise DatasetError(f"{yaml_path}: '{key}' must be a folder, a .txt list of images, or a list of those")
        p = _resolve(base, e)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if is_image(q.name) and q.is_file())
        elif p.is_file() and p.suffix == ".txt":
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            files += [(p.parent / ln) if not os.path.isabs(ln) else Path(ln) for ln in lines]
        else:
            raise DatasetError(f"{yaml_path}: '{key}: {e}' -> {p} is neither a folder nor a .txt list of images")
    return files


def _label_file(image: Path) -> Path:
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1))).with_suffix(".txt")


def _boxes(label: Path, rel: str, names: dict[int, str], report: ValidationReport) -> list[Box]:
    boxes = []
    for k, line in enumerate(label.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{rel}:{k}"
        try:
            values = [float(v) for v in parts[1:]]
            cls = int(parts[0])
        except ValueError:
            report.add("bad_line", where)
            continue
        polygon = len(values) > 4 and len(values) % 2 == 0
        if (len(values) != 4 and not polygon) or cls < 0 \
                or not all(math.isfinite(v) and 0 <= v <= 1 for v in values):
            report.add("bad_line", where)
            continue
        if cls not in names:
            report.add("unknown_class", f"{where} (class {cls}; names has {len(names)})")
            continue
        if polygon:
            xs, ys = values[0::2], values[1::2]
            x, y, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
        else:
            cx, cy, w, h = values
            x, y = cx - w / 2, cy - h / 2
        boxes.append(Box((x, y, w, h), names[cls], where))
    return boxes


def read(source: Path, report: ValidationReport) -> Source:
    yaml_path = _yaml_file(source)
    data = _load_yaml(yaml_path)
    names = _names(data, yaml_path)
    if not data.get("train"):
        raise DatasetError(f"{yaml_path}: no 'train' key; expected {EXPECTED}")
    base = yaml_path.parent
    if data.get("path"):
        base = _resolve(base, str(data["path"]))
    splits = {"train": data["train"], "val": data.get("val")}
    images = {split: _images(base, entry, split, yaml_path) for split, entry in splits.items() if entry}
    if len(images) == 2:
        shared = sorted(set(map(str, images["train"])) & set(map(str, images["val"])))
        if shared:
            raise DatasetError(f"{yaml_path}: train and val share {len(shared)} images ({shared[0]}, ...); train "
                               "and val must not overlap (without 'val' the images are split at random)")
    items = []
    for split, files in images.items():
        for image in files:
            rel = os.path.relpath(image, base)
            name = None if rel.startswith("..") else Path(rel).as_posix()
            label = _label_file(image)
            label_rel = Path(os.path.relpath(label, base)).as_posix()
            boxes = _boxes(label, label_rel, names, report) if label.is_file() else []
            items.append(Item(image, name, label_rel, boxes, split=split if splits["val"] else None,
                              normalised=True))
    return Source(items, classes=[names[k] for k in sorted(names)],
                  split_from=f"{yaml_path.name} train/val" if splits["val"] else None)
