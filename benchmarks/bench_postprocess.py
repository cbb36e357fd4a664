"""Benchmark: the post-processing ops' C++ kernels vs torchvision.ops.nms (and WBF vs ensemble_boxes), on CPU.

Targets (issue 13): at N = 5000 (the boxes of bench_nms.py: jittered copies of 300 centres in an 800 x 1216 image),
diou_nms and box_voting <= 1.3x torchvision nms; matrix_nms and cluster_nms (every variant) <= 3x; WBF >= 10x faster
than ensemble_boxes.weighted_boxes_fusion on the same input (ratio <= 0.1; ensemble_boxes gets the boxes normalized
to [0, 1], as it requires). Also reported: the batched variants at N = 20000, 80 classes, against torchvision's
batched_nms (no target).

Timing as bench_nms.py: torch.set_num_threads(--threads, default 2), warm-up calls, then --repeats rounds in which
every contender runs once, interleaved, so that load from other processes hits all of them alike; the median of each
and the ratio of medians to the baseline. Correctness is checked on the way (keep sets equal torchvision's, WBF's
clusters equal ensemble_boxes').

    python benchmarks/bench_postprocess.py [--repeats 21] [--wbf-repeats 5] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torchvision
from bench_nms import IMAGE, interleaved, realistic_detections

from iouctl.ops import _extension
from iouctl.ops.nms import batched_nms
from iouctl.ops.postprocess import (
    batched_box_voting,
    batched_cluster_nms,
    batched_diou_nms,
    batched_matrix_nms,
    batched_weighted_boxes_fusion,
    box_voting,
    cluster_nms,
    diou_nms,
    matrix_nms,
    weighted_boxes_fusion,
)


def case(name, baseline_name, fns, targets, repeats, rows, warmup=3):
    times = interleaved(fns, repeats, warmup)
    base = statistics.median(times[baseline_name])
    for k, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        tgt = targets.get(k)
        verdict = "" if tgt is None else ("meets" if ratio <= tgt else "MISSES") + f" <= {tgt:g}x"
        rows.append({"case": name, "impl": k, "median_ms": med * 1e3, "ratio": ratio, "target": tgt,
                     "verdict": verdict})
        print(f"{name:<28} {k:<34} {med * 1e3:10.2f} ms  {ratio:7.3f}x  {verdict}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--wbf-repeats", type=int, default=5, help="rounds of the WBF case (ensemble_boxes takes ~1 s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--reference", action="store_true", help="also time the pure-PyTorch references at N = 5000 (slow)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not _extension.load_library("postprocess"):
        sys.exit(f"the post-processing kernels failed to build; see {_extension.build_log('postprocess')}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}, median of {args.repeats}")
    rows: list[dict] = []

    b, s, _, labels = realistic_detections(5000, 300, seed=0)
    greedy = torchvision.ops.nms(b, s, 0.5)
    assert torch.equal(cluster_nms(b, s, 0.5)[0], greedy)
    assert torch.equal(box_voting(b, s, 0.5)[0], greedy)
    print(f"N=5000: {len(greedy)} kept by greedy NMS at IoU 0.5, {len(diou_nms(b, s, 0.5))} by DIoU-NMS")
    fns = {
        "torchvision nms": lambda: torchvision.ops.nms(b, s, 0.5),
        "diou_nms": lambda: diou_nms(b, s, 0.5),
        "diou_nms beta=0.6": lambda: diou_nms(b, s, 0.5, beta=0.6),
        "box_voting": lambda: box_voting(b, s, 0.5, 0.8),
        "matrix_nms gaussian": lambda: matrix_nms(b, s, "gaussian", 2.0),
        "matrix_nms linear": lambda: matrix_nms(b, s, "linear"),
        "cluster_nms": lambda: cluster_nms(b, s, 0.5),
        "cluster_nms +D": lambda: cluster_nms(b, s, 0.5, distance=True),
        "cluster_nms +SPM": lambda: cluster_nms(b, s, 0.5, spm=True),
        "cluster_nms +SPM+D": lambda: cluster_nms(b, s, 0.5, spm=True, distance=True),
        "cluster_nms +W": lambda: cluster_nms(b, s, 0.5, weighted=True),
        "cluster_nms +SPM+D+W": lambda: cluster_nms(b, s, 0.5, spm=True, distance=True, weighted=True),
    }
    targets = {k: (1.3 if k.startswith(("diou", "box_voting")) else 3.0) for k in fns if k != "torchvision nms"}
    case("N=5000", "torchvision nms", fns, targets, args.repeats, rows)

    if args.reference:  # the fallbacks used when the kernels fail to build: dense per group, a few rounds
        ref = {"torchvision nms": fns["torchvision nms"],
               "diou_nms reference": lambda: diou_nms(b, s, 0.5, impl="reference"),
               "box_voting reference": lambda: box_voting(b, s, 0.5, impl="reference"),
               "matrix_nms reference": lambda: matrix_nms(b, s, impl="reference"),
               "cluster_nms reference": lambda: cluster_nms(b, s, 0.5, impl="reference"),
               "cluster_nms +SPM+D+W reference": lambda: cluster_nms(b, s, 0.5, True, True, True, impl="reference"),
               "weighted_boxes_fusion reference": lambda: weighted_boxes_fusion(b, s, labels, impl="reference")}
        case("N=5000 references", "torchvision nms", ref, {}, max(3, args.repeats // 7), rows, warmup=1)

    # WBF vs ensemble_boxes on the same boxes (normalized for ensemble_boxes, which clips to [0, 1])
    from ensemble_boxes import weighted_boxes_fusion as ensemble_wbf

    h, w = IMAGE
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    bn = [(b / scale).numpy()]
    sn, ln = [s.numpy()], [labels.numpy()]

    def reference():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on zero-area boxes
            return ensemble_wbf(bn, sn, ln, iou_thr=0.55, skip_box_thr=0.0, conf_type="avg")

    ours = weighted_boxes_fusion(b, s, labels, 0.55, 0.0, "avg")
    theirs = reference()
    assert len(ours[0]) == len(theirs[0]), (len(ours[0]), len(theirs[0]))
    err = float(np.abs((ours[0] / scale).numpy() - theirs[0]).max())
    print(f"WBF: {len(ours[0])} fused boxes from 5000 (ensemble_boxes: {len(theirs[0])}); max |difference| of "
          f"normalized coordinates {err:.1e}")
    case("WBF N=5000", "ensemble_boxes", {"ensemble_boxes": reference,
                                          "weighted_boxes_fusion": lambda: weighted_boxes_fusion(b, s, labels)},
         {"weighted_boxes_fusion": 0.1}, args.wbf_repeats, rows, warmup=1)

    # batched, per class, in one call
    b, s, _, c = realistic_detections(20000, 1200, classes=80, seed=1)
    assert torch.equal(batched_cluster_nms(b, s, c, 0.5)[0], batched_nms(b, s, c, 0.5))  # exact per class
    fns = {
        "torchvision batched_nms": lambda: torchvision.ops.batched_nms(b, s, c, 0.5),
        "batched_diou_nms": lambda: batched_diou_nms(b, s, c, 0.5),
        "batched_box_voting": lambda: batched_box_voting(b, s, c, 0.5),
        "batched_matrix_nms": lambda: batched_matrix_nms(b, s, c),
        "batched_cluster_nms": lambda: batched_cluster_nms(b, s, c, 0.5),
        "batched_cluster_nms +SPM+D+W": lambda: batched_cluster_nms(b, s, c, 0.5, True, True, True),
        "batched_weighted_boxes_fusion": lambda: batched_weighted_boxes_fusion(b, s, c),
    }
    case("N=20000, 80 classes", "torchvision batched_nms", fns, {}, args.repeats, rows)

    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
