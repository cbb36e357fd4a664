"""Small hand-made COCO ground truths (no dependency on the built-in dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iouctl.data.detections import Detections


def make_dets(rows) -> Detections:
    """rows: (image_id, [x1, y1, x2, y2], category_id, cls score[, predicted IoU]), float64 boxes and scores."""
    ious = [r[4] for r in rows] if rows and len(rows[0]) > 4 else None
    return Detections(
        torch.tensor([r[0] for r in rows], dtype=torch.int64),
        torch.tensor([r[1] for r in rows], dtype=torch.float64).reshape(-1, 4),
        torch.tensor([r[2] for r in rows], dtype=torch.int64),
        torch.tensor([r[3] for r in rows], dtype=torch.float64),
        None if ious is None else torch.tensor(ious, dtype=torch.float64),
    )


def write_gt(path: Path, images: list[dict], annotations: list[dict], categories: list[int]) -> Path:
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c, "name": f"c{c}"} for c in categories],
            }
        )
    )
    return path


def random_gt(
    path: Path,
    seed: int,
    num_images: int = 12,
    categories=(2, 5, 9),
    crowd_frac: float = 0.1,
    max_per_image: int = 6,
    size: int = 320,
) -> Path:
    """Random boxes of all COCO area ranges, some crowd, some images empty; image ids not contiguous."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        img_id = 3 + 7 * i
        images.append({"id": img_id, "width": size, "height": size, "file_name": f"{img_id}.png"})
        for _ in range(int(rng.integers(0, max_per_image + 1))):
            w, h = np.exp(rng.uniform(np.log(4), np.log(size * 0.8), 2))
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(rng.choice(categories)),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(rng.random() < crowd_frac),
                }
            )
    return write_gt(path, images, anns, list(categories))


def jitter_dets(
    gt_path: Path,
    seed: int,
    per_gt: int = 8,
    n_background: int = 30,
    score_decimals: int | None = None,
    wrong_class_frac: float = 0.1,
) -> Detections:
    """Noisy boxes around every GT (crowd included) plus background boxes; optional score rounding makes ties."""
    rng = np.random.default_rng(seed)
    d = json.loads(gt_path.read_text())
    cats = [c["id"] for c in d["categories"]]
    img_ids = [im["id"] for im in d["images"]]
    ims, boxes, labels = [], [], []
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(per_gt):
            j = rng.normal(0, 0.12, 4) * [w, h, w, h]
            x1, y1 = x + j[0], y + j[1]
            ims.append(a["image_id"])
            boxes.append([x1, y1, x1 + max(w + j[2], 0.0), y1 + max(h + j[3], 0.0)])
            labels.append(a["category_id"] if rng.random() > wrong_class_frac else int(rng.choice(cats)))
    for _ in range(n_background):
        x1, y1 = rng.uniform(0, 250, 2)
        ims.append(int(rng.choice(img_ids)))
        boxes.append([x1, y1, x1 + rng.uniform(0, 60), y1 + rng.uniform(0, 60)])
        labels.append(int(rng.choice(cats)))
    scores = rng.random(len(ims))
    if score_decimals is not None:
        scores = np.round(scores, score_decimals)
    return Detections(
        torch.tensor(ims, dtype=torch.int64),
        torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(scores),
        torch.tensor(rng.random(len(ims))),
        meta={"model": "test"},
    )


@pytest.fixture
def small_gt(tmp_path: Path) -> Path:
    return random_gt(tmp_path / "gt.json", seed=0)
