"""COCO ground truth, parsed and checked once per file and cached (an ablation of 20 arms loads it once)."""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iouctl.data.coco import DatasetError, ValidationReport, validate_coco_dict
from iouctl.errors import IouctlError

_CACHE: OrderedDict[tuple, GroundTruth] = OrderedDict()
_CACHE_SIZE = 4  # a few splits at most are alive in one process; bounds memory for COCO-sized files


class GroundTruthError(IouctlError, ValueError):
    """A COCO ground-truth file (or detections against it) that cannot be evaluated; the message names the file
    and the rule. An IouctlError, so the CLI shows it as one line."""


class GroundTruth:
    """A validated COCO detection ground truth.

    Attributes:
        path (Path | None): the file it came from.
        dataset (dict): the parsed JSON (treat as read-only).
        image_ids (Tensor[I], int64): sorted image ids.
        category_ids (Tensor[K], int64): sorted category ids.
        keys (Tensor[G], int64): image_index * K + category_index of each non-crowd box, sorted ascending.
        boxes (Tensor[G, 4], float64): xyxy of the non-crowd boxes, in ``keys`` order.
    """

    def __init__(self, dataset: dict, path: str | os.PathLike | None = None, validated: bool = False):
        self.path = Path(path) if path is not None else None
        if not validated:  # the dataset validator of iouctl.data, strict: a bad entry cannot be scored
            try:
                dataset = validate_coco_dict(dataset, self.name).coco_dict()
            except DatasetError as e:
                raise GroundTruthError(str(e)) from None
        self.dataset = dataset
        self.image_ids = torch.tensor(sorted(img["id"] for img in dataset["images"]), dtype=torch.int64)
        self.category_ids = torch.tensor(sorted(c["id"] for c in dataset["categories"]), dtype=torch.int64)
        anns = [a for a in dataset["annotations"] if not a["iscrowd"]]
        img = torch.tensor([a["image_id"] for a in anns], dtype=torch.int64)
        cat = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        keys = self.key(img, cat)
        order = torch.sort(keys, stable=True).indices
        self.keys = keys[order]
        self.boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)[order]
        self._coco: dict[str, Any] = {}

    @classmethod
    def from_report(cls, report: ValidationReport) -> GroundTruth:
        """The ground truth of a validated (and, with skip_bad, cleaned) split: what trained is what is scored."""
        return cls(report.coco_dict(), report.ann_file, validated=True)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory ground truth>"

    def _fail(self, msg: str) -> None:
        raise GroundTruthError(f"{self.name}: {msg}")

    # ------------------------------------------------------------------ lookups
    def key(self, image_ids: Tensor, category_ids: Tensor) -> Tensor:
        """Dense int64 key image_index * K + category_index; ids must exist (see ``check_ids``)."""
        ii = torch.searchsorted(self.image_ids, image_ids)
        kk = torch.searchsorted(self.category_ids, category_ids)
        return ii * len(self.category_ids) + kk

    def check_ids(self, image_ids: Tensor, category_ids: Tensor, what: str) -> None:
        """Raise GroundTruthError naming a few image / category ids of ``what`` that this ground truth lacks."""
        for ids, known, kind in ((image_ids, self.image_ids, "image"), (category_ids, self.category_ids, "category")):
            ids = ids.cpu()
            bad = torch.unique(ids[~torch.isin(ids, known)])  # unique of the few bad ones only: sorting all is slow
            if bad.numel():
                self._fail(
                    f"{what} has {bad.numel()} {kind} id(s) absent from the ground truth, e.g. {bad[:5].tolist()}"
                    + (
                        "; labels must be the dataset's COCO category ids " + str(known.tolist()[:20])
                        if kind == "category"
                        else ""
                    )
                )

    def coco(self, backend: str) -> Any:
        """The backend's COCO object for this ground truth, built once (each backend gets its own copy,
        since both write flags such as 'ignore' into annotation dicts)."""
        if backend not in self._coco:
            import contextlib
            import io

            data = copy.deepcopy(self.dataset)
            # cocoeval stores matched annotation ids in its tables, where 0 means "unmatched": renumber from 1
            # (the ids are never reported, so third-party files with ids from 0 evaluate correctly)
            for k, a in enumerate(data["annotations"]):
                a["id"] = k + 1
            if backend == "pycocotools":
                from pycocotools.coco import COCO

                with contextlib.redirect_stdout(io.StringIO()):
                    c = COCO()
                    c.dataset = data
                    c.createIndex()
            elif backend == "faster-coco-eval":
                from faster_coco_eval import COCO

                c = COCO(data, print_function=_quiet)
            else:
                raise ValueError(f"unknown COCO backend '{backend}'; valid: {list(BACKENDS)}")
            self._coco[backend] = c
        return self._coco[backend]


BACKENDS = ("faster-coco-eval", "pycocotools")


def _quiet(*args: Any, **kwargs: Any) -> None:
    return None




def load_gt(gt: str | os.PathLike | GroundTruth) -> GroundTruth:
    """The GroundTruth of a COCO json path, parsed once per (path, mtime, size) and kept in a small LRU cache."""
    if isinstance(gt, GroundTruth):
        return gt
    if not isinstance(gt, (str, os.PathLike)):
        raise GroundTruthError(f"ground truth must be a COCO json path or a GroundTruth, got {type(gt).__name__}")
    p = Path(gt)
    try:
        st = p.stat()
    except OSError:
        raise GroundTruthError(f"{p}: ground-truth file not found") from None
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GroundTruthError(f"{p}: not valid JSON ({e})") from None
    out = GroundTruth(data, p)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def clear_gt_cache() -> None:
    _CACHE.clear()
