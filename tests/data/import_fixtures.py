"""Small labelled datasets in VOC, YOLO and CSV form for the import tests: images with filled rectangles drawn at
known pixel coordinates, custom class names, an image without objects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

W, H = 64, 48
COLOURS = {"Tree": (0, 200, 0), "Car": (200, 0, 0), "Bike": (0, 0, 200)}

# image stem -> boxes as (class, x0, y0, x1, y1): the rectangle covers pixel columns x0..x1-1 and rows y0..y1-1, so
# its COCO box is [x0, y0, x1 - x0, y1 - y0]
SCENES = {
    "a": [("Tree", 4, 6, 20, 30), ("Car", 30, 10, 52, 22)],
    "b": [("Car", 0, 0, 10, 8)],
    "c": [("Tree", 40, 20, 64, 48), ("Tree", 10, 30, 18, 44)],
    "d": [],  # no objects: a negative image
    "e": [("Car", 22, 2, 36, 40)],
}


def draw(path: Path, boxes, size=(W, H)) -> Path:
    """An image with each box filled in its class colour on grey (PNG keeps pixels exact; JPEG for realism)."""
    arr = np.full((size[1], size[0], 3), 128, np.uint8)
    for name, x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = COLOURS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def boxes_from_pixels(path: Path, name: str) -> list[list[int]]:
    """COCO [x, y, w, h] of each separate rectangle of a class colour, found from the pixels (an independent
    reference: it never sees an annotation file)."""
    from scipy import ndimage

    arr = np.asarray(Image.open(path).convert("RGB"))
    mask = (arr == COLOURS[name]).all(-1)
    labels, _ = ndimage.label(mask)
    out = []
    for sl in ndimage.find_objects(labels):
        ys, xs = sl
        out.append([xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start])
    return sorted(out)


def voc_object(name, box, difficult=0) -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def voc_xml(filename, objects, size=(W, H)) -> str:
    size_xml = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
    return f"<annotation><filename>{filename}</filename>{size_xml}{''.join(objects)}</annotation>"


def voc_pixel_objects(boxes) -> list[str]:
    # pixel columns x0..x1-1 are VOC's 1-based inclusive x0+1..x1
    return [voc_object(n, (x0 + 1, y0 + 1, x1, y1)) for n, x0, y0, x1, y1 in boxes]


def make_voc(root: Path, scenes=SCENES, ext=".png", imagesets: dict[str, list[str]] | None = None) -> Path:
    """LabelImg/CVAT layout: Annotations/<stem>.xml + JPEGImages/<stem><ext>; ImageSets/Main/<split>.txt if given."""
    for stem, boxes in scenes.items():
        draw(root / "JPEGImages" / f"{stem}{ext}", boxes)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}{ext}", voc_pixel_objects(boxes)))
    for split, stems in (imagesets or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


def make_yolo(root: Path, names=("Car", "Tree"), names_as_dict=False, splits=None, path_key=False) -> Path:
    """Ultralytics layout: data.yaml + images/{train,val}/*.png + labels/{train,val}/*.txt (image 'd' has no label
    file, image 'e' an empty one when it is in a split)."""
    splits = splits or {"train": ["a", "b", "c", "d"], "val": ["e"]}
    base = root / "ds" if path_key else root
    index = {n: i for i, n in enumerate(names)}
    for split, stems in splits.items():
        for stem in stems:
            boxes = SCENES[stem]
            draw(base / "images" / split / f"{stem}.png", boxes)
            if stem == "d":
                continue
            lines = [f"{index[n]} {(x0 + x1) / 2 / W!r} {(y0 + y1) / 2 / H!r} {(x1 - x0) / W!r} {(y1 - y0) / H!r}"
                     for n, x0, y0, x1, y1 in boxes]
            (base / "labels" / split).mkdir(parents=True, exist_ok=True)
            (base / "labels" / split / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    names_yaml = ("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))) if names_as_dict \
        else f"names: [{', '.join(names)}]\n"
    root.mkdir(parents=True, exist_ok=True)
    text = ("path: ds\n" if path_key else "") + "train: images/train\nval: images/val\n" + names_yaml
    (root / "data.yaml").write_text(text)
    return root


def make_csv(root: Path, header=True, folders=False) -> Path:
    """keras-retinanet CSV: images/<stem>.png (or train/x.png and val/x.png when ``folders``: equal basenames)."""
    rows = ["image_path,xmin,ymin,xmax,ymax,label"] if header else []
    for k, (stem, boxes) in enumerate(SCENES.items()):
        rel = f"{'train' if k % 2 else 'val'}/img.png" if folders and k < 2 else f"images/{stem}.png"
        draw(root / rel, boxes)
        rows += [f"{rel},{x0},{y0},{x1},{y1},{n}" for n, x0, y0, x1, y1 in boxes] or [f"{rel},,,,,"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"
