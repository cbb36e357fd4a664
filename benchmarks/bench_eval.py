"""Benchmark: one full COCO box evaluation, pycocotools vs faster-coco-eval, on the built-in val split.

Detections are synthetic (iouctl.analysis.synthesize_detections) so no model is needed. Two loads:
  raw  all synthetic boxes (~16 per object + background): the heaviest load;
  nms  after greedy NMS (IoU 0.5) and the top 100 per image, what eval reports.
Timed: one evaluate() call (results conversion + id checks + the backend) with the ground truth already cached,
as in an ablation, and the backend alone (loadRes + evaluate + accumulate + summarize). Medians over --repeats
(after one warm-up), their minimum, and the ratio pycocotools / faster-coco-eval. Timings on a shared
2-core machine are noisy: the minimum is the steadier number there.

    /work/venv/bin/python benchmarks/bench_eval.py [--num-val 128] [--repeats 11] [--gt path/to/instances.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the reference machine has 2 cores; set before numpy/torch load

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torchvision

from iouctl.analysis import coco_eval as ce
from iouctl.analysis import evaluate, load_gt, synthesize_detections
from iouctl.analysis.groundtruth import clear_gt_cache


def shapes_val(cache_dir: str, num_val: int) -> Path:
    from iouctl.data.shapes import ShapesData

    # The conf/data/shapes.yaml defaults, so the default cache is shared with `iouctl eval`.
    data = ShapesData(cache_dir, seed=0, num_train=512, num_val=num_val)
    t = time.perf_counter()
    data.prepare()
    print(f"dataset: {data.root} (ready in {time.perf_counter() - t:.1f} s)")
    return data.ann_file("val")


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()  # warm-up: imports, GT COCO objects built once per backend
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def _paused(fn, *args):
    with ce._gc_paused():  # as evaluate() runs it
        return fn(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", help="a COCO ground-truth json instead of the built-in val split")
    ap.add_argument(
        "--cache-dir", default=os.path.join(os.environ.get("IOUCTL_CACHE_DIR", "~/.cache/iouctl"), "datasets")
    )
    ap.add_argument("--num-val", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)

    gt = Path(args.gt) if args.gt else shapes_val(args.cache_dir, args.num_val)
    clear_gt_cache()
    t = time.perf_counter()
    g = load_gt(gt)
    t_gt = time.perf_counter() - t
    raw = synthesize_detections(g, seed=args.seed)
    keep = torchvision.ops.batched_nms(raw.boxes, raw.scores, raw.image_ids * 100_000 + raw.labels, 0.5)
    nms = raw.select(keep).top_k_per_image(100)
    print(
        f"ground truth: {len(g.dataset['images'])} images, {len(g.dataset['annotations'])} boxes, "
        f"{len(g.category_ids)} categories (parsed in {t_gt * 1e3:.0f} ms, then cached)"
    )
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats}")

    # evaluate(): the whole call; backend: loadRes + evaluate + accumulate + summarize on a ready results list
    # (the part the two libraries actually do differently).
    runners = {"pycocotools": ce._run_pycocotools, "faster-coco-eval": ce._run_faster}
    print(f"{'load':<5} {'dets':>7} {'what':<11} {'pycocotools':>22} {'faster-coco-eval':>22} {'ratio':>13}")
    print(f"{'':<5} {'':>7} {'':<11} {'median (min)':>22} {'median (min)':>22} {'median (min)':>13}")
    for name, dets in (("raw", raw), ("nms", nms)):
        res = ce._results_list(g, dets, None)
        ap_values = {b: evaluate(g, dets, backend=b)["AP"] for b in runners}
        full = {b: median_time(lambda b=b, d=dets: evaluate(g, d, backend=b), args.repeats) for b in runners}
        core = {
            b: median_time(lambda b=b, rs=res: _paused(runners[b], g, [dict(r) for r in rs]), args.repeats)
            for b in runners
        }
        for what, t in (("evaluate()", full), ("backend", core)):
            (pm, pn), (fm, fn) = t["pycocotools"], t["faster-coco-eval"]
            print(
                f"{name:<5} {len(dets):>7} {what:<11} {pm:>11.3f} s ({pn:.3f} s) {fm:>11.3f} s ({fn:.3f} s) "
                f"{pm / fm:>5.1f}x ({pn / fn:.1f}x)"
            )
        print(
            f"{'':<5} {'':>7} AP: pycocotools {ap_values['pycocotools']:.6f}, "
            f"faster-coco-eval {ap_values['faster-coco-eval']:.6f}"
        )


if __name__ == "__main__":
    main()
