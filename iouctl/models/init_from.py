"""Start a detector from a torchvision detector's weights: ``model.init_from=FILE``.

FILE is the state_dict of torchvision's ``fasterrcnn_resnet50_fpn`` / ``fasterrcnn_resnet50_fpn_v2`` (for the two-stage
models) or ``retinanet_resnet50_fpn`` / ``retinanet_resnet50_fpn_v2`` (for the RetinaNets), as the torch hub cache
holds it, loaded into a model built with backbone=resnet50. Tensors load group by group, each only where it is the
same computation as in torchvision; whatever differs keeps its fresh initialisation and is reported:

  group (ours)              torchvision v1                     torchvision v2
  backbone body             same names                         same names
  FPN                       same names                         conv + BatchNorm, folded into our conv
  FPN P6-P7 (RetinaNet)     extra_blocks.p6/p7                 not loaded: P6 reads C5 there, P5 here
  RPN conv, outputs         same names                         not loaded: 2 convs there, 1 here
  box head (fc6, fc7)       roi_heads.box_head.fc6/fc7         not loaded: 4 conv+BN and 1 FC layers there
  box predictor             roi_heads.box_predictor            not loaded: its input (the box head) differs
  cls / box towers          same names (head_norm=none)        not loaded: GroupNorm of 32 groups there
  output convs              the rows of our anchors            only where the tower is loaded

Anchor-specific output convs (RPN and RetinaNet) load the rows of the torchvision anchors that equal ours (same size
and aspect ratio on every level); class-specific ones (box predictor, RetinaNet class logits) load only when the
number of classes matches, else they are re-initialised. The IoU heads are new. With init_from the backbone's
BatchNorms are frozen and the stem + layer1 stay fixed, as torchvision fine-tunes its detectors (and as
``model.pretrained`` does). Only tensors are ever unpickled (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from iouctl.errors import ConfigError
from iouctl.models.backbones import load_failure

# what each model family takes: (torchvision builders, our model options)
FILES = {"two_stage": ("fasterrcnn_resnet50_fpn or fasterrcnn_resnet50_fpn_v2", "faster_rcnn, iou_net"),
         "retina": ("retinanet_resnet50_fpn or retinanet_resnet50_fpn_v2", "retina, iou_retina")}
# torchvision's anchors (faster_rcnn._default_anchorgen, retinanet._default_anchorgen): per FPN level, from P2
# (Faster R-CNN) or P3 (RetinaNet); anchor index per location = ratio index * sizes per level + size index.
TV_RCNN_SIZES = ((32,), (64,), (128,), (256,), (512,))
TV_RETINA_SIZES = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
TV_RATIOS = (0.5, 1.0, 2.0)
_TV_GROUPS = 32  # GroupNorm groups of retinanet_resnet50_fpn_v2's towers (not in the state_dict)
_BN_EPS = 1e-5  # nn.BatchNorm2d's default, used by every torchvision model built without FrozenBatchNorm2d
_MIN_BODY_FIT = 0.9  # share of our backbone tensors the file must fill, else it is the wrong file


@dataclass
class GroupResult:
    """What happened to one module group of ours. status: loaded | partial | re-initialised | fresh | new."""

    group: str
    status: str
    loaded: int
    total: int
    reason: str = ""
    shapes: list = field(default_factory=list)  # [our key, our shape, the file's shape] of re-initialised tensors


@dataclass
class InitReport:
    """The summary of an init_from load: ``lines()`` for the console, ``to_dict()`` for the run's init_from.json."""

    file: str
    source: str
    groups: list[GroupResult]
    unused: dict[str, int]  # file tensors not loaded, counted by group
    notes: list[str]

    @property
    def loaded(self) -> int:
        return sum(g.loaded for g in self.groups)

    def to_dict(self) -> dict:
        return {"file": self.file, "source": self.source, "tensors_loaded": self.loaded,
                "groups": [asdict(g) for g in self.groups], "unused_in_file": dict(self.unused), "notes": self.notes}

    def lines(self) -> list[str]:
        total = sum(g.total for g in self.groups)
        out = [f"init_from {self.file} ({self.source}): {self.loaded} of our {total} tensors loaded, "
               f"{sum(self.unused.values())} of the file's unused"]
        loaded = [f"{g.group} {g.loaded}/{g.total}" for g in self.groups if g.status == "loaded"]
        if loaded:
            out.append("  loaded          " + ", ".join(loaded))
        for g in self.groups:
            if g.status in ("partial", "re-initialised", "fresh"):
                shapes = "; ".join(f"{'.'.join(k.split('.')[-2:-1])} {list(a)}, file {list(b)}"
                                   for k, a, b in g.shapes if k.endswith(".weight"))
                head = f"{g.group} {g.loaded}/{g.total}" if g.status == "partial" else g.group
                out.append(f"  {g.status:<15} {head}: {g.reason}" + (f"; {shapes}" if shapes else ""))
        new = [f"{g.group} ({g.total} tensors)" for g in self.groups if g.status == "new"]
        if new:
            out.append("  new             " + ", ".join(new))
        if self.unused:
            out.append("  unused in file  " + ", ".join(f"{k} {n}" for k, n in self.unused.items()))
        out += [f"  note            {n}" for n in self.notes]
        return out


