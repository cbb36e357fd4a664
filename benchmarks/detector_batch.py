"""The synthetic training batch shared by the detector step benchmarks (run them as scripts from the repo root)."""
from __future__ import annotations

import torch


def make_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0):
    """`batch` random images Tensor[3, size, size] with 3 random boxes each (sides 10%..60% of the image)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        wh = (torch.rand(3, 2, generator=g) * 0.5 + 0.1) * size
        xy = torch.rand(3, 2, generator=g) * (size - wh)
        images.append(torch.rand(3, size, size, generator=g).to(device))
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(0, num_classes, (3,), generator=g).to(device)})
    return images, targets
