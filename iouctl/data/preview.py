"""A grid PNG of dataset images with their ground-truth boxes and class names (``iouctl data preview``), optionally
each followed by augmented draws of it (``--augment``)."""
from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path

import numpy as np

from iouctl.fileio import atomic_write_with

_MIN_TILE = 256  # small images (shapes: 128 px) are upscaled by an integer factor to at least this size


def _color(label: int) -> tuple[int, int, int]:
    # golden-ratio hue steps: distinct colours for neighbouring ids
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def render_preview(dataset, out_png: str | os.PathLike, num_images: int = 8, seed: int = 0, augment=None,
                   draws: int = 3) -> Path:
    """Draw ``num_images`` random images of ``dataset`` (chosen with ``seed``) with their GT boxes into a grid PNG.

    ``dataset[i]`` must give ``(image float Tensor[3, H, W] in [0, 1], {"boxes": Tensor[K, 4] xyxy,
    "labels": Tensor[K], "iscrowd": Tensor[K], "image_id": int})``; class names come from ``dataset.categories``
    when present. Crowd boxes are drawn in thin grey. ``augment`` (an iouctl.data.augment object): each image is
    one row, itself then ``draws`` augmented versions (seeded from ``seed``, as training seeds them). Returns the PNG
    path (written atomically)."""
    from PIL import Image, ImageDraw, ImageFont

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if augment is not None and draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n_total = len(dataset)
    if n_total == 0:
        raise ValueError("render_preview: the dataset has no images")
    names = {c["id"]: c["name"] for c in getattr(dataset, "categories", [])}
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(n_total, size=min(num_images, n_total), replace=False).tolist())

    samples = []  # (caption, image, target)
    for idx in picks:
        image, target = dataset[idx]
        samples.append((f"#{idx} id={target.get('image_id', idx)}", image, target))
        if augment is not None:
            from iouctl.data.augment import sample_seed

            variants = int(getattr(augment, "variants", 1))
            for d in range(1, draws + 1):
                # variants 1.. only (0 is the image as it is): a flip's draws are all the mirror, never the original
                variant = 1 + (d - 1) % (variants - 1) if variants > 1 else 0
                aug = augment(image, target, variant=variant, seed=sample_seed(seed, len(samples)))
                samples.append((f"#{idx} augmented {d}", *aug))

    tiles = []
    font = ImageFont.load_default()
    for caption, image, target in samples:
        arr = (image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
        h, w = arr.shape[:2]
        scale = max(1, math.ceil(_MIN_TILE / max(h, w)))
        tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        crowd = target.get("iscrowd")
        for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
            x0, y0, x1, y1 = (v * scale for v in box)
            is_crowd = crowd is not None and bool(crowd[k])
            col = (160, 160, 160) if is_crowd else _color(int(label))
            # PIL's rectangle includes its right/bottom pixel, so the last covered pixel is x1*scale - 1
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=col, width=1 if is_crowd else 2)
            text = names.get(int(label), str(int(label))) + (" (crowd)" if is_crowd else "")
            tx, ty = x0 + 2, max(0, y0 - 11)
            tb = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle(tb, fill=(0, 0, 0))
            draw.text((tx, ty), text, fill=col, font=font)
        draw.text((3, 3), caption, fill=(255, 255, 255), font=font,
                  stroke_width=1, stroke_fill=(0, 0, 0))
        tiles.append(tile)

    cols = 1 + draws if augment is not None else math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    pad = 4
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), (32, 32, 32))
    for i, t in enumerate(tiles):
        grid.paste(t, (pad + (i % cols) * (cw + pad), pad + (i // cols) * (ch + pad)))
    return atomic_write_with(out_png, lambda f: grid.save(f, format="PNG"))
