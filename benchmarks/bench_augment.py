"""Training-step time with augment=standard vs augment=none, data loaded by DataLoader workers as `iouctl train` loads
it (target: ratio <= 1.10 at num_workers=2).

    python benchmarks/bench_augment.py                               # iou_net on the built-in dataset, 2 workers
    python benchmarks/bench_augment.py model=retina --blocks 6 --out /tmp/bench_augment.json

Trailing arguments are `iouctl train` overrides (augment.* ones apply to the standard arm). One step = wait for the
batch + forward with targets + backward + SGD update, timed from the end of the previous step, so data loading that
cannot keep up shows in it. The arms run in alternating blocks of --steps iterations (a fresh loader each block, the
same iterations and images for both arms; the first --skip steps of a block, while the workers start, are left out),
so a drifting machine load hits both. Also reports the augmentation's own CPU time per image in one thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from iouctl import config
from iouctl.data import collate_detection
from iouctl.data.augment import AugmentedDataset, sample_seed
from iouctl.engine.train import CategoryMap, IterationSampler, _to_model_targets
from iouctl.fileio import atomic_write_json

ARMS = ("none", "standard")


def block(model, opt, dataset, cats, start: int, steps: int, batch: int, workers: int, seed: int) -> list[float]:
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=IterationSampler(len(dataset), batch, start,
                                                                                 start + steps, seed),
                                         collate_fn=collate_detection, num_workers=workers)
    times, t0 = [], time.perf_counter()
    for images, targets in loader:
        loss = sum(model(images, _to_model_targets(targets, cats, torch.device("cpu"))).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


def augment_cpu_ms(augment, dataset, n: int = 64) -> float:
    """Median milliseconds per image of the augmentation alone (images read beforehand), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    items = [dataset[i % len(dataset)] for i in range(n)]
    times = []
    for k, (image, target) in enumerate(items):
        t0 = time.perf_counter()
        augment(image, target, seed=sample_seed(0, k))
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="iouctl train overrides (default model=iou_net)")
    ap.add_argument("--steps", type=int, default=20, help="iterations per block")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per arm")
    ap.add_argument("--skip", type=int, default=3, help="first steps of each block left out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    aug_keys = [o for o in a.overrides if o.startswith("augment.")]  # for the standard arm only
    base = ["model=iou_net", *(o for o in a.overrides if o not in aug_keys)]
    cfg = config.compose("train", base)
    data = config.instantiate(cfg.data)
    data.prepare()
    torch.manual_seed(int(cfg.seed))
    model = config.instantiate_model(cfg.model, num_classes=data.num_classes, pool=config.instantiate(cfg.pool)).train()
    opt = config.instantiate(cfg.optim)(model.parameters())
    cats, train = CategoryMap(data.categories), data.dataset("train")
    augments = {arm: config.instantiate(config.compose("train", [*base, f"augment={arm}",
                                                                 *(aug_keys if arm == "standard" else [])]).augment)
                for arm in ARMS}
    datasets = {arm: AugmentedDataset(train, aug) for arm, aug in augments.items()}
    batch, workers, seed = int(cfg.batch_size), int(cfg.num_workers), int(cfg.seed)
    load0 = os.getloadavg()[0]
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    block(model, opt, datasets["none"], cats, 0, a.skip + 2, batch, workers, seed)  # warm-up (kernels, allocator)
    for b in range(a.blocks):
        for arm in ARMS if b % 2 == 0 else ARMS[::-1]:
            times[arm] += block(model, opt, datasets[arm], cats, b * a.steps, a.steps, batch, workers, seed)[a.skip:]
    load1 = os.getloadavg()[0]
    med = {arm: statistics.median(v) for arm, v in times.items()}
    aug_ms = augment_cpu_ms(augments["standard"], train)
    result = {"model": cfg.model._target_, "batch": batch, "num_workers": workers, "threads": a.threads,
              "image_size": int(cfg.data.get("image_size", 0) or 0), "steps_per_arm": len(times["none"]),
              "median_step_s": med, "ratio_standard_over_none": med["standard"] / med["none"], "target_ratio": 1.10,
              "augment_standard_ms_per_image_1_thread": aug_ms, "loadavg_1min_before_after": [load0, load1],
              "overrides": a.overrides}
    print(f"{cfg.name} batch {batch}, num_workers={workers}, {a.threads} threads, {len(times['none'])} steps per arm: "
          f"none {med['none'] * 1e3:.1f} ms, standard {med['standard'] * 1e3:.1f} ms per step, ratio "
          f"{result['ratio_standard_over_none']:.3f} (target <= 1.10); standard alone {aug_ms:.2f} ms per image "
          f"(1 thread); load average {load0:.1f} -> {load1:.1f}")
    if a.out is not None:
        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
