"""Benchmark: the NMS family's C++ kernels vs torchvision.ops.nms / batched_nms, on CPU, in one process.

Targets (issue 4): iou_guided_nms <= 1.3x torchvision nms at N = 5000; batched_iou_guided_nms <= 1.3x torchvision
batched_nms at N = 20000, 80 classes; soft_nms (gaussian) <= 3x torchvision nms at N = 5000.

Realistic boxes (``realistic_detections``): what a detector hands to NMS before suppression. ``centres`` ground-truth
-like boxes are placed uniformly in an 800 x 1216 image, with sides log-uniform in [16, 400] px and aspect ratios
log-uniform in [1/2, 2]; each of the N detections copies a random one and jitters it (centre shift N(0, 0.12) of the
width/height, log-size N(0, 0.12)), then is clipped to the image. Classification scores are U(0, 1), independent of
the jitter (a weak classifier); predicted IoUs are the true IoU with the source box plus N(0, 0.05) noise (a strong
IoU head). Each source box has a class drawn from ``classes``; its detections share it. Defaults keep ~17 detections
per source box at both sizes (5000 / 300, 20000 / 1200).

Timing: torch.set_num_threads(--threads, default 2), warm-up calls, then --repeats rounds in which every contender
runs once, interleaved, so that load from other processes hits all of them alike. Reported: the median time of each,
and the ratio of medians to the torchvision baseline. Correctness is checked on the way (keep sets equal).

    /work/venv/bin/python benchmarks/bench_nms.py [--repeats 41] [--threads 2] [--json out.json] [--reference]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torchvision

from iouctl.ops import _extension
from iouctl.ops.boxes import paired_box_iou
from iouctl.ops.nms import batched_iou_guided_nms, iou_guided_nms, soft_nms

IMAGE = (800, 1216)  # H, W of a COCO-sized input


def realistic_detections(n: int, centres: int, classes: int = 1, seed: int = 0, dtype=torch.float32):
    """(boxes Tensor[n, 4], scores Tensor[n], ious Tensor[n], labels Tensor[n] int64): see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    H, W = IMAGE
    side = torch.exp(torch.empty(centres, dtype=torch.float64).uniform_(math.log(16), math.log(400), generator=g))
    ar = torch.exp(torch.empty(centres, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g))
    cw, ch = side * ar.sqrt(), side / ar.sqrt()
    cx = torch.rand(centres, generator=g, dtype=torch.float64) * W
    cy = torch.rand(centres, generator=g, dtype=torch.float64) * H
    src = torch.stack([cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2], 1)
    src[:, 0::2] = src[:, 0::2].clamp(0, W)
    src[:, 1::2] = src[:, 1::2].clamp(0, H)
    which = torch.randint(0, centres, (n,), generator=g)
    jit = torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.12
    w, h = cw[which], ch[which]
    x, y = cx[which] + jit[:, 0] * w, cy[which] + jit[:, 1] * h
    w, h = w * torch.exp(jit[:, 2]), h * torch.exp(jit[:, 3])
    boxes = torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    true_iou = paired_box_iou(boxes, src[which])
    ious = (true_iou + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0, 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (centres,), generator=g)[which]
    return boxes.to(dtype), scores.to(dtype), ious.to(dtype), labels


def interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Per-contender lists of wall times (s): each round runs every contender once."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def compare(name, baseline_name, fns, targets, repeats, rows, warmup=3):
    """Time ``fns`` (name -> callable) interleaved; print and append to ``rows`` each median, its ratio to
    ``fns[baseline_name]``'s and the verdict against ``targets`` (name -> highest ratio allowed)."""
    times = interleaved(fns, repeats, warmup)
    base = statistics.median(times[baseline_name])
    for k, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        tgt = targets.get(k)
        verdict = "" if tgt is None else ("meets" if ratio <= tgt else "MISSES") + f" <= {tgt:g}x"
        rows.append({"case": name, "impl": k, "median_ms": med * 1e3, "ratio": ratio, "target": tgt,
                     "verdict": verdict})
        print(f"{name:<38} {k:<34} {med * 1e3:10.2f} ms  {ratio:7.3f}x  {verdict}")


def case(name, baseline, contenders, target, repeats, rows):
    compare(name, "torchvision", {"torchvision": baseline, **contenders}, target, repeats, rows)


def options(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options of a kernel benchmark (--repeats, --threads, --json, --reference); a script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--reference", action="store_true", help="also time the pure-PyTorch references (slow)")
    return p


def start(args: argparse.Namespace, library: str) -> None:
    """Set torch's thread count, build (or load) the kernels of `library` or exit naming the build log, and print the
    setup: versions, CPU, threads, load average, repeats."""
    torch.set_num_threads(args.threads)
    if not _extension.load_library(library):
        sys.exit(f"the {library} kernels failed to build; see {_extension.build_log(library)}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}, median of {args.repeats}")


def main() -> None:
    args = options(__doc__, repeats=41).parse_args()
    start(args, "nms")
    rows: list[dict] = []
    ref_repeats = max(3, args.repeats // 8)

    b, s, iou, _ = realistic_detections(5000, 300, seed=0)
    assert torch.equal(iou_guided_nms(b, s, s, 0.5)[0], torchvision.ops.nms(b, s, 0.5))
    keep = torchvision.ops.nms(b, iou, 0.5)
    print(f"N=5000: {len(keep)} kept by greedy NMS at IoU 0.5")
    contenders = {"iou_guided_nms": lambda: iou_guided_nms(b, s, iou, 0.5),
                  "soft_nms gaussian": lambda: soft_nms(b, s, "gaussian", 0.5, 0.3, 0.001),
                  "soft_nms linear": lambda: soft_nms(b, s, "linear", 0.5, 0.3, 0.001)}
    case("N=5000 (nms)", lambda: torchvision.ops.nms(b, iou, 0.5), contenders,
         {"iou_guided_nms": 1.3, "soft_nms gaussian": 3.0}, args.repeats, rows)
    if args.reference:
        case("N=5000 (nms), references", lambda: torchvision.ops.nms(b, iou, 0.5),
             {"iou_guided_nms reference": lambda: iou_guided_nms(b, s, iou, 0.5, impl="reference"),
              "soft_nms gaussian reference": lambda: soft_nms(b, s, "gaussian", impl="reference")},
             {}, ref_repeats, rows)

    b, s, iou, lab = realistic_detections(20000, 1200, classes=80, seed=1)
    got = batched_iou_guided_nms(b, s, iou, lab, 0.5)[0]
    assert set(got.tolist()) == set(torchvision.ops.batched_nms(b, iou, lab, 0.5).tolist())
    print(f"N=20000, 80 classes: {len(got)} kept")
    baseline = lambda: torchvision.ops.batched_nms(b, iou, lab, 0.5)  # noqa: E731
    case("N=20000, 80 classes (batched_nms)", baseline,
         {"batched_iou_guided_nms": lambda: batched_iou_guided_nms(b, s, iou, lab, 0.5)},
         {"batched_iou_guided_nms": 1.3}, args.repeats, rows)
    if args.reference:
        case("N=20000, 80 classes, reference", baseline,
             {"batched reference": lambda: batched_iou_guided_nms(b, s, iou, lab, 0.5, impl="reference")},
             {}, ref_repeats, rows)

    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
