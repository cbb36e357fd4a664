"""What the kernel op tests share: the implementations and dtypes every op is compared over, and the fixture that
builds an op library first (a build failure fails the module's tests, never skips them)."""
from __future__ import annotations

import math

import pytest
import torch

from iouctl.ops import _extension

IMPLS = ["cpp", "reference"]  # each op's C++ kernel and its pure-PyTorch reference (iouctl.ops.reference)
DTYPES = [torch.float32, torch.float64]


def require_library(name: str):
    """A module-scoped autouse fixture that builds (or loads from the cache) the kernel library `name` before the
    module's tests; assign it to a module-level name to use it: `_built = require_library("nms")`."""

    @pytest.fixture(scope="module", autouse=True)
    def _built():
        assert _extension.load_library(name), f"the {name} kernels failed to build; see {_extension.build_log(name)}"

    return _built


def clustered(n, n_centres, dtype, seed, ties=False, n_classes=1, spread=0.15, with_ious=False):
    """Detector-like boxes: jittered copies of a few ground-truth boxes in a 400 x 400 image (a small
    benchmarks/bench_nms.py realistic_detections). `spread`: the jitter's std, relative to the box side; `ties`: few
    distinct score (and IoU) values, so that index tie-breaking decides.
    Returns (boxes Tensor[n, 4], scores Tensor[n], labels Tensor[n] int64), with predicted IoUs Tensor[n] U(0, 1)
    before the labels when `with_ious`; labels are sparse and partly negative (the copied box's class * 7 - 3)."""
    g = torch.Generator().manual_seed(seed)
    side = torch.exp(torch.empty(n_centres).uniform_(math.log(8), math.log(200), generator=g))
    ctr = torch.rand(n_centres, 2, generator=g) * 400
    which = torch.randint(0, n_centres, (n,), generator=g)
    jit = torch.randn(n, 4, generator=g) * spread
    wh = side[which, None] * torch.exp(jit[:, 2:])
    xy = ctr[which] + jit[:, :2] * side[which, None]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:
        scores = (scores * 5).floor() / 5
    ious = None
    if with_ious:  # drawn here, before the labels, so that each caller's random stream is what it always was
        ious = torch.rand(n, generator=g, dtype=torch.float64)
        if ties:
            ious = (ious * 4).floor() / 4
    cls = torch.randint(0, n_classes, (n_centres,), generator=g)[which] * 7 - 3
    if with_ious:
        return boxes, scores.to(dtype), ious.to(dtype), cls
    return boxes, scores.to(dtype), cls
