"""Training-step time of every quality head of the RetinaNet family vs plain RetinaNet (issue 11 target: each
ratio <= 1.15).

    python benchmarks/bench_retina_step.py                          # small backbone, batch 8, 128x128, 2 threads
    python benchmarks/bench_retina_step.py --qualities none iou qfl --repeats 10 --out /tmp/bench_retina.json
    python benchmarks/bench_retina_step.py --backbone resnet18 --device cuda

All options share backbone, image size, batch and data, and the other values of conf/model/iou_retina.yaml (the
quality=none row is retina.yaml's model up to the IoU-only keys, which it does not read). One step = forward with
targets, backward, SGD update. Each repeat runs every option once, in an order rotated per repeat, so that drifting
machine load hits all alike; reports the median per option, its ratio to quality=none's median, and the median of
the per-repeat ratios (each option over quality=none in the same repeat), for wall time and for the process's CPU
time (all threads; on a machine shared with other jobs, waiting for a core inflates wall time, not CPU time).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from detector_batch import make_batch  # a sibling module: the scripts run as files from the repo root
from iouctl.fileio import atomic_write_json
from iouctl.models.contract import QUALITIES
from iouctl.models.retina import retinanet


def build(quality: str, backbone: str, size: int, num_classes: int, device: torch.device, scales: int = 3,
          fpn_channels: int | None = None):
    torch.manual_seed(0)
    # the values of conf/model/iou_retina.yaml
    model = retinanet(backbone=backbone, pretrained=None, min_size=size, max_size=size,
                      anchor_sizes=[16, 32, 64], aspect_ratios=[0.5, 1.0, 2.0], quality=quality,
                      iou_loss_weight=1.0, score_thresh=0.05, topk_candidates=1000, detach_iou_target=False,
                      head_norm="group", iou_supervision="positives", num_classes=num_classes,
                      scales_per_octave=scales, fpn_channels=fpn_channels).to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)


def step(model, opt, images, targets, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = sum(model(images, targets).values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the work, not the launch
    return time.perf_counter() - t0, time.process_time() - c0


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per option: median seconds, its ratio to quality=none's median, median of the per-repeat ratios."""
    med = {q: statistics.median(v) for q, v in times.items()}
    return {q: {"median_s": med[q], "ratio": med[q] / med["none"],
                "paired_ratio": statistics.median(t / b for t, b in zip(v, times["none"]))}
            for q, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="small", choices=["small", "resnet18", "resnet50"])
    ap.add_argument("--qualities", nargs="+", default=list(QUALITIES), choices=QUALITIES,
                    help="options to time (none, the baseline, is always included)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scales-per-octave", type=int, default=3, help="model.scales_per_octave (1: before issue 11)")
    ap.add_argument("--fpn-channels", type=int, default=0, help="model.fpn_channels (0: the backbone's, 64)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    num_classes = 5
    images, targets = make_batch(a.batch, a.size, num_classes, device)
    names = ["none"] + [q for q in a.qualities if q != "none"]
    models = {q: build(q, a.backbone, a.size, num_classes, device, a.scales_per_octave, a.fpn_channels or None)
              for q in names}
    wall: dict[str, list[float]] = {q: [] for q in names}
    cpu: dict[str, list[float]] = {q: [] for q in names}
    for i in range(a.warmup + a.repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # each option goes first as often as the others
        for q in order:
            dt, dc = step(*models[q], images, targets, device)
            if i >= a.warmup:
                wall[q].append(dt)
                cpu[q].append(dc)
    result = {"backbone": a.backbone, "batch": a.batch, "size": a.size, "threads": a.threads, "device": str(device),
              "scales_per_octave": a.scales_per_octave, "fpn_channels": a.fpn_channels or None, "repeats": a.repeats,
              "wall": summary(wall), "cpu": summary(cpu), "target_ratio": 1.15}
    print(f"{a.backbone} batch {a.batch} {a.size}x{a.size} {device} threads={a.threads}, median of {a.repeats}:")
    for q in names:
        w, c = result["wall"][q], result["cpu"][q]
        worst = max(w["ratio"], w["paired_ratio"], c["ratio"], c["paired_ratio"])
        print(f"  quality={q:<10} wall {w['median_s'] * 1e3:7.1f} ms x{w['ratio']:.3f} "
              f"(paired x{w['paired_ratio']:.3f})  cpu {c['median_s'] * 1e3:7.1f} ms x{c['ratio']:.3f} "
              f"(paired x{c['paired_ratio']:.3f})"
              + ("  (> 1.15)" if worst > 1.15 else ""))
    if a.out is not None:
        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