# ------------------------------------------------------------------------------------------------------ the file
def read_state_dict(path: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """(resolved path, {name: Tensor}) of a state_dict file, or of the "model" / "state_dict" entry of a checkpoint."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"init_from file not found: {p} (give a local torchvision detector state_dict .pth; "
                          f"nothing is downloaded)")
    try:
        # torchvision's reference scripts store their argparse.Namespace beside the weights: a plain attribute bag
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- corrupt, truncated, not torch, or pickled objects other than tensors
        raise ConfigError(f"init_from file {p} could not be read as a torch state_dict ({load_failure(exc)})") from None
    if isinstance(obj, dict) and "iteration" in obj and "optimizer" in obj and "config_name" in obj:
        raise ConfigError(f"init_from file {p} is an iouctl training checkpoint: continue its run with "
                          f"`iouctl train resume=true run=<its run>`; init_from takes the state_dict of torchvision's "
                          f"{FILES['two_stage'][0]} or {FILES['retina'][0]}")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in obj.items()):
        raise ConfigError(f"init_from file {p} is not a state_dict (a dict of named tensors, or a checkpoint with "
                          f"one under 'model'); got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return p, obj


def _family(sd: dict[str, Tensor]) -> Optional[str]:
    if any(k.startswith(("rpn.", "roi_heads.")) for k in sd):
        return "two_stage"
    if any(k.startswith(("head.classification_head.", "head.regression_head.")) for k in sd):
        return "retina"
    if "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd):
        return "classifier"
    return None


def _takes(family: str) -> str:
    return f"the state_dict of torchvision's {FILES[family][0]} (models {FILES[family][1]}, backbone resnet50)"


def _check_family(path: Path, sd: dict[str, Tensor], want: str) -> None:
    got = _family(sd)
    if got == want:
        return
    if got == "classifier":
        raise ConfigError(f"init_from file {path} holds a ResNet classifier, not a detector: give it as "
                          f"model.pretrained={path}; init_from takes {_takes(want)}")
    if got in FILES:
        kind = "a Faster R-CNN" if got == "two_stage" else "a RetinaNet"
        raise ConfigError(f"init_from file {path} holds {kind}, for models {FILES[got][1]}; this model takes "
                          f"{_takes(want)}")
    raise ConfigError(f"init_from file {path} is not a torchvision detector state_dict (first keys: "
                      f"{', '.join(list(sd)[:3])}); init_from takes {_takes(want)}")


def _depth(keys, prefix: str) -> int:
    """Number of layers prefix.0, prefix.1, ... among keys."""
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


# ------------------------------------------------------------------------------------------------------ loading
class _Loader:
    """Collects, group by group, the tensors to load into ``model`` from the file's state_dict ``sd``."""

    def __init__(self, model: nn.Module, sd: dict[str, Tensor]) -> None:
        self.model = model
        self.sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        self.own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        self.load: dict[str, Tensor] = {}
        self.used: set[str] = set()
        self.groups: list[GroupResult] = []
        self.by_group: dict[str, GroupResult] = {}

    def ours(self, prefix: str) -> list[str]:
        return [k for k in self.own if k.startswith(prefix)]

    def fits(self, key: str, tensor: Optional[Tensor]) -> bool:
        return tensor is not None and tuple(tensor.shape) == tuple(self.own[key].shape)

    def add(self, result: GroupResult) -> GroupResult:
        self.groups.append(result)
        self.by_group[result.group] = result
        return result

    def loaded(self, group: str) -> bool:
        g = self.by_group.get(group)
        return g is not None and g.status == "loaded"

    def take(self, group: str, tensors: dict[str, Tensor], file_keys, total: Optional[int] = None) -> GroupResult:
        self.load.update(tensors)
        self.used.update(file_keys)
        return self.add(GroupResult(group, "loaded", len(tensors), total if total is not None else len(tensors)))

    def per_tensor(self, group: str, keys: list[str]) -> GroupResult:
        """Each of our `keys` loads from the file's tensor of the same name, where that has the same shape."""
        got, misfit = {}, []
        for k in keys:
            fk = k
            if self.fits(k, self.sd.get(fk)):
                got[k] = self.sd[fk]
                self.used.add(fk)
            else:
                misfit.append((k, fk))
        self.load.update(got)
        if not misfit:
            return self.add(GroupResult(group, "loaded", len(got), len(keys)))
        k, fk = misfit[0]
        first = f"{fk} is not in the file" if fk not in self.sd else \
            f"{k} {list(self.own[k].shape)} vs the file's {list(self.sd[fk].shape)}"
        why = f"{len(misfit)} tensors missing from the file or of another shape (first: {first})"
        return self.add(GroupResult(group, "partial" if got else "fresh", len(got), len(keys), why))

    def all_or_none(self, group: str, pairs: dict[str, str]) -> GroupResult:
        """Our keys -> the file's keys, loaded only all together (one computation: a tower, an MLP)."""
        bad = [(k, fk) for k, fk in pairs.items() if not self.fits(k, self.sd.get(fk))]
        if not bad:
            return self.take(group, {k: self.sd[fk] for k, fk in pairs.items()}, pairs.values())
        k, fk = bad[0]
        why = f"the file has no {fk}" if fk not in self.sd else \
            f"{k} is {list(self.own[k].shape)}, the file's {fk} {list(self.sd[fk].shape)}"
        return self.fresh(group, len(pairs), why)

    def fresh(self, group: str, total: int, reason: str, shapes=None) -> GroupResult:
        return self.add(GroupResult(group, "fresh", 0, total, reason, shapes or []))

    def unused(self, names: dict[str, str]) -> dict[str, int]:
        """File tensors not loaded, counted under the group name of their longest matching prefix in `names`."""
        counts: dict[str, int] = {}
        for k in self.sd:
            if k in self.used:
                continue
            hits = [p for p in names if k.startswith(p)]
            name = names[max(hits, key=len)] if hits else ".".join(k.split(".")[:2])
            counts[name] = counts.get(name, 0) + 1
        return counts

    def commit(self) -> None:
        unexpected = self.model.load_state_dict(self.load, strict=False).unexpected_keys
        if unexpected:  # every key was checked against our state_dict above: a bug
            raise AssertionError(f"init_from loaded keys the model does not have: {unexpected[:3]}")


def _check_body(path: Path, loader: _Loader, family: str) -> None:
    body = loader.by_group["backbone body"]
    if body.loaded < _MIN_BODY_FIT * body.total:
        raise ConfigError(f"init_from file {path} fits almost nothing: {body.loaded} of our {body.total} ResNet-50 "
                          f"backbone tensors ({body.reason}); init_from takes {_takes(family)}")


def _freeze_body(body: nn.Module, eps: float) -> None:
    """BatchNorms -> FrozenBatchNorm2d(eps), stem + layer1 fixed: torchvision's fine-tuning (trainable_layers=3)."""
    for module in list(body.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                frozen = FrozenBatchNorm2d(child.num_features if isinstance(child, nn.BatchNorm2d)
                                           else child.weight.numel(), eps=eps)
                with torch.no_grad():
                    for buf in ("weight", "bias", "running_mean", "running_var"):
                        getattr(frozen, buf).copy_(getattr(child, buf))
                setattr(module, child_name, frozen)
    for name, p in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)


def _body_eps(sd: dict[str, Tensor], v1: bool) -> float:
    """torchvision runs its v1 COCO weights, saved from FrozenBatchNorm2d (no num_batches_tracked), with eps 0
    (overwrite_eps); BatchNorm2d-trained files (v2, or built without weights) use the default."""
    tracked = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in sd)
    return 0.0 if v1 and not tracked else _BN_EPS


