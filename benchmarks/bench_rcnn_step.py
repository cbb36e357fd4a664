"""Training-step time of IoU-Net vs plain FPN Faster R-CNN (issue 5 target: ratio <= 1.3).

    python benchmarks/bench_rcnn_step.py                           # small backbone, batch 8, 128x128, 2 threads
    python benchmarks/bench_rcnn_step.py --backbone resnet18 --repeats 10 --json /tmp/bench_rcnn.json
    python benchmarks/bench_rcnn_step.py --pool roi_align          # RoIAlign instead of PrRoI (both models)
    python benchmarks/bench_rcnn_step.py --device cuda

Both models share backbone, pool, image size, batch and data; steps alternate between the two so that drifting
machine load hits both alike. One step = forward with targets, backward, SGD update. Reports the median step time of
each model and the ratio of medians.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torchvision.ops import RoIAlign

from detector_batch import make_batch  # a sibling module: the scripts run as files from the repo root
from iouctl.fileio import atomic_write_json
from iouctl.models.rcnn import faster_rcnn
from iouctl.ops import PrRoIPool


def build(iou_head: bool, backbone: str, size: int, num_classes: int, pool: str, device: torch.device):
    torch.manual_seed(0)
    module = PrRoIPool(7) if pool == "prroi" else RoIAlign(7, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    # the values of conf/model/iou_net.yaml (faster_rcnn.yaml differs only in iou_head)
    model = faster_rcnn(backbone=backbone, pretrained=None, min_size=size, max_size=size,
                        anchor_sizes=[16, 32, 64, 128, 256], aspect_ratios=[0.5, 1.0, 2.0], detections_per_img=100,
                        iou_head=iou_head, iou_loss_weight=5.0, box_score_thresh=0.05, iou_loss="smooth_l1",
                        jitter_per_gt=16, iou_bins=10, num_classes=num_classes, pool=module)
    return model.to(device).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="small", choices=["small", "resnet18", "resnet50"])
    ap.add_argument("--pool", default="prroi", choices=["prroi", "roi_align"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, targets = make_batch(args.batch, args.size, args.classes, device)
    names = ("faster_rcnn", "iou_net")
    models = {n: build(n == "iou_net", args.backbone, args.size, args.classes, args.pool, device) for n in names}
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in models.items()}

    def step(name: str) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        loss = sum(models[name](images, targets).values())
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        sync()
        return time.perf_counter() - t0

    for _ in range(args.warmup):  # first calls build/load the PrRoI kernel and warm the allocator
        for n in names:
            step(n)
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:
            times[n].append(step(n))
    med = {n: statistics.median(t) for n, t in times.items()}
    ratio = med["iou_net"] / med["faster_rcnn"]
    result = {"backbone": args.backbone, "pool": args.pool, "batch": args.batch, "size": args.size,
              "threads": args.threads, "device": str(device), "repeats": args.repeats,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "median_s": med, "ratio_iou_net_over_faster_rcnn": ratio, "target": 1.3}
    for n in names:
        print(f"{n:12s} median {med[n] * 1e3:8.1f} ms/step  (min {min(times[n]) * 1e3:.1f}, "
              f"max {max(times[n]) * 1e3:.1f})")
    print(f"ratio iou_net / faster_rcnn = {ratio:.3f}  (target <= 1.3)  [{args.backbone}, {args.pool}, batch "
          f"{args.batch}, {args.size}x{args.size}, {args.threads} threads, {device}]")
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
