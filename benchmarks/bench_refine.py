"""Cost of one refinement iteration vs one forward+backward of the IoU head (issue 6 target: ratio <= 1.5).

    python benchmarks/bench_refine.py                        # small backbone, 100 boxes, 128x128, 2 threads
    python benchmarks/bench_refine.py --boxes 100 --size 512 --backbone resnet18 --json /tmp/bench_refine.json
    python benchmarks/bench_refine.py --device cuda

Peer: the IoU head's forward + backward w.r.t. the boxes over the same 100 boxes (PrRoI pooling included), on features
computed once. Refinement: IoURefiner with freezing disabled (every box moves every iteration), timed at T = 1 and
T = 1 + K; one iteration = (t(1 + K) - t(1)) / K, so the first forward+backward and the set-up are not counted.
Calls alternate so that drifting load hits both alike; medians of the repeats.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from iouctl.fileio import atomic_write_json
from iouctl.models.rcnn import faster_rcnn
from iouctl.ops import PrRoIPool
from iouctl.postprocess.refine import IoURefiner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="small", choices=["small", "resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--extra-iterations", type=int, default=4, help="K: iterations beyond the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = faster_rcnn(backbone=args.backbone, pretrained=None, min_size=args.size, max_size=args.size,
                        anchor_sizes=[16, 32, 64, 128, 256], aspect_ratios=[0.5, 1.0, 2.0], detections_per_img=100,
                        iou_head=True, iou_loss_weight=5.0, box_score_thresh=0.05, iou_loss="smooth_l1",
                        jitter_per_gt=16, iou_bins=10, num_classes=args.classes, pool=PrRoIPool(7))
    model = model.to(device).eval().requires_grad_(False)
    image = torch.rand(3, args.size, args.size, device=device)
    with torch.no_grad():
        features, sizes = model.features([image])
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(args.boxes, 2, generator=g) * args.size * 0.7
    wh = torch.rand(args.boxes, 2, generator=g) * args.size * 0.25 + args.size * 0.05
    boxes = torch.cat([xy, xy + wh], 1).to(device)
    labels = torch.randint(0, args.classes, (args.boxes,), generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def head_fwd_bwd() -> float:
        sync()
        t0 = time.perf_counter()
        b = boxes.clone().requires_grad_(True)
        iou = model.predict_iou(features, [b], [labels], sizes)[0]
        torch.autograd.grad(iou.sum(), b)
        sync()
        return time.perf_counter() - t0

    def predict(bs, rows):
        return model.predict_iou(features, bs, [labels[r] for r in rows], sizes)

    def refine(iterations: int) -> float:
        refiner = IoURefiner(step=0.5, omega1=0.0, omega2=-1e9, iterations=iterations)  # nothing ever freezes
        sync()
        t0 = time.perf_counter()
        out = refiner(predict, [boxes], sizes)
        sync()
        assert out.iterations == iterations and int(out.steps.min()) >= 0
        return time.perf_counter() - t0

    k = args.extra_iterations
    for _ in range(args.warmup):
        head_fwd_bwd(), refine(1), refine(1 + k)
    peer, short, long = [], [], []
    for _ in range(args.repeats):
        peer.append(head_fwd_bwd())
        short.append(refine(1))
        long.append(refine(1 + k))
    per_iter = (statistics.median(long) - statistics.median(short)) / k
    base = statistics.median(peer)
    result = {
        "machine": platform.node(), "device": str(device), "threads": args.threads, "backbone": args.backbone,
        "size": args.size, "boxes": args.boxes, "repeats": args.repeats,
        "head_fwd_bwd_ms": 1000 * base, "refine_T1_ms": 1000 * statistics.median(short),
        f"refine_T{1 + k}_ms": 1000 * statistics.median(long), "iteration_ms": 1000 * per_iter,
        "ratio_iteration_to_head_fwd_bwd": per_iter / base,
    }
    for key, v in result.items():
        print(f"{key}: {v:.3f}" if isinstance(v, float) else f"{key}: {v}")
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