def _start(model: nn.Module, path: str | Path, backbone: str, family: str, v2_keys: tuple[str, ...]
           ) -> tuple[Path, _Loader, list[str], bool]:
    """Read and check the file, freeze our backbone as torchvision fine-tunes, load the body and the FPN.
    Returns (path, loader, notes, whether the file is a v2 model: any of `v2_keys` in it)."""
    if backbone != "resnet50":
        raise ConfigError(f"init_from {path}: torchvision's detector files are ResNet-50-FPN ({FILES[family][0]}); "
                          f"set model.backbone=resnet50 (got {backbone})")
    p, sd = read_state_dict(path)
    _check_family(p, sd, family)
    v2 = any(k in sd for k in v2_keys)
    eps = _body_eps(sd, v1=not v2)
    _freeze_body(model.backbone.body, eps)
    loader = _Loader(model, sd)
    notes = [f"backbone BatchNorms frozen (eps {eps:g}), stem + layer1 fixed, as torchvision fine-tunes"]
    loader.per_tensor("backbone body", loader.ours("backbone.body."))
    _check_body(p, loader, family)
    _fpn(loader, notes)
    return p, loader, notes, v2


def _fpn(loader: _Loader, notes: list[str]) -> None:
    """Our FPN convs (inner_blocks.i.0 / layer_blocks.i.0, with bias) from the file's same convs, or from its conv +
    BatchNorm (v2) folded: w * g / sqrt(v + eps), b - m * g / sqrt(v + eps), exact in eval mode."""
    keys = [k for k in loader.ours("backbone.fpn.") if not k.startswith("backbone.fpn.extra_blocks.")]
    convs = sorted({k.rsplit(".", 1)[0] for k in keys})
    sd, got, misfit, folded = loader.sd, {}, [], 0
    for conv in convs:
        block = conv[: -len(".0")]
        w, b = sd.get(f"{conv}.weight"), sd.get(f"{conv}.bias")
        bn = f"{block}.1"
        if w is not None and b is None and f"{bn}.running_var" in sd:
            scale = sd[f"{bn}.weight"].double() / torch.sqrt(sd[f"{bn}.running_var"].double() + _BN_EPS)
            w = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype)
            b = (sd[f"{bn}.bias"].double() - sd[f"{bn}.running_mean"].double() * scale).to(w.dtype)
            used = [f"{conv}.weight"] + [f"{bn}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
            folded += 1
        else:
            used = [f"{conv}.weight", f"{conv}.bias"]
        if loader.fits(f"{conv}.weight", w) and loader.fits(f"{conv}.bias", b):
            got.update({f"{conv}.weight": w, f"{conv}.bias": b})
            loader.used.update(used)
        else:
            misfit.append(conv)
    loader.load.update(got)
    if folded:
        notes.append("FPN: the file's BatchNorms (fasterrcnn v2) are folded into our FPN convs (same eval output)")
    if not misfit:
        loader.add(GroupResult("FPN", "loaded", len(got), len(keys)))
    else:
        loader.add(GroupResult("FPN", "partial" if got else "fresh", len(got), len(keys),
                               f"{len(misfit)} convs missing from the file or of another shape (first: {misfit[0]})"))


def _anchor_rows(ours_sizes, ours_ratios, tv_sizes) -> tuple[Optional[list[int]], str]:
    """(for each of our anchors per location, the index of the equal torchvision anchor, or None; why not).

    Equal: same aspect ratio and the same size on every level; the head is shared by the levels, so the torchvision
    size index must be the same on all of them."""
    sizes = [tuple(int(v) for v in s) for s in ours_sizes]
    ratios = list(ours_ratios[0])
    per_level = len(tv_sizes[0])
    options = ["[" + ",".join(str(s[j]) for s in tv_sizes[: len(sizes)]) + "]" for j in range(per_level)]
    shown = "[" + ",".join(str(s[0]) if len(s) == 1 else str(list(s)) for s in sizes) + "]"
    why = f"our anchor sizes {shown} are not torchvision's ({' or '.join(options)}): model.anchor_sizes={options[0]} " \
          f"loads them"
    if len(sizes) > len(tv_sizes) or any(len(s) != 1 for s in sizes) or any(list(r) != ratios for r in ours_ratios):
        return None, why
    ratio_idx = []
    for r in ratios:
        hit = [i for i, t in enumerate(TV_RATIOS) if math.isclose(r, t, rel_tol=1e-6)]
        if not hit:
            return None, f"our aspect ratios {ratios} are not all among torchvision's {list(TV_RATIOS)}"
        ratio_idx.append(hit[0])
    for j in range(per_level):
        if all(s[0] == tv[j] for s, tv in zip(sizes, tv_sizes)):
            return [i * per_level + j for i in ratio_idx], ""
    return None, why


def _rows(t: Tensor, anchors: list[int], per_anchor: int) -> Tensor:
    """Output channels of the given anchors: channel a * per_anchor + c (torchvision's (A, C) channel layout)."""
    idx = torch.tensor([a * per_anchor + c for a in anchors for c in range(per_anchor)], dtype=torch.long)
    return t.index_select(0, idx)


def _anchor_convs(loader: _Loader, group: str, pairs: dict[str, str], needs: str, anchors, why_anchors: str,
                  per_anchor: dict[str, int], classes: Optional[tuple[int, int]] = None) -> None:
    """Output convs (our key -> the file's) whose channels are (anchor, per_anchor[key]) pairs: the rows of our
    anchors load when their input (group `needs`) loaded, the anchors are torchvision's and, for class logits
    (`classes` = (ours, the file's)), the class counts match; otherwise re-initialised / fresh, with the shapes."""
    shapes = [[k, list(loader.own[k].shape), list(loader.sd[fk].shape)] for k, fk in pairs.items() if fk in loader.sd]
    if any(fk not in loader.sd for fk in pairs.values()):
        missing = next(fk for fk in pairs.values() if fk not in loader.sd)
        loader.fresh(group, len(pairs), f"the file has no {missing}")
    elif not loader.loaded(needs):
        loader.fresh(group, len(pairs), f"its input, the {needs}, is not loaded")
    elif anchors is None:
        loader.fresh(group, len(pairs), why_anchors)
    elif classes is not None and classes[0] != classes[1]:
        loader.add(GroupResult(group, "re-initialised", 0, len(pairs),
                               f"{classes[0]} classes here, {classes[1]} in the file", shapes))
    else:
        tensors = {k: _rows(loader.sd[fk], anchors, per_anchor[k]) for k, fk in pairs.items()}
        if all(loader.fits(k, t) for k, t in tensors.items()):
            loader.take(group, tensors, pairs.values())
        else:
            loader.fresh(group, len(pairs), "the file's output channels do not split into its anchors", shapes)


# ------------------------------------------------------------------------------------------------ two-stage
def load_into_two_stage(model: nn.Module, path: str | Path, backbone: str) -> InitReport:
    """Load a torchvision Faster R-CNN file into an iouctl ``TwoStageDetector`` (in place); returns the report."""
    # v2: a 2-conv RPN head and a conv box head (FastRCNNConvFCHead)
    p, loader, notes, v2 = _start(model, path, backbone, "two_stage",
                                  ("rpn.head.conv.1.0.weight", "roi_heads.box_head.0.0.weight"))
    sd = loader.sd
    ours_depth, file_depth = _depth(loader.own, "rpn.head.conv."), _depth(loader.sd, "rpn.head.conv.")
    conv = {k: k for k in loader.ours("rpn.head.conv.")}
    if ours_depth != file_depth:
        loader.fresh("RPN conv", len(conv), f"the file's RPN head has {file_depth} convs (fasterrcnn v2), ours "
                                            f"{ours_depth}")
    else:
        loader.all_or_none("RPN conv", conv)
    gen = model.rpn.anchor_generator
    anchors, why = _anchor_rows(gen.sizes, gen.aspect_ratios, TV_RCNN_SIZES)
    outs = {k: k for k in loader.ours("rpn.head.cls_logits.") + loader.ours("rpn.head.bbox_pred.")}
    _anchor_convs(loader, "RPN outputs", outs, "RPN conv", anchors, why,
                  {k: 1 if ".cls_logits." in k else 4 for k in outs})

    mlp = {f"roi_heads.box_head.mlp.{n}": f"roi_heads.box_head.{n}"
           for n in ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias")}
    if "roi_heads.box_head.fc6.weight" not in sd and "roi_heads.box_head.0.0.weight" in sd:
        loader.fresh("box head", len(mlp), "the file's box head is conv+BatchNorm layers and an FC layer "
                                           "(fasterrcnn v2), ours 2 FC layers (fc6, fc7)")
    else:
        loader.all_or_none("box head", mlp)
        fc6 = loader.sd.get("roi_heads.box_head.fc6.weight")
        ours_fc6 = loader.own["roi_heads.box_head.mlp.fc6.weight"]
        if fc6 is not None and fc6.shape[1] != ours_fc6.shape[1]:
            side = math.isqrt(fc6.shape[1] // 256)
            loader.by_group["box head"].reason += f" (pooled features: the file's {side}x{side}, set pool.output_size)"
    pool = type(model.roi_heads.box_roi_pool.pools[0]).__name__
    if loader.loaded("box head") and pool != "RoIAlign":
        notes.append(f"box head: torchvision trained it on RoIAlign (sampling_ratio 2) features, ours come from "
                     f"{pool} (pool=roi_align is torchvision's)")

    pred = {f"roi_heads.box_head.predictor.{n}": f"roi_heads.box_predictor.{n}"
            for n in ("cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias")}
    file_cls = sd.get("roi_heads.box_predictor.cls_score.weight")
    ours_cls = loader.own["roi_heads.box_head.predictor.cls_score.weight"].shape[0] - 1
    shapes = [[k, list(loader.own[k].shape), list(sd[fk].shape)] for k, fk in pred.items() if fk in sd]
    if file_cls is None:
        loader.fresh("box predictor", len(pred), "the file has no roi_heads.box_predictor")
    elif not loader.loaded("box head"):
        loader.fresh("box predictor", len(pred), "its input, the box head, is not loaded")
    elif file_cls.shape[0] - 1 != ours_cls:
        loader.add(GroupResult("box predictor", "re-initialised", 0, len(pred),
                               f"{ours_cls} classes + background here, {file_cls.shape[0] - 1} + background in the "
                               f"file", shapes))
    else:
        loader.all_or_none("box predictor", pred)

    iou = loader.ours("roi_heads.iou_head.")
    if iou:
        loader.add(GroupResult("IoU head", "new", 0, len(iou)))
    _size_note(model.transform, notes)
    return _finish(loader, p, "torchvision fasterrcnn_resnet50_fpn" + ("_v2" if v2 else ""), notes, {
        "backbone.body.": "backbone body", "backbone.fpn.": "FPN", "rpn.head.conv.": "RPN conv",
        "rpn.head.cls_logits": "RPN outputs", "rpn.head.bbox_pred": "RPN outputs",
        "roi_heads.box_head.": "box head", "roi_heads.box_predictor.": "box predictor"})


# ------------------------------------------------------------------------------------------------ RetinaNet
def load_into_retinanet(model: nn.Module, path: str | Path, backbone: str) -> InitReport:
    """Load a torchvision RetinaNet file into an iouctl ``IoURetinaNet`` (in place); returns the report."""
    # v2: GroupNorm in the towers
    p, loader, notes, v2 = _start(model, path, backbone, "retina", ("head.classification_head.conv.0.1.weight",))
    sd = loader.sd
    extra = sorted({k.rsplit(".", 1)[0] for k in loader.ours("backbone.fpn.extra_blocks.convs.")})
    for i, conv in enumerate(extra):  # ours: convs.0 = P6 from P5, convs.1 = P7 from relu(P6), as LastLevelP6P7
        name, fk = f"FPN P{6 + i}", f"backbone.fpn.extra_blocks.p{6 + i}"
        pairs = {f"{conv}.weight": f"{fk}.weight", f"{conv}.bias": f"{fk}.bias"}
        w = sd.get(f"{fk}.weight")
        if i > 0 and not loader.loaded(f"FPN P{5 + i}"):
            loader.fresh(name, 2, f"its input, FPN P{5 + i}, is not loaded")
        elif w is not None and w.shape[1] != loader.own[f"{conv}.weight"].shape[1]:
            loader.fresh(name, 2, f"the file's P6 reads C5 ({w.shape[1]} channels, retinanet v2), ours reads P5")
        else:
            loader.all_or_none(name, pairs)

    for tower, head in (("classification tower", "classification_head"), ("regression tower", "regression_head")):
        prefix = f"head.{head}.conv."
        keys = {k: k for k in loader.ours(prefix)}
        ours_norm, file_norm = f"{prefix}0.1.weight" in loader.own, f"{prefix}0.1.weight" in sd
        groups = model.get_submodule(f"{prefix}0.1").num_groups if ours_norm else None
        if _depth(loader.own, prefix) != _depth(sd, prefix):
            loader.fresh(tower, len(keys), f"the file's tower has {_depth(sd, prefix)} convs, ours "
                                           f"{_depth(loader.own, prefix)}")
        elif file_norm and not ours_norm:
            loader.fresh(tower, len(keys), "the file's towers are conv + GroupNorm (retinanet v2), ours plain convs")
        elif ours_norm and not file_norm:
            loader.fresh(tower, len(keys), "the file's towers are plain convs (retinanet v1), ours conv + "
                                           "GroupNorm: model.head_norm=none loads them")
        elif ours_norm and groups != _TV_GROUPS:
            loader.fresh(tower, len(keys), f"the file's GroupNorms have {_TV_GROUPS} groups (retinanet v2), ours "
                                           f"{groups}")
        else:
            loader.all_or_none(tower, keys)

    gen = model.anchor_generator
    anchors, why = _anchor_rows(gen.sizes, gen.aspect_ratios, TV_RETINA_SIZES)
    reg = sd.get("head.regression_head.bbox_reg.weight")
    file_anchors = reg.shape[0] // 4 if reg is not None else len(TV_RETINA_SIZES[0]) * len(TV_RATIOS)
    file_cls = sd.get("head.classification_head.cls_logits.weight")
    file_classes = file_cls.shape[0] // file_anchors if file_cls is not None else 0
    cls = {k: k for k in loader.ours("head.classification_head.cls_logits.")}
    _anchor_convs(loader, "class logits", cls, "classification tower", anchors, why,
                  {k: file_classes for k in cls}, classes=(model.num_classes, file_classes))
    box = {k: k for k in loader.ours("head.regression_head.bbox_reg.")}
    _anchor_convs(loader, "box regression", box, "regression tower", anchors, why, {k: 4 for k in box})

    branch = model.head.branch_name  # the quality branch (iou_pred, centerness_pred): torchvision has none
    fresh = loader.ours(f"head.{branch}.") if branch is not None else []
    if fresh:
        loader.add(GroupResult({"iou": "IoU head", "centerness": "centre-ness head"}[model.head.quality], "new", 0,
                               len(fresh)))
    _size_note(model.transform, notes)
    if v2 and loader.loaded("regression tower"):
        notes.append("torchvision trained v2's box regression with a GIoU loss; ours is smooth-L1")
    return _finish(loader, p, "torchvision retinanet_resnet50_fpn" + ("_v2" if v2 else ""), notes, {
        "backbone.body.": "backbone body", "backbone.fpn.": "FPN", "backbone.fpn.extra_blocks.p6": "FPN P6",
        "backbone.fpn.extra_blocks.p7": "FPN P7", "head.classification_head.conv.": "classification tower",
        "head.regression_head.conv.": "regression tower", "head.classification_head.cls_logits": "class logits",
        "head.regression_head.bbox_reg": "box regression"})


def _size_note(transform: nn.Module, notes: list[str]) -> None:
    size = (transform.min_size[0], transform.max_size)
    if size != (800, 1333):
        notes.append(f"torchvision trained these weights on images resized to min_size 800, max_size 1333; ours "
                     f"are {size[0]}, {size[1]} (model.min_size, model.max_size)")


def _finish(loader: _Loader, path: Path, source: str, notes: list[str], file_groups: dict[str, str]) -> InitReport:
    grouped = sum(g.total for g in loader.groups)
    if grouped != len(loader.own):  # a group forgot some of our tensors: a bug, not a user error
        raise AssertionError(f"init_from groups cover {grouped} of the model's {len(loader.own)} tensors")
    loader.commit()
    return InitReport(str(path), source, loader.groups, loader.unused(file_groups), notes)
