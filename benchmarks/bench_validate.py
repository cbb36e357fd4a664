"""Validation of a COCO-train-sized annotation file vs pycocotools' COCO(file) indexing, and image opening speed.

    python benchmarks/bench_validate.py [--images 118287 --boxes 860001 --repeats 3]

Each measurement runs in a fresh subprocess (peak RSS is per process); times (imports excluded) are medians of
--repeats. The JSON part only: no image folder is given, so no file is opened. Then --open-images N images (JPEG 640x480) are written
and opened (decoded, size checked) with 2 threads, as `iouctl data check` does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
which, path = sys.argv[1], sys.argv[2]
if which == "pycocotools":
    import contextlib, io
    from pycocotools.coco import COCO
    def work():
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(path)
else:
    from iouctl.data.coco import validate_coco  # imports timed apart
    def work():
        validate_coco(path)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
work()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_mib": peak, "added_mib": peak - base}))
"""


def make_file(path: Path, n_images: int, n_boxes: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    img_of = np.sort(rng.integers(1, n_images + 1, n_boxes))
    xy = rng.uniform(0, 470, (n_boxes, 2)).round(2)  # inside a 640x480 image
    wh = rng.uniform(1, 140, (n_boxes, 2)).round(2)
    cats = rng.integers(1, 81, n_boxes)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, n_images + 1)]
    anns = [{"id": k + 1, "image_id": int(img_of[k]), "category_id": int(cats[k]),
             "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
             "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0} for k in range(n_boxes)]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": f"class{c}"} for c in range(1, 81)]}))


def measure(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=118_287)
    ap.add_argument("--boxes", type=int, default=860_001)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--open-images", type=int, default=500)
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_file(args.make, args.images, args.boxes)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instances_train.json"
        # in a child: a forked process inherits this one's peak RSS, which must stay small
        subprocess.run([sys.executable, __file__, "--make", str(path), "--images", str(args.images), "--boxes",
                        str(args.boxes)], check=True)
        print(f"{path.stat().st_size / 2**20:.0f} MiB, {args.images} images, {args.boxes} boxes")
        res: dict = {"pycocotools": [], "iouctl": []}
        for _ in range(args.repeats):  # interleaved, so load drifts hit both alike
            for which in res:
                res[which].append(measure(which, path))
        med = {w: (statistics.median(r["seconds"] for r in rs), max(r["peak_mib"] for r in rs),
                   max(r["added_mib"] for r in rs)) for w, rs in res.items()}
        for w, (s, m, a) in med.items():
            print(f"{w:12s} median {s:.2f} s  peak RSS {m:.0f} MiB ({a:.0f} MiB added by the file)")
        print(f"ratio iouctl / pycocotools: time {med['iouctl'][0] / med['pycocotools'][0]:.2f}x, "
              f"memory added by the file {med['iouctl'][2] / med['pycocotools'][2]:.2f}x, "
              f"peak RSS {med['iouctl'][1] / med['pycocotools'][1]:.2f}x")

        if args.open_images:
            import numpy as np
            from PIL import Image

            from iouctl.data.coco import validate_coco_dict

            img_dir = Path(tmp) / "img"
            img_dir.mkdir()
            rng = np.random.default_rng(0)
            base = Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8"))
            images = []
            for i in range(1, args.open_images + 1):
                base.save(img_dir / f"{i}.jpg", quality=90)
                images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
            d = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}
            for workers in (1, 2):
                t0 = time.perf_counter()
                validate_coco_dict(d, "bench.json", img_dir, open_images=True, workers=workers)
                dt = time.perf_counter() - t0
                print(f"opening {args.open_images} JPEG 640x480 images with {workers} thread(s): "
                      f"{args.open_images / dt:.0f} images/s")


if __name__ == "__main__":
    main()
