"""Raw (pre-NMS) detections of one split: the on-disk format shared by eval, nms-ablate and refine.

One ``.npz`` file (numpy's zip of ``.npy`` arrays) loaded with ``allow_pickle=False``: no code runs on load.
Keys (see docs/detections.md):

    header     0-d unicode str   JSON: {"format": "iouctl-detections", "version": 1, "meta": {...}}
    image_ids  int64   [N]       COCO image id
    boxes      float32 [N, 4]    x1, y1, x2, y2 in absolute pixels of the original image
    labels     int64   [N]       COCO category id of the dataset (not a contiguous class index)
    scores     float32 [N]       classification score
    ious       float32 [N]       predicted IoU; the key is absent when the model has no IoU head
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iouctl.errors import IouctlError
from iouctl.fileio import atomic_write_json, atomic_write_with

FORMAT_NAME = "iouctl-detections"
FORMAT_VERSION = 1

_INT_KEYS = ("image_ids", "labels")
_REQUIRED = ("header", "image_ids", "boxes", "labels", "scores")
_OPTIONAL = ("ious",)
_UNIT = {"scores": "classification probabilities", "ious": "predicted IoUs"}  # keys whose values lie in [0, 1]


class DetectionsFormatError(IouctlError, ValueError):
    """A detections file or in-memory Detections that breaks the format; the message names the file and the rule.
    An IouctlError, so the CLI shows it as one line."""


DEFAULT_CLS_WEIGHT = 0.5  # IoU-aware RetinaNet's official a, for detections that do not record theirs

def _where(source: str | None) -> str:
    return f"{source}: " if source else "Detections: "


def _check_array(name: str, value: Any, n: int | None, source: str | None) -> Tensor:
    """Convert to a tensor of the canonical dtype after checking kind and shape; returns int64 or float32."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in ("iu" if name in _INT_KEYS else "f"):
            raise DetectionsFormatError(
                f"{_where(source)}'{name}' has dtype {value.dtype}; expected "
                f"{'an integer' if name in _INT_KEYS else 'a floating'} dtype"
            )
        if value.dtype.kind == "u" and value.size and int(value.max()) > np.iinfo(np.int64).max:
            raise DetectionsFormatError(f"{_where(source)}'{name}' has values above the int64 range")
        # Cast in numpy first: handles byte order and dtypes torch lacks (uint32/uint64).
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf and fails the finite check below
            value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64 if name in _INT_KEYS else np.float32))
    if not isinstance(value, Tensor):
        raise DetectionsFormatError(
            f"{_where(source)}'{name}' must be a torch.Tensor or numpy array, got {type(value).__name__}"
        )
    want_int = name in _INT_KEYS
    if want_int and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise DetectionsFormatError(
            f"{_where(source)}'{name}' has dtype {value.dtype}; expected an integer dtype (stored as int64)"
        )
    if not want_int and not value.dtype.is_floating_point:
        raise DetectionsFormatError(
            f"{_where(source)}'{name}' has dtype {value.dtype}; expected a floating dtype (stored as float32)"
        )
    want_shape = "[N, 4]" if name == "boxes" else "[N]"
    ok = value.dim() == 2 and value.shape[1] == 4 if name == "boxes" else value.dim() == 1
    if not ok or (n is not None and value.shape[0] != n):
        got = list(value.shape)
        raise DetectionsFormatError(
            f"{_where(source)}'{name}' has shape {got}; expected {want_shape}"
            + (f" with N={n} (the length of image_ids)" if n is not None else "")
        )
    value = value.to(torch.int64 if want_int else torch.float32)
    if not want_int and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).reshape(value.shape[0], -1).any(1).nonzero()[0, 0])
        raise DetectionsFormatError(
            f"{_where(source)}'{name}' has a non-finite value (first at detection {bad}); "
            "all values must be finite in float32"
        )
    return value


def rank_per_image(image_ids: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Rows sorted by (image ascending, score descending, row ascending) and each row's rank inside its image.

    Returns: (order Tensor[N] int64, rank Tensor[N] int64), rank[i] the rank of row order[i]; rank < k picks the k best
    rows of every image.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(image_ids[order], stable=True).indices]
    ids = image_ids[order]
    start = torch.ones_like(ids, dtype=torch.bool)
    start[1:] = ids[1:] != ids[:-1]
    pos = torch.arange(len(ids), device=ids.device)
    return order, pos - torch.cummax(torch.where(start, pos, 0), 0).values


