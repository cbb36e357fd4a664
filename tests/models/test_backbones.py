"""The one FPN builder of both detector families (iouctl.models.backbones.fpn_backbone)."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from iouctl.errors import ConfigError
from iouctl.models.backbones import ExtraConvLevels, NoExtraLevel, fpn_backbone
from tests.models.test_rcnn import one_thread  # noqa: F401 -- its autouse fixture: one intra-op thread


@pytest.mark.parametrize("first_stage, extra, levels", [
    (3, "conv", 1), (3, "conv", 3), (3, "conv", 5),  # RetinaNet: P3.., P6/P7 by convs
    (2, "maxpool", 2), (2, "maxpool", 4), (2, "maxpool", 5),  # Faster R-CNN: P2.., P6 by max-pool
])
def test_levels_strides_and_channels(first_stage, extra, levels):
    torch.manual_seed(0)
    fpn = fpn_backbone("small", None, first_stage, levels, extra)
    with torch.no_grad():
        out = fpn(torch.rand(2, 3, 64, 64))
    strides = [2 ** (first_stage + i) for i in range(levels)]
    assert [tuple(f.shape) for f in out.values()] == [(2, 64, math.ceil(64 / s), math.ceil(64 / s)) for s in strides]
    assert fpn.out_channels == 64
    stage_levels = min(levels, 6 - first_stage)  # C_first..C5 go through the FPN
    assert list(out)[:stage_levels] == [str(i) for i in range(stage_levels)]
    above = levels - stage_levels
    block = fpn.fpn.extra_blocks
    if extra == "conv":
        assert isinstance(block, ExtraConvLevels) and len(block.convs) == above
    else:
        assert isinstance(block, LastLevelMaxPool if above else NoExtraLevel)


def test_resnet_fpn_is_256_wide_with_stage_channels_in():
    fpn = fpn_backbone("resnet18", None, 2, 4, "maxpool")
    assert fpn.out_channels == 256
    assert [b[0].in_channels for b in fpn.fpn.inner_blocks] == [64, 128, 256, 512]  # C2..C5 of resnet18


@pytest.mark.parametrize("first_stage, extra, levels, match", [
    (3, "conv", 6, r"need 1..5 anchor sizes \(one per FPN level P3..P7\), got 6"),
    (2, "maxpool", 6, r"need 1..5 anchor sizes \(one per FPN level P2..P6\), got 6"),
    (3, "maxpool", 5, r"need 1..4 anchor sizes \(one per FPN level P3..P6\), got 5"),  # one max-pool level at most
    (3, "conv", 0, r"need 1..5 anchor sizes"),
])
def test_level_counts_outside_the_pyramid_are_one_line(first_stage, extra, levels, match):
    with pytest.raises(ConfigError, match=match) as exc:
        fpn_backbone("small", None, first_stage, levels, extra)
    assert "\n" not in str(exc.value)


def test_both_families_build_their_fpn_here():
    from tests.models.test_contract import build

    retina, rcnn = build("retina"), build("faster_rcnn")
    assert isinstance(retina.backbone.fpn.extra_blocks, ExtraConvLevels)
    assert isinstance(rcnn.backbone.fpn.extra_blocks, LastLevelMaxPool)
    assert len(retina.backbone.fpn.inner_blocks) == 3 and len(rcnn.backbone.fpn.inner_blocks) == 4
