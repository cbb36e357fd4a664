"""Write a dataset unlike the built-in one, as a labelling tool would: Pascal VOC XML (LabelImg layout: Annotations/
+ JPEGImages/, no ImageSets), JPEG images, custom class names, dense objects. Rendered with the shapes generator.

    python benchmarks/make_voc_dataset.py OUT [--train 80 --val 20 --size 384 --min-objects 15 --max-objects 40]

Classes: the generator's `circle` and `square`, written as `Tree` and `Roof` (an aerial-imagery flavour).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from xml.sax.saxutils import escape


def write_xml(path: Path, file_name: str, size: int, objs: list[dict], names: dict[int, str]) -> None:
    rows = []
    for o in objs:
        x, y, w, h = o["bbox"]
        # VOC: 1-based inclusive pixel indices (the importer's x = xmin - 1, w = xmax - xmin + 1)
        rows.append(f"""  <object>
    <name>{escape(names[o['class']])}</name>
    <pose>Unspecified</pose>
    <truncated>0</truncated>
    <difficult>0</difficult>
    <bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox>
  </object>""")
    path.write_text(f"""<annotation>
  <folder>JPEGImages</folder>
  <filename>{escape(file_name)}</filename>
  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>
  <segmented>0</segmented>
{chr(10).join(rows)}
</annotation>
""")


def main() -> None:
    import numpy as np
    from PIL import Image

    from iouctl.data.shapes import render_image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=80)
    ap.add_argument("--val", type=int, default=20)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--min-objects", type=int, default=15)
    ap.add_argument("--max-objects", type=int, default=40)
    ap.add_argument("--min-box", type=float, default=16)
    ap.add_argument("--max-box", type=float, default=64)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    names = {0: "Tree", 1: "Roof"}
    (args.out / "Annotations").mkdir(parents=True)
    (args.out / "JPEGImages").mkdir()
    total = args.train + args.val
    for i in range(total):
        rng = np.random.default_rng([args.seed, i])
        img, objs = render_image(rng, image_size=args.size, classes=["circle", "square"],
                                 min_objects=args.min_objects, max_objects=args.max_objects, min_size=args.min_box,
                                 max_size=args.max_box, cluster_prob=0.3, min_visible=0.5, noise=0.06, texture=True)
        stem = f"tile_{i:04d}"
        Image.fromarray(img).save(args.out / "JPEGImages" / f"{stem}.jpg", quality=92)
        write_xml(args.out / "Annotations" / f"{stem}.xml", f"{stem}.jpg", args.size, objs, names)
    print(f"wrote {total} images to {args.out} (import with --val-fraction {args.val / total:.2f})")


if __name__ == "__main__":
    main()