def _check_declared_sizes(path: Path, source: str) -> None:
    """Refuse an array whose .npy header declares more data than its zip member holds, before numpy allocates it
    (a few edited header bytes can declare terabytes). Unreadable members are left for np.load to report."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        continue
                    shape, _, dtype = read_header(f)
                    held = info.file_size - f.tell()
                if dtype.hasobject:
                    continue  # refused by allow_pickle=False
                declared = math.prod(shape) * dtype.itemsize
                if declared > held:
                    raise DetectionsFormatError(
                        f"{source}: '{info.filename[:-4]}' declares shape {list(shape)} {dtype} ({declared:,} bytes) "
                        f"but holds {max(held, 0):,} bytes; the file is corrupt or truncated"
                    )
    except DetectionsFormatError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return


@dataclass
class Detections:
    """Detections of one split, a flat table of N rows.

    Attributes:
        image_ids (Tensor[N], int64): COCO image id of each detection.
        boxes (Tensor[N, 4], float32): x1, y1, x2, y2 in absolute pixels (x2 >= x1, y2 >= y1).
        labels (Tensor[N], int64): COCO category id (the dataset's ids, not 0..C-1).
        scores (Tensor[N], float32): classification score.
        ious (Tensor[N], float32 or None): predicted IoU; None when the model has no IoU head.
        meta (dict): JSON-serialisable provenance, e.g. {"model": ..., "dataset": ..., "split": ...}; "cls_weight":
            the model's a in its fused score cls^a * IoU^(1-a) (0.5, the paper's, where absent).

    Integer/float arrays of other widths (and numpy arrays) are accepted and cast to the canonical dtypes.
    """

    image_ids: Tensor
    boxes: Tensor
    labels: Tensor
    scores: Tensor
    ious: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate(None)

    def _validate(self, source: str | None) -> None:
        self.image_ids = _check_array("image_ids", self.image_ids, None, source)
        n = self.image_ids.shape[0]
        self.boxes = _check_array("boxes", self.boxes, n, source)
        self.labels = _check_array("labels", self.labels, n, source)
        self.scores = _check_array("scores", self.scores, n, source)
        if self.ious is not None:
            self.ious = _check_array("ious", self.ious, n, source)
        for name, what in _UNIT.items():
            value = getattr(self, name)
            outside = (value < 0) | (value > 1) if value is not None else None
            if outside is not None and bool(outside.any()):
                first = int(outside.nonzero()[0, 0])
                raise DetectionsFormatError(
                    f"{_where(source)}'{name}' has {int(outside.sum())} values outside [0, 1] (first at detection "
                    f"{first}: {value[first].item():g}); {name} are {what}, in [0, 1]"
                )
        devices = {t.device for t in (self.image_ids, self.boxes, self.labels, self.scores, self.ious) if t is not None}
        if len(devices) > 1:
            raise DetectionsFormatError(
                f"{_where(source)}all arrays must be on one device, got {sorted(map(str, devices))}"
            )
        if n:
            inverted = (self.boxes[:, 2] < self.boxes[:, 0]) | (self.boxes[:, 3] < self.boxes[:, 1])
            if bool(inverted.any()):
                first = int(inverted.nonzero()[0, 0])
                raise DetectionsFormatError(
                    f"{_where(source)}{int(inverted.sum())} boxes have x2 < x1 or y2 < y1 (first at detection {first}: "
                    f"{self.boxes[first].tolist()}); boxes must be xyxy"
                )
        if not isinstance(self.meta, dict):
            raise DetectionsFormatError(f"{_where(source)}'meta' must be a dict, got {type(self.meta).__name__}")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def has_ious(self) -> bool:
        return self.ious is not None

    @property
    def cls_weight(self) -> float:
        """a in the fused score cls^a * IoU^(1-a) of the model that made these detections (meta["cls_weight"])."""
        a = self.meta.get("cls_weight", DEFAULT_CLS_WEIGHT)
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise DetectionsFormatError(f"meta cls_weight={a!r} is not a number in [0, 1]")
        return float(a)

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    def to(self, device: str | torch.device) -> Detections:
        return Detections(
            self.image_ids.to(device),
            self.boxes.to(device),
            self.labels.to(device),
            self.scores.to(device),
            None if self.ious is None else self.ious.to(device),
            dict(self.meta),
        )

    def select(self, index: Tensor | np.ndarray | slice | list[int]) -> Detections:
        """Rows picked by a bool mask (Tensor[N]), an int64 index (Tensor[K], any order, repeats allowed) or a slice."""
        if isinstance(index, (list, np.ndarray)):
            index = torch.as_tensor(index) if len(index) else torch.zeros(0, dtype=torch.int64)
        if isinstance(index, Tensor):
            if index.dtype == torch.bool:
                if index.shape != (len(self),):
                    raise ValueError(f"select: bool mask has shape {list(index.shape)}; expected [{len(self)}]")
            elif index.dtype.is_floating_point or index.dim() != 1:
                raise ValueError(
                    "select: index must be a bool mask [N] or a 1-d integer tensor, "
                    f"got {index.dtype} {list(index.shape)}"
                )
            else:
                index = index.to(torch.int64)
                if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
                    raise ValueError(f"select: index out of range for {len(self)} detections")
            index = index.to(self.device)
        elif not isinstance(index, slice):
            raise ValueError(
                f"select: expected a bool mask, an integer index tensor or a slice, got {type(index).__name__}"
            )
        return Detections(
            self.image_ids[index],
            self.boxes[index],
            self.labels[index],
            self.scores[index],
            None if self.ious is None else self.ious[index],
            dict(self.meta),
        )

    @staticmethod
    def concat(parts: list[Detections], meta: dict | None = None) -> Detections:
        """Stack rows of several Detections (e.g. per-batch outputs); meta is ``meta`` or the first part's."""
        parts = list(parts)
        if not parts:
            raise ValueError("Detections.concat: got an empty list; pass at least one Detections (it may have 0 rows)")
        with_ious = {p.ious is not None for p in parts}
        if len(with_ious) > 1:
            raise ValueError("Detections.concat: some parts have predicted IoUs and some do not; all or none must")
        return Detections(
            torch.cat([p.image_ids for p in parts]),
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.scores for p in parts]),
            torch.cat([p.ious for p in parts]) if with_ious == {True} else None,
            dict(parts[0].meta if meta is None else meta),
        )

    @staticmethod
    def empty(with_ious: bool = False, meta: dict | None = None) -> Detections:
        return Detections(
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0),
            torch.zeros(0) if with_ious else None,
            dict(meta or {}),
        )

    # ------------------------------------------------------------------ grouping
    def image_index(self) -> dict[int, Tensor]:
        """{image_id: Tensor[K] int64 row indices}, rows of each image in their original order, images ascending."""
        if len(self) == 0:
            return {}
        order = torch.sort(self.image_ids, stable=True).indices
        ids, counts = torch.unique_consecutive(self.image_ids[order], return_counts=True)
        return dict(zip(ids.tolist(), torch.split(order, counts.tolist())))

    def by_image(self) -> dict[int, Detections]:
        """{image_id: Detections of that image}; see image_index for the order."""
        return {i: self.select(idx) for i, idx in self.image_index().items()}

    def top_k_per_image(self, k: int, scores: Tensor | None = None) -> Detections:
        """Keep the k highest-scoring rows of each image (``scores`` Tensor[N] overrides ``self.scores``), as a
        detector's final ``detections_per_img`` does; ties keep the earlier row. Row order is preserved."""
        if k < 0:
            raise ValueError(f"top_k_per_image: k must be >= 0, got {k}")
        s = self._score_arg(scores, "top_k_per_image")
        if len(self) == 0:
            return self.select(slice(None))
        order, rank = rank_per_image(self.image_ids, s)
        keep = torch.zeros(len(self), dtype=torch.bool, device=s.device)
        keep[order[rank < k]] = True
        return self.select(keep)

    # ------------------------------------------------------------------ COCO results
    def _score_arg(self, scores: Tensor | None, what: str) -> Tensor:
        if scores is None:
            return self.scores
        if not isinstance(scores, Tensor):
            scores = torch.as_tensor(scores)
        if scores.shape != (len(self),) or not scores.dtype.is_floating_point:
            raise ValueError(
                f"{what}: scores must be a float Tensor[{len(self)}], got {scores.dtype} {list(scores.shape)}"
            )
        if scores.numel() and not bool(torch.isfinite(scores).all()):
            raise ValueError(f"{what}: scores must be finite")
        return scores.to(self.device)

    def to_coco_results(self, scores: Tensor | None = None) -> list[dict]:
        """COCO results list: one {"image_id", "category_id", "bbox": [x, y, w, h], "score"} per row.

        ``scores`` (Tensor[N]) replaces the classification score, e.g. a fused p^a * IoU^(1-a).
        Widths/heights are computed in float64 from the float32 corners, so no extra rounding is added.
        """
        s = self._score_arg(scores, "to_coco_results").detach().cpu().to(torch.float64).numpy()
        xywh = self.boxes.detach().cpu().numpy().astype(np.float64)  # a copy: safe to edit in place
        xywh[:, 2:] -= xywh[:, :2]
        return [
            {"image_id": i, "category_id": c, "bbox": bb, "score": sc}
            for i, c, bb, sc in zip(
                self.image_ids.cpu().tolist(), self.labels.cpu().tolist(), xywh.tolist(), s.tolist()
            )
        ]

    def export_coco_json(self, path: str | os.PathLike, scores: Tensor | None = None) -> Path:
        """Write ``to_coco_results(scores)`` as a COCO results JSON file (atomically); returns the path."""
        return atomic_write_json(path, self.to_coco_results(scores), indent=None)

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.npz`` file atomically (temp file + rename); returns the path."""
        try:
            header = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "meta": self.meta}, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise DetectionsFormatError(f"Detections.save({path}): meta is not JSON-serialisable ({e})") from None
        arrays = {
            "header": np.array(header),
            "image_ids": self.image_ids.detach().cpu().numpy(),
            "boxes": self.boxes.detach().cpu().numpy(),
            "labels": self.labels.detach().cpu().numpy(),
            "scores": self.scores.detach().cpu().numpy(),
        }
        if self.ious is not None:
            arrays["ious"] = self.ious.detach().cpu().numpy()
        # np.savez on an open file writes exactly there (no ".npz" appended).
        # Uncompressed: float noise barely compresses, and loading stays fast.
        return atomic_write_with(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detections:
        """Read and validate a file written by ``save`` (or by hand, see docs/detections.md). CPU tensors."""
        src = str(path)
        p = Path(path)
        if not p.is_file():
            raise DetectionsFormatError(f"{src}: no such detections file")
        if not zipfile.is_zipfile(p):
            with open(p, "rb") as f:
                single = f.read(6) == b"\x93NUMPY"
            raise DetectionsFormatError(f"{src}: holds a single .npy array, not a detections .npz archive" if single
                                        else f"{src}: not a detections .npz file (expected a zip of .npy arrays, see "
                                             f"docs/detections.md)")
        _check_declared_sizes(p, src)
        try:
            z = np.load(p, allow_pickle=False)
            with z:
                keys = set(z.files)
                missing = [k for k in _REQUIRED if k not in keys]
                unknown = sorted(keys - set(_REQUIRED) - set(_OPTIONAL))
                if missing or unknown:
                    raise DetectionsFormatError(
                        f"{src}: "
                        + (f"missing keys {missing}" if missing else "")
                        + ("; " if missing and unknown else "")
                        + (f"unknown keys {unknown}" if unknown else "")
                        + f"; valid keys are {list(_REQUIRED + _OPTIONAL)} (ious optional)"
                    )
                arrays = {k: z[k] for k in keys}
        except DetectionsFormatError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            # allow_pickle=False turns object arrays into a ValueError: nothing executes.
            raise DetectionsFormatError(f"{src}: not a readable detections .npz without pickles ({e})") from None
        header = arrays.pop("header")
        if header.shape != () or header.dtype.kind != "U":
            raise DetectionsFormatError(
                f"{src}: 'header' must be a 0-d unicode string holding JSON, got {header.dtype} {list(header.shape)}"
            )
        try:
            head = json.loads(str(header))
        except json.JSONDecodeError as e:
            raise DetectionsFormatError(f"{src}: 'header' is not valid JSON ({e})") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT_NAME:
            raise DetectionsFormatError(f"{src}: header 'format' must be '{FORMAT_NAME}'")
        if head.get("version") != FORMAT_VERSION:
            raise DetectionsFormatError(
                f"{src}: format version {head.get('version')!r} is not supported; "
                f"this iouctl reads version {FORMAT_VERSION}"
            )
        meta = head.get("meta", {})
        if not isinstance(meta, dict):
            raise DetectionsFormatError(f"{src}: header 'meta' must be a JSON object")
        out = cls.__new__(cls)
        out.image_ids, out.boxes, out.labels, out.scores = (
            arrays[k] for k in ("image_ids", "boxes", "labels", "scores")
        )
        out.ious = arrays.get("ious")
        out.meta = meta
        out._validate(src)
        return out

    def __repr__(self) -> str:
        return (
            f"Detections(n={len(self)}, images={int(self.image_ids.unique().numel()) if len(self) else 0}, "
            f"ious={'yes' if self.has_ious else 'no'}, meta={self.meta})"
        )
