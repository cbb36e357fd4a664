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

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torchvision
from bench_nms import IMAGE, compare, options, realistic_detections, start

from iouctl.ops import postprocess
from iouctl.ops.nms import batched_nms


def main() -> None:
    p = options(__doc__, repeats=21)
    p.add_argument("--wbf-repeats", type=int, default=5, help="rounds of the WBF case (ensemble_boxes takes ~1 s)")
    args = p.parse_args()
    start(args, "postprocess")
    rows: list[dict] = []

    b, s, _, labels = realistic_detections(5000, 300, seed=0)
    greedy = torchvision.ops.nms(b, s, 0.5)
    assert torch.equal(postprocess.cluster_nms(b, s, 0.5)[0], greedy)
    assert torch.equal(postprocess.box_voting(b, s, 0.5)[0], greedy)
    print(f"N=5000: {len(greedy)} kept by greedy NMS at IoU 0.5, {len(postprocess.diou_nms(b, s, 0.5))} by DIoU-NMS")
    fns = {
        "torchvision nms": lambda: torchvision.ops.nms(b, s, 0.5),
        "diou_nms": lambda: postprocess.diou_nms(b, s, 0.5),
        "diou_nms beta=0.6": lambda: postprocess.diou_nms(b, s, 0.5, beta=0.6),
        "box_voting": lambda: postprocess.box_voting(b, s, 0.5, 0.8),
        "matrix_nms gaussian": lambda: postprocess.matrix_nms(b, s, "gaussian", 2.0),
        "matrix_nms linear": lambda: postprocess.matrix_nms(b, s, "linear"),
        "cluster_nms": lambda: postprocess.cluster_nms(b, s, 0.5),
        "cluster_nms +D": lambda: postprocess.cluster_nms(b, s, 0.5, distance=True),
        "cluster_nms +SPM": lambda: postprocess.cluster_nms(b, s, 0.5, spm=True),
        "cluster_nms +SPM+D": lambda: postprocess.cluster_nms(b, s, 0.5, spm=True, distance=True),
        "cluster_nms +W": lambda: postprocess.cluster_nms(b, s, 0.5, weighted=True),
        "cluster_nms +SPM+D+W": lambda: postprocess.cluster_nms(b, s, 0.5, spm=True, distance=True, weighted=True),
    }
    targets = {k: (1.3 if k.startswith(("diou", "box_voting")) else 3.0) for k in fns if k != "torchvision nms"}
    compare("N=5000", "torchvision nms", fns, targets, args.repeats, rows)

    if args.reference:  # the fallbacks used when the kernels fail to build: dense per group, a few rounds
        ref = {"torchvision nms": fns["torchvision nms"],
               "diou_nms reference": lambda: postprocess.diou_nms(b, s, 0.5, impl="reference"),
               "box_voting reference": lambda: postprocess.box_voting(b, s, 0.5, impl="reference"),
               "matrix_nms reference": lambda: postprocess.matrix_nms(b, s, impl="reference"),
               "cluster_nms reference": lambda: postprocess.cluster_nms(b, s, 0.5, impl="reference"),
               "cluster_nms +SPM+D+W reference": lambda: postprocess.cluster_nms(b, s, 0.5, True, True, True,
                                                                                 impl="reference"),
               "weighted_boxes_fusion reference": lambda: postprocess.weighted_boxes_fusion(b, s, labels,
                                                                                            impl="reference")}
        compare("N=5000 references", "torchvision nms", ref, {}, max(3, args.repeats // 7), rows, warmup=1)

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

    ours = postprocess.weighted_boxes_fusion(b, s, labels, 0.55, 0.0, "avg")
    theirs = reference()
    assert len(ours[0]) == len(theirs[0]), (len(ours[0]), len(theirs[0]))
    err = float(np.abs((ours[0] / scale).numpy() - theirs[0]).max())
    print(f"WBF: {len(ours[0])} fused boxes from 5000 (ensemble_boxes: {len(theirs[0])}); max |difference| of "
          f"normalized coordinates {err:.1e}")
    wbf = {"ensemble_boxes": reference, "weighted_boxes_fusion": lambda: postprocess.weighted_boxes_fusion(b, s, labels)}
    compare("WBF N=5000", "ensemble_boxes", wbf, {"weighted_boxes_fusion": 0.1}, args.wbf_repeats, rows, warmup=1)

    # batched, per class, in one call
    b, s, _, c = realistic_detections(20000, 1200, classes=80, seed=1)
    assert torch.equal(postprocess.batched_cluster_nms(b, s, c, 0.5)[0], batched_nms(b, s, c, 0.5))  # exact per class
    fns = {
        "torchvision batched_nms": lambda: torchvision.ops.batched_nms(b, s, c, 0.5),
        "batched_diou_nms": lambda: postprocess.batched_diou_nms(b, s, c, 0.5),
        "batched_box_voting": lambda: postprocess.batched_box_voting(b, s, c, 0.5),
        "batched_matrix_nms": lambda: postprocess.batched_matrix_nms(b, s, c),
        "batched_cluster_nms": lambda: postprocess.batched_cluster_nms(b, s, c, 0.5),
        "batched_cluster_nms +SPM+D+W": lambda: postprocess.batched_cluster_nms(b, s, c, 0.5, True, True, True),
        "batched_weighted_boxes_fusion": lambda: postprocess.batched_weighted_boxes_fusion(b, s, c),
    }
    compare("N=20000, 80 classes", "torchvision batched_nms", fns, {}, args.repeats, rows)

    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
