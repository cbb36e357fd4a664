"""Backbone bodies shared by every detector: a small conv net for CPU experiments and torchvision's ResNets.

Stages are named as torchvision's ResNet (stem, layer1..layer4 = C2..C5 at strides 4..32), so each detector wraps any
body in its own FPN. ImageNet weights come only from a local state_dict file: nothing is ever downloaded.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.ops import FrozenBatchNorm2d

from iouctl.errors import ConfigError

BACKBONES = ("small", "resnet18", "resnet50")
STAGE_CHANNELS = {  # output channels of layer1..layer4
    "small": {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": 128},
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}


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
    return f"not a torch file ({type(exc).__name__}: {text.splitlines()[0][:120]})"


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
