"""CSV, one row per box (the keras-retinanet convention): ``image_path,xmin,ymin,xmax,ymax,label``.

Image paths are relative to the CSV's folder (or absolute); an image without boxes is one row ``image_path,,,,,``.
A first row whose coordinate columns are all words is a header. Coordinates are continuous pixels (corners of the
box, no +1): x = xmin, y = ymin, w = xmax - xmin, h = ymax - ymin. The source has no split: images are split at random.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from iouctl.data.coco import DatasetError, ValidationReport
from iouctl.data.importers import Box, Item, Source, parse_number, problem_kinds

EXPECTED = ("a CSV file of rows image_path,xmin,ymin,xmax,ymax,label (header row optional; image_path,,,,, for an "
            "image without boxes)")
KINDS = problem_kinds("file:line", {
    "bad_row": ("rows that are not image_path,xmin,ymin,xmax,ymax,label (or image_path,,,,,)", "file:line"),
})


def _is_header(row: list[str]) -> bool:
    cells = [c.strip() for c in row[1:5]]
    return len(row) >= 5 and all(c and parse_number(c) is None for c in cells)


def read(source: Path, report: ValidationReport) -> Source:
    if not source.is_file():
        raise DatasetError(f"CSV source is not a file: {source}; expected {EXPECTED}")
    items: dict[str, Item] = {}
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            first = True
            for row in reader:
                where = f"{source.name}:{reader.line_num}"
                if not any(c.strip() for c in row):
                    continue
                if first and _is_header(row):
                    first = False
                    continue
                first = False
                cells = [c.strip() for c in row]
                if len(cells) != 6 or not cells[0]:
                    report.add("bad_row", where)
                    continue
                path, label = cells[0], cells[5]
                coords = [parse_number(c) for c in cells[1:5]]
                empty = not any(cells[1:])
                if not empty and (any(c is None for c in coords) or not label):
                    report.add("bad_row", where)
                    continue
                image = Path(path) if os.path.isabs(path) else source.parent / path
                key = os.path.normpath(os.path.abspath(image))
                if key not in items:
                    rel = os.path.relpath(key, os.path.abspath(source.parent))
                    items[key] = Item(image, None if rel.startswith("..") else Path(rel).as_posix(), where)
                if not empty:
                    xmin, ymin, xmax, ymax = coords
                    items[key].boxes.append(Box((xmin, ymin, xmax - xmin, ymax - ymin), label, where))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{source}: not UTF-8 text at byte {e.start}; expected {EXPECTED}") from None
    except csv.Error as e:
        raise DatasetError(f"{source}: not a CSV file ({e}); expected {EXPECTED}") from None
    if not items and report.ok:
        raise DatasetError(f"{source}: no rows; expected {EXPECTED}")
    return Source(list(items.values()))
