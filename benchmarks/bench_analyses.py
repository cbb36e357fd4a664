"""Benchmark: the analyses of issue 13 per NMS arm (TIDE error breakdown, calibration, oracle bounds), against
tidecv (the reference TIDE) and one COCO evaluation, on the built-in val split and on a COCO-sized synthetic set.

Detections are synthetic (iouctl.analysis.synthesize_detections: ~16 jittered boxes per object + background,
cls scores and predicted IoUs), so no model is needed. Arms: greedy NMS on cls and on the predicted IoU, IoU-guided
NMS and gaussian Soft-NMS (0.5, top 100 per image), the kinds of output the grid produces. Per arm, timed:

  evaluate             one COCO evaluation (faster-coco-eval), what nms-ablate already pays per arm: the yardstick
  coco_ap              iouctl.analysis.coco_ap: the area-"all" AP keys of the same evaluation, numpy matching
  error_breakdown      TIDE's six error types + FP/FN at IoU 0.5 and 0.75
  tidecv               tidecv 1.0.1 at 0.5 and 0.75 (its Data built outside the timer), when installed
  calibration_report   reliability + ECE, LaECE and LRP/oLRP for 3 scores (reported, cls, predicted IoU)
  oracle_bounds        the 3 oracles (3 NMS runs + 3 coco_ap per arm; 1 for an arm ranked by cls), the arms' own
                       metrics given; one call for all arms, divided by their number

Timing: after a warm-up, --repeats rounds in which every contender runs once on every arm, interleaved, so that load
from other processes hits all alike; reported: median per arm (over rounds and arms) and ratios of medians.
``--grid`` runs nms-ablate's 24-arm default grid once, with analyze_arm per arm and oracle_bounds for all arms.
``--coco`` adds the COCO-sized case (5,000 images, 80 classes, ~7.3 objects per image, 100 detections per image
after NMS): error breakdown and calibration of one arm.

    .venv/bin/python benchmarks/bench_analyses.py [--repeats 5] [--grid] [--coco] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the reference machine has 2 cores; set before numpy/torch load

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from iouctl.analysis import (
    GroundTruth, analyze_arm, calibration_report, coco_ap, error_breakdown, evaluate, load_gt, oracle_bounds,
    synthesize_detections, true_iou,
)
from iouctl.postprocess.suppression import GreedyNMS, IoUGuidedNMS, SoftNMS


def shapes_val(cache_dir: str) -> Path:
    from iouctl.data.shapes import ShapesData

    data = ShapesData(cache_dir, seed=0, num_train=512, num_val=128)  # conf/data/shapes.yaml's defaults
    data.prepare()
    return data.ann_file("val")


def coco_like(seed: int = 0, images: int = 5000, classes: int = 80, per_image: float = 7.3) -> GroundTruth:
    """A COCO-sized ground truth: Poisson(per_image) boxes per 640x480 image, log-uniform sides 8..400 px."""
    rng = np.random.default_rng(seed)
    imgs = [{"id": i + 1, "width": 640, "height": 480, "file_name": f"{i + 1}.jpg"} for i in range(images)]
    anns = []
    for im in imgs:
        for _ in range(rng.poisson(per_image)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(400), 2))
            x, y = rng.uniform(0, 640 - min(w, 639)), rng.uniform(0, 480 - min(h, 479))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(rng.integers(1, classes + 1)),
                         "bbox": [float(x), float(y), float(min(w, 640 - x)), float(min(h, 480 - y))],
                         "area": float(w * h), "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, classes + 1)]
    return GroundTruth({"images": imgs, "annotations": anns, "categories": cats})


def tide_inputs(g: GroundTruth, dets):
    from tidecv import Data

    gd, pd = Data("gt"), Data("dets")
    for im in g.dataset["images"]:
        gd.add_image(im["id"], str(im["id"]))
    for a in g.dataset["annotations"]:
        (gd.add_ignore_region if a["iscrowd"] else gd.add_ground_truth)(a["image_id"], a["category_id"], a["bbox"])
    for r in dets.to_coco_results():
        pd.add_detection(r["image_id"], r["category_id"], r["score"], r["bbox"])
    return gd, pd


def run_tidecv(gd, pd) -> None:
    from tidecv import TIDE

    for t in (0.5, 0.75):
        run = TIDE().evaluate(gd, pd, pos_threshold=t, mode=TIDE.BOX)
        run.fix_main_errors()
        run.fix_special_errors()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=os.path.join(os.environ.get("IOUCTL_CACHE_DIR", "~/.cache/iouctl"),
                                                         "datasets"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--coco", action="store_true", help="also the COCO-sized case")
    ap.add_argument("--grid", action="store_true", help="also nms-ablate's 24-arm grid end to end, once")
    ap.add_argument("--json", help="write the medians here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    try:
        import tidecv  # noqa: F401

        have_tide = True
    except ImportError:
        have_tide = False

    g = load_gt(shapes_val(os.path.expanduser(args.cache_dir)))
    raw = synthesize_detections(g, seed=0)
    tiou = true_iou(g, raw)
    arms = [GreedyNMS(iou_threshold=0.5), GreedyNMS(iou_threshold=0.5, score="iou"), IoUGuidedNMS(iou_threshold=0.5),
            SoftNMS("gaussian", score="cls")]
    kept = {a.name: a.keep(raw) for a in arms}
    outs = {n: k.apply(raw) for n, k in kept.items()}
    print(f"built-in val: {len(g.image_ids)} images, {len(g.keys)} objects, {len(raw)} raw boxes; arms: "
          + ", ".join(f"{n} ({len(o)} kept)" for n, o in outs.items()))
    tide_data = {n: tide_inputs(g, o) for n, o in outs.items()} if have_tide else {}
    metrics = {n: evaluate(g, o) for n, o in outs.items()}  # nms-ablate has these already: oracle_bounds reuses them

    def calib(n):
        k = kept[n]
        return calibration_report(g, outs[n], {"reported": outs[n].scores, "cls": raw.scores[k.index],
                                               "iou": raw.ious[k.index]}, true_iou=tiou[k.index])

    jobs = {
        "evaluate": lambda n: evaluate(g, outs[n]),
        "coco_ap": lambda n: coco_ap(g, outs[n]),
        "error_breakdown": lambda n: error_breakdown(g, outs[n], (0.5, 0.75)),
        "calibration_report": calib,
    }
    # oracle_bounds runs once for all arms (its oracle inputs are built once per call): timed per call, / arms
    whole = {"oracle_bounds": lambda: oracle_bounds(g, raw, arms, true_iou=tiou, predicted=metrics)}
    if have_tide:
        jobs["tidecv"] = lambda n: run_tidecv(*tide_data[n])
    times: dict[str, list[float]] = {j: [] for j in jobs}
    times.update({j: [] for j in whole})
    for n in outs:  # warm-up
        for fn in jobs.values():
            fn(n)
    for _ in range(args.repeats):
        for n in outs:
            for j, fn in jobs.items():
                t = time.perf_counter()
                fn(n)
                times[j].append(time.perf_counter() - t)
        for j, fn in whole.items():
            t = time.perf_counter()
            fn()
            times[j].append((time.perf_counter() - t) / len(arms))
    med = {j: statistics.median(v) for j, v in times.items()}
    print(f"\nper arm (ms), median of {args.repeats} rounds x {len(outs)} arms (oracle_bounds: of {args.repeats} "
          f"calls / {len(arms)}):")
    for j, m in med.items():
        print(f"  {j:<20} {1e3 * m:8.1f}   {m / med['evaluate']:5.2f}x evaluate")
    if have_tide:
        print(f"  tidecv / error_breakdown: {med['tidecv'] / med['error_breakdown']:.1f}x")
    out = {"builtin_ms": {j: 1e3 * m for j, m in med.items()}}

    if args.grid:
        # nms-ablate's 24-arm default grid, each arm: NMS + evaluate (today's cost), then + analyze_arm (errors at
        # 0.5/0.75 and calibration of reported/cls/iou/fused scores), then oracle_bounds for all arms at once.
        from iouctl.ops import iou_aware_score

        grid = ([GreedyNMS(iou_threshold=t, score=sc) for sc in ("cls", "iou", "fused") for t in (0.5, 0.6, 0.7)]
                + [IoUGuidedNMS(iou_threshold=t) for t in (0.5, 0.6, 0.7)]
                + [SoftNMS("linear", iou_threshold=t, score=sc) for sc in ("cls", "iou", "fused")
                   for t in (0.5, 0.6, 0.7)]
                + [SoftNMS("gaussian", score=sc) for sc in ("cls", "iou", "fused")])
        fused = iou_aware_score(raw.scores, raw.ious, cls_weight=raw.cls_weight)
        t0 = time.perf_counter()
        got = {}
        for a in grid:
            k = a.keep(raw)
            got[a.name] = (k, k.apply(raw))
            got[a.name] += (evaluate(g, got[a.name][1]),)
        t1 = time.perf_counter()
        for name, (k, o, _) in got.items():
            analyze_arm(g, o, {"reported": o.scores, "cls": raw.scores[k.index], "iou": raw.ious[k.index],
                               "fused": fused[k.index]}, true_iou=tiou[k.index])
        t2 = time.perf_counter()
        oracle_bounds(g, raw, grid, true_iou=tiou, predicted={n: v[2] for n, v in got.items()})
        t3 = time.perf_counter()
        print(f"\n{len(grid)}-arm grid: NMS + evaluate {t1 - t0:.1f} s; + analyze_arm {t2 - t1:.1f} s "
              f"({1e3 * (t2 - t1) / len(grid):.0f} ms/arm); + oracle_bounds {t3 - t2:.1f} s; total {t3 - t0:.1f} s")
        out["grid_s"] = {"nms_evaluate": t1 - t0, "analyze_arm": t2 - t1, "oracle_bounds": t3 - t2}

    if args.coco:
        t = time.perf_counter()
        gc = coco_like()
        raw_c = synthesize_detections(gc, seed=1)
        arm = GreedyNMS(iou_threshold=0.5)
        kc = arm.keep(raw_c)
        oc = kc.apply(raw_c)
        tc = true_iou(gc, raw_c)[kc.index]
        print(f"\nCOCO-sized: {len(gc.image_ids)} images, {len(gc.keys)} objects, {len(raw_c)} raw, {len(oc)} after "
              f"{arm.name} (built in {time.perf_counter() - t:.0f} s)")
        cjobs = {"evaluate": lambda: evaluate(gc, oc), "coco_ap": lambda: coco_ap(gc, oc),
                 "error_breakdown": lambda: error_breakdown(gc, oc),
                 "calibration_report": lambda: calibration_report(
                     gc, oc, {"reported": oc.scores, "iou": raw_c.ious[kc.index]}, true_iou=tc)}
        ctimes: dict[str, list[float]] = {j: [] for j in cjobs}
        for _ in range(max(1, args.repeats // 2)):
            for j, fn in cjobs.items():
                t = time.perf_counter()
                fn()
                ctimes[j].append(time.perf_counter() - t)
        cmed = {j: statistics.median(v) for j, v in ctimes.items()}
        for j, m in cmed.items():
            print(f"  {j:<20} {m:8.2f} s   {m / cmed['evaluate']:5.2f}x evaluate")
        assert abs(coco_ap(gc, oc)["AP"] - evaluate(gc, oc)["AP"]) < 1e-12
        out["coco_s"] = cmed
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
