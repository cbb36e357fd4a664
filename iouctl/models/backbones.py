"""Backbones shared by every detector: a small conv net for CPU experiments and torchvision's ResNets, and the one FPN
builder both families use (`fpn_backbone`).

Stages are named as torchvision's ResNet (stem, layer1..layer4 = C2..C5 at strides 4..32). ImageNet weights come only
from a local state_dict file: nothing is ever downloaded.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from iouctl.errors import ConfigError

BACKBONES = ("small", "resnet18", "resnet50")
STAGE_CHANNELS = {  # output channels of layer1..layer4
    "small": {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": 128},
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
STAGES = ("layer1", "layer2", "layer3", "layer4")  # C2..C5, strides 4, 8, 16, 32
FPN_CHANNELS = {"small": 64, "resnet18": 256, "resnet50": 256}  # 256: the FPN paper's; 64 for 128x128 CPU runs
FPN_EXTRA = ("conv", "maxpool")
MAX_FPN_LEVELS = 5


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallNet(nn.Module):
    """A 9-conv net (strides 2..32) sized for 128x128 CPU experiments: ~1 ms per image here."""

    channels: ClassVar[dict[str, int]] = STAGE_CHANNELS["small"]

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 2))
        self.layer1 = nn.Sequential(*_conv_bn(16, 32, 2))
        self.layer2 = nn.Sequential(*_conv_bn(32, 64, 2), *_conv_bn(64, 64, 1))
        self.layer3 = nn.Sequential(*_conv_bn(64, 128, 2), *_conv_bn(128, 128, 1))
        self.layer4 = nn.Sequential(*_conv_bn(128, 128, 2), *_conv_bn(128, 128, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words. Never torch's own advice to retry with
    weights_only=False: that would run whatever code the file holds."""
    text = str(exc)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if found:
        return f"it holds a pickled {found.group(1).rstrip('.')}, and only tensors are read (nothing in it is run)"
    if isinstance(exc, EOFError) or not text.strip():
        return "the file is empty or cut short"
    if "central directory" in text or "zip archive" in text:
        return "the file is cut short or corrupt (not a whole torch archive)"
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return f"not a file of tensors torch wrote ({found.group(1).strip() if found else 'unreadable'})"
    return f"not a file of tensors torch wrote ({type(exc).__name__}: {text.splitlines()[0][:120]})"


def _cached_imagenet(name: str) -> Path:
    """torchvision's ImageNet file for `name` in the torch hub cache (put there by an earlier download elsewhere)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(f"{name}-*.pth"))
    if not found:
        raise ConfigError(f"pretrained=imagenet: no cached {name} weights in {folder} (torchvision's {name}-*.pth); "
                          f"nothing is downloaded: copy the file there or give its path as pretrained=<file>")
    return found[-1]


def _load_imagenet(net: nn.Module, name: str, pretrained: str) -> None:
    path = _cached_imagenet(name) if pretrained == "imagenet" else Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained weights file not found: {path} (give a local {name} ImageNet state_dict file, "
                          f"or pretrained=null; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- corrupt, not torch, or pickled objects other than tensors
        raise ConfigError(f"pretrained weights file {path} could not be read as a torch state_dict: "
                          f"{load_failure(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights file {path} is not a state_dict (a dict of tensors)")
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    bad_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise ConfigError(f"pretrained weights file {path} does not fit {name}: {len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(bad_shape)} mis-shaped keys "
                          f"(first: {(missing + unexpected + bad_shape)[0]})")
    net.load_state_dict(state, strict=False)  # strict on weights above; num_batches_tracked may be absent


def backbone_body(backbone: str, pretrained: Optional[str]) -> nn.Module:
    """The body named `backbone`. With `pretrained` (ResNets only: a local ImageNet state_dict file, or "imagenet" for
    torchvision's file in the torch hub cache) the BatchNorms are frozen and the stem + layer1 stay fixed
    (torchvision's trainable_layers=3); without it all is trained."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if backbone == "small":
        if pretrained is not None:
            raise ConfigError("pretrained weights exist only for the resnet backbones (resnet18, resnet50); "
                              "use pretrained=null with backbone=small")
        return SmallNet()
    ctor = {"resnet18": resnet18, "resnet50": resnet50}[backbone]
    net = ctor(weights=None, norm_layer=FrozenBatchNorm2d if pretrained is not None else nn.BatchNorm2d)
    if pretrained is not None:
        _load_imagenet(net, backbone, pretrained)
        for name, p in net.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    return net


# ---------------------------------------------------------------------------------------------------------------- FPN
class ExtraConvLevels(ExtraFPNBlock):
    """`num` extra pyramid levels above the last FPN output by stride-2 3x3 convs (P6 from P5, P7 from relu(P6)),
    as torchvision's LastLevelP6P7 with use_P5 (RetinaNet's), but for any count (0 adds nothing)."""

    def __init__(self, channels: int, num: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num))
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p = results[-1]
        for i, conv in enumerate(self.convs):
            p = conv(p if i == 0 else F.relu(p))
            results.append(p)
            names.append(f"p{len(names) + 3}")
        return results, names


class NoExtraLevel(ExtraFPNBlock):
    """No extra FPN level (BackboneWithFPN adds a max-pool level when given None)."""

    def forward(self, x, y, names):
        return x, names


def fpn_backbone(backbone: str, pretrained: Optional[str], first_stage: int, num_levels: int, extra: str,
                 channels: Optional[int] = None) -> BackboneWithFPN:
    """The body named `backbone` with an FPN of `num_levels` outputs, the first on stage C`first_stage` (2: stride 4,
    Faster R-CNN's P2; 3: stride 8, RetinaNet's P3), each next level at twice the stride. Stages C`first_stage`..C5
    go through the FPN (`channels` wide, default FPN_CHANNELS); levels above C5 come from `extra`: "conv" (stride-2 3x3 convs on P5,
    RetinaNet's P6/P7) or "maxpool" (one stride-2 max-pool of the last level, the RPN-only P6 of torchvision's FPN
    R-CNN).

    Input Tensor[N, 3, H, W]; returns a module mapping it to an OrderedDict of Tensor[N, C, H / s_l, W / s_l] (names
    "0".. for the stages, then the extra levels'), with `out_channels` = C. See `backbone_body` for `pretrained`.
    Too many or too few levels is a ConfigError (one line).
    """
    if extra not in FPN_EXTRA:
        raise ValueError(f"extra={extra!r}; valid: {', '.join(FPN_EXTRA)}")
    stages = STAGES[first_stage - 2:]
    top = len(stages) + (1 if extra == "maxpool" else MAX_FPN_LEVELS)
    if not 1 <= num_levels <= min(MAX_FPN_LEVELS, top):
        high = min(MAX_FPN_LEVELS, top)
        raise ConfigError(f"need 1..{high} anchor sizes (one per FPN level P{first_stage}..P{first_stage + high - 1})"
                          f", got {num_levels}")
    net = backbone_body(backbone, pretrained)
    names = stages[:num_levels]
    channels = channels or FPN_CHANNELS[backbone]
    # built before the FPN: its convs draw their initial weights from the RNG first (the recorded figures' order)
    if extra == "conv":
        extra_block = ExtraConvLevels(channels, num_levels - len(names))
    else:
        extra_block = LastLevelMaxPool() if num_levels > len(names) else NoExtraLevel()
    return BackboneWithFPN(net, {n: str(i) for i, n in enumerate(names)},
                           [STAGE_CHANNELS[backbone][n] for n in names], channels, extra_blocks=extra_block)
