"""Training-step time of the IoU-aware RetinaNet vs plain RetinaNet (issue 5 target: ratio <= 1.15).

    python benchmarks/bench_retina_step.py                          # small backbone, batch 8, 128x128, 2 threads
    python benchmarks/bench_retina_step.py --backbone resnet18 --repeats 10 --out /tmp/bench_retina.json
    python benchmarks/bench_retina_step.py --device cuda

Both models share backbone, image size, batch and data; steps alternate between the two so that drifting machine load
hits both alike. One step = forward with targets, backward, SGD update. Reports the median per model and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from detector_batch import make_batch  # a sibling module: the scripts run as files from the repo root
from iouctl.fileio import atomic_write_json
from iouctl.models.retina import retinanet


def build(iou_head: bool, backbone: str, size: int, num_classes: int, device: torch.device):
    torch.manual_seed(0)
    # the values of conf/model/iou_retina.yaml (retina.yaml differs only in iou_head)
    model = retinanet(backbone=backbone, pretrained=None, min_size=size, max_size=size,
                      anchor_sizes=[16, 32, 64], aspect_ratios=[0.5, 1.0, 2.0], detections_per_img=100,
                      iou_head=iou_head, iou_loss_weight=4.0, score_thresh=0.05, topk_candidates=1000,
                      cls_weight=0.5, detach_iou_target=True, head_norm="group", iou_supervision="overlapping",
                      num_classes=num_classes).to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)


def step(model, opt, images, targets, device: torch.device) -> float:
    t0 = time.perf_counter()
    loss = sum(model(images, targets).values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the work, not the launch
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="small", choices=["small", "resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    num_classes = 5
    images, targets = make_batch(a.batch, a.size, num_classes, device)
    models = {"retina": build(False, a.backbone, a.size, num_classes, device),
              "iou_retina": build(True, a.backbone, a.size, num_classes, device)}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(a.warmup + a.repeats):
        order = list(models) if i % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for name in order:
            dt = step(*models[name], images, targets, device)
            if i >= a.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"backbone": a.backbone, "batch": a.batch, "size": a.size, "threads": a.threads, "device": str(device),
              "repeats": a.repeats, "median_s": med, "ratio_iou_retina_over_retina": med["iou_retina"] / med["retina"],
              "target_ratio": 1.15}
    print(f"{a.backbone} batch {a.batch} {a.size}x{a.size} {device} threads={a.threads}: "
          f"retina {med['retina'] * 1e3:.1f} ms, iou_retina {med['iou_retina'] * 1e3:.1f} ms, "
          f"ratio {result['ratio_iou_retina_over_retina']:.3f} (target <= 1.15)")
    if a.out is not None:
        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
