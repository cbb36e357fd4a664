"""Wall time of `iouctl data import voc` end to end (a CLI subprocess, Python start-up included) on a generated
LabelImg-layout folder: Annotations/*.xml with <size> + JPEGImages/*.jpg (one small JPEG hard-linked N times), no
ImageSets, ~5 objects per image of 3 custom classes. Median of repeats; target: under 60 s for 10,000 images.

    python benchmarks/bench_import.py [--images 10000] [--repeats 3] [--copy]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("Tree", "Car", "Roof")
W, H = 400, 400


def make_voc(root: Path, n: int, seed: int = 0) -> int:
    """The folder; returns the number of objects written."""
    rng = np.random.default_rng(seed)
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    first = root / "JPEGImages" / "tile_00000.jpg"
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(first, quality=80)
    boxes = 0
    for i in range(n):
        stem = f"tile_{i:05d}"
        if i:
            os.link(first, root / "JPEGImages" / f"{stem}.jpg")
        objs = []
        for _ in range(rng.integers(3, 8)):  # 3..7, mean 5
            x0, y0 = rng.integers(1, W - 80, 2)
            w, h = rng.integers(16, 75, 2)
            objs.append(f"<object><name>{CLASSES[rng.integers(3)]}</name><pose>Unspecified</pose>"
                        f"<truncated>0</truncated><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                        f"<ymin>{y0}</ymin><xmax>{x0 + w}</xmax><ymax>{y0 + h}</ymax></bndbox></object>")
        boxes += len(objs)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder>JPEGImages</folder><filename>{stem}.jpg</filename><path>/data/{stem}.jpg</path>"
            f"<source><database>Unknown</database></source><size><width>{W}</width><height>{H}</height>"
            f"<depth>3</depth></size><segmented>0</segmented>{''.join(objs)}</annotation>")
    return boxes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copy", action="store_true", help="time --copy instead of symlinks")
    args = p.parse_args()
    iouctl = shutil.which("iouctl") or str(Path(sys.executable).with_name("iouctl"))
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        src, out = Path(tmp) / "voc", Path(tmp) / "coco"
        t0 = time.perf_counter()
        boxes = make_voc(src, args.images)
        print(f"generated {args.images} images, {boxes} boxes in {time.perf_counter() - t0:.1f} s")
        cmd = [iouctl, "data", "import", "voc", str(src), "--out", str(out), "--overwrite"]
        cmd += ["--copy"] if args.copy else []
        times = []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if r.returncode != 0:
                sys.exit(f"import failed ({r.returncode}): {r.stderr}")
            print(f"run {k + 1}: {times[-1]:.1f} s")
        print(f"`iouctl data import voc` of {args.images} images / {boxes} boxes: "
              f"median {statistics.median(times):.1f} s (of {args.repeats}; target < 60 s); "
              f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
