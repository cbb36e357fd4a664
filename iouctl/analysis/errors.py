"""Where the AP goes: TIDE's error breakdown of final (post-NMS) detections, vectorised with numpy.

Definitions of Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors" (ECCV 2020), as its
reference code (tidecv 1.0.1, ``quantify.py``) applies them. With the foreground threshold t_f (0.5 or 0.75) and the
background threshold t_b = 0.1, detections of an image sorted by score (the best ``max_dets`` of the image kept) are
matched to ground truth greedily, COCO-style (same class, unused, best IoU, IoU >= t_f). Each unmatched detection
gets the first error type whose test it passes, in this order:

- ``loc``: best IoU with a ground truth of its class (used or not) in [t_b, t_f];
- ``cls``: IoU >= t_f with a ground truth of another class;
- ``dupe``: IoU >= t_f with a ground truth of its class that a better-scored detection already matched;
- ``bkg``: IoU <= t_b with every ground truth (or none in the image);
- ``both``: anything else (wrong class and poor box);
- ``miss``: a ground truth left unmatched that no ``loc``/``cls`` error could claim.

The dAP of a type is the AP at t_f after fixing every error of that type alone (from the original, not
progressively): a ``loc``/``cls`` error becomes a true positive (``cls``: of the ground truth's class) when it is
the best-scored ``loc``/``cls`` error aimed at that unmatched ground truth, and is removed otherwise; ``dupe``,
``bkg`` and ``both`` errors are removed; fixing ``miss`` removes the missed ground truths. The two special dAPs:
``fp`` (every false positive removed) and ``fn`` (every unmatched ground truth removed).

AP is cocoeval's (101 recall points, a class counts when it has ground truth; detections matching a crowd region
are ignored, as in cocoeval), so ``ap`` at 0.5 / 0.75 equals ``evaluate(...)["AP50"/"AP75"]`` for detections with at
most ``max_dets`` per image. Differences from tidecv, all in corner cases: tidecv averages in, as AP 0, classes that
have detections but no ground truth; it gives crowd-matched (ignored) detections an error type too; and it skips
images that hold no annotation unless they are registered with ``Data.add_image``.
"""

from __future__ import annotations

import copy
import math
import os
import weakref
from dataclasses import dataclass, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iouctl.analysis.groundtruth import GroundTruth, load_gt
from iouctl.data.detections import Detections
from iouctl.ops.boxes import paired_box_iou_np

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")  # TIDE's order and short names
SPECIAL_TYPES = ("fp", "fn")
# cocoeval's recall points, built as it builds them (a hand-made arange would drift).
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)

_CROWD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def crowd_regions(g: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """(keys Tensor[C] sorted, boxes [C, 4] xyxy float64) of the crowd regions, built once per GroundTruth."""
    if g not in _CROWD:
        anns = [a for a in g.dataset["annotations"] if a["iscrowd"]]
        if anns:
            img = torch.tensor([a["image_id"] for a in anns], dtype=torch.int64)
            cat = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
            keys = g.key(img, cat).numpy()
            xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            order = np.argsort(keys, kind="stable")
            _CROWD[g] = (keys[order], boxes[order])
        else:
            _CROWD[g] = (np.zeros(0, np.int64), np.zeros((0, 4)))
    return _CROWD[g]


def to_jsonable(obj: Any) -> Any:
    """Plain Python containers and numbers: numpy scalars/arrays to Python, nan and inf to None (JSON has neither)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(vars(obj))
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + counts[i]) over i, without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(counts) - counts
    return np.repeat(starts - first, counts) + np.arange(total)


def _segmax(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max of values[starts[i] : starts[i] + counts[i]] and the absolute index of its first occurrence
    (np.argmax's tie rule); -1 and -1 for empty segments."""
    n = len(starts)
    mx, arg = np.full(n, -1.0), np.full(n, -1, np.int64)
    nz = np.flatnonzero(counts > 0)
    if len(nz):
        c = counts[nz]
        pos = _ranges(starts[nz], c)
        v = values[pos]
        seg = np.cumsum(c) - c
        m = np.maximum.reduceat(v, seg)
        local = np.where(v == np.repeat(m, c), np.arange(len(v)), len(v))
        mx[nz], arg[nz] = m, pos[np.minimum.reduceat(local, seg)]
    return mx, arg


def _index_of(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in ``sorted_ids``; -1 where absent."""
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, np.int64)
    i = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return np.where(sorted_ids[i] == ids, i, -1)


def _rank_within(group: np.ndarray, *order: np.ndarray) -> np.ndarray:
    """Rank of each element inside its group, by the keys ``order`` (first key most significant), ties by position."""
    n = len(group)
    rank = np.zeros(n, np.int64)
    if n:
        o = _stable_order(group, *order)
        g = group[o]
        start = np.r_[True, g[1:] != g[:-1]]
        first = np.flatnonzero(start)
        rank[o] = np.arange(n) - first[np.cumsum(start) - 1]
    return rank


def _stable_order(*keys: np.ndarray) -> np.ndarray:
    """np.lexsort of ``keys`` given most significant first, ties by position: one stable argsort per key, least
    significant first (the same permutation, several times faster than lexsort on large arrays)."""
    o = np.argsort(keys[-1], kind="stable")
    for k in reversed(keys[:-1]):
        o = o[np.argsort(k[o], kind="stable")]
    return o


class _Frame:
    """Detections of one evaluation with every ground truth of their image: built once, matched at any number of
    IoU thresholds, and re-ranked by another score (``rescore``) without recomputing the geometry.

    Detections are laid out by (image, row), independent of the score; non-crowd ground truths are ``g.keys`` order
    (image, then class), so the ground truths of a detection's image, and within them those of its class, are
    contiguous ranges; pairs (detection, ground truth of its image) are laid out detection by detection.
    """

    def __init__(self, g: GroundTruth, dets: Detections, scores: Tensor | None, max_dets: int, per_image: bool):
        if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
            raise ValueError(f"max_dets must be an integer >= 1, got {max_dets!r}")
        self.g, self.max_dets, self.per_image = g, max_dets, per_image
        s = dets._score_arg(scores, "analysis").detach().cpu().double().numpy()
        self.K = len(g.category_ids)
        self.category_ids = g.category_ids.numpy()
        gkeys = g.keys.numpy()
        self.gcls = gkeys % self.K
        gimg = gkeys // self.K
        self.gbox = g.boxes.numpy()
        self.n_gt = np.bincount(self.gcls, minlength=self.K)
        n = len(dets)
        img = _index_of(g.image_ids.numpy(), dets.image_ids.cpu().numpy())
        cls = _index_of(self.category_ids, dets.labels.cpu().numpy())
        if n and ((img < 0).any() or (cls < 0).any()):
            g.check_ids(dets.image_ids, dets.labels, "detections")  # raises, naming the unknown ids
        self._all_img, self._all_cls, self.n_input = img, cls, n
        kept = self._cap(s)
        order = np.flatnonzero(kept)
        order = order[np.argsort(img[order], kind="stable")]  # (image, row)
        self.rows = order
        self.img, self.cls = img[order], cls[order]
        self.box = dets.boxes.detach().cpu().double().numpy()[order].reshape(-1, 4)
        n = self.n = len(order)
        key = self.img * self.K + self.cls
        # Pairs with the ground truths of the image; the class's are a sub-range.
        lo_i, hi_i = np.searchsorted(gimg, self.img, "left"), np.searchsorted(gimg, self.img, "right")
        lo_c, hi_c = np.searchsorted(gkeys, key, "left"), np.searchsorted(gkeys, key, "right")
        self.p_cnt = hi_i - lo_i
        self.p_start = np.cumsum(self.p_cnt) - self.p_cnt
        self.c_start, self.c_cnt = self.p_start + (lo_c - lo_i), hi_c - lo_c
        self.p_det = np.repeat(np.arange(n), self.p_cnt)
        self.p_gt = _ranges(lo_i, self.p_cnt)
        self.p_iou = paired_box_iou_np(self.box[self.p_det], self.gbox[self.p_gt])
        self.p_same = self.gcls[self.p_gt] == self.cls[self.p_det]
        # Crowd regions of the detection's image and class: cocoeval's crowd IoU = intersection / detection area.
        ckeys, cbox = crowd_regions(g)
        clo, chi = np.searchsorted(ckeys, key, "left"), np.searchsorted(ckeys, key, "right")
        cdet = np.repeat(np.arange(n), chi - clo)
        crowd_iou = paired_box_iou_np(self.box[cdet], cbox[_ranges(clo, chi - clo)], crowd=True)
        self.crowd_max = np.full(n, -1.0)
        np.maximum.at(self.crowd_max, cdet, crowd_iou)
        self._rank(s[order])

    def _cap(self, s: np.ndarray) -> np.ndarray:
        """The best max_dets of each image (TIDE) or of each image and class (cocoeval), ties to the earlier row."""
        group = self._all_img if self.per_image else self._all_img * self.K + self._all_cls
        return _rank_within(group, -s) < self.max_dets

    def _rank(self, score: np.ndarray) -> None:
        """The score-dependent part: the matching order and the AP order."""
        self.score = score
        # Matching order inside each (image, class): score descending, then row (cocoeval's and tidecv's stable
        # sorts).
        self.rank = _rank_within(self.img * self.K + self.cls, -score)
        # AP order: score descending, then image, then row (cocoeval's mergesort over per-image lists).
        self.ap_order = np.argsort(-score, kind="stable")
        self._matches: dict[float, Matches] = {}

    def rescore(self, dets: Detections, scores: Tensor | None, per_image: bool | None = None) -> _Frame:
        """The same detections ranked by ``scores`` (Tensor[N] of the input rows): geometry shared when the
        ``max_dets`` cap keeps the same rows, else a new frame."""
        per_image = self.per_image if per_image is None else per_image
        s = dets._score_arg(scores, "analysis").detach().cpu().double().numpy()
        if len(dets) != self.n_input:
            raise ValueError(f"rescore: got {len(dets)} detections, the frame holds {self.n_input}")
        out = copy.copy(self)
        out.per_image = per_image
        kept = out._cap(s)
        if int(kept.sum()) != self.n or not kept[self.rows].all():
            return _Frame(self.g, dets, scores, self.max_dets, per_image)
        out._rank(s[self.rows])
        return out

    def match(self, iou_threshold: float) -> Matches:
        """cocoeval's matching at one IoU threshold (cached; ``match_all`` does several in one pass)."""
        if iou_threshold not in self._matches:
            self.match_all([iou_threshold])
        return self._matches[iou_threshold]

    def match_all(self, iou_thresholds: Any) -> None:
        """Match at every threshold not matched yet, in one call of the coco_match kernel (kernels/coco_eval):
        per (image, class), detections in rank order take the unused ground truth of best IoU >= t, ties to the later
        ground truth (cocoeval's ``>=``); an unmatched detection on a crowd region of its class is ignored."""
        ts = [float(t) for t in iou_thresholds if float(t) not in self._matches]
        if not ts:
            return
        from iouctl.ops import coco_eval

        if not coco_eval.available():  # the kernels did not build (warned once): the same matching in numpy
            for t in ts:
                self._matches[t] = self._match_reference(t)
            return
        n, G = self.n, len(self.gcls)
        # pairs with the ground truths of the detection's class, detections grouped by (image, class) in rank order
        order = _stable_order(self.img * self.K + self.cls, self.rank)
        key = (self.img * self.K + self.cls)[order]
        pos = _ranges(self.c_start[order], self.c_cnt[order])
        group_offsets = np.r_[np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if n else np.zeros(0, np.int64), n]
        pair_offsets = np.r_[0, np.cumsum(self.c_cnt[order])]
        # no area ranges, crowd regions apart (crowd_max): nothing ignored inside the kernel
        match, _ = coco_eval.coco_match(self.p_iou[pos], self.p_gt[pos], pair_offsets, group_offsets,
                                        np.zeros((1, G), bool), np.zeros(G, bool), np.zeros((1, n), bool),
                                        np.asarray(ts))
        for j, t in enumerate(ts):
            m = np.full(n, -1, np.int64)
            m[order] = match[0, j]
            tp = m >= 0
            gt_of, iou_of = np.full(n, -1, np.int64), np.zeros(n)
            gt_of[tp], iou_of[tp] = self.p_gt[pos[m[tp]]], self.p_iou[pos[m[tp]]]
            used = np.zeros(G, bool)
            used[gt_of[tp]] = True
            ignored = ~tp & (self.crowd_max >= min(t, 1 - 1e-10))  # cocoeval's rule: a threshold of 1 matches 1 - 1e-10
            self._matches[t] = Matches(t, tp, ignored, gt_of, iou_of, used)

    def _match_reference(self, iou_threshold: float) -> Matches:
        """``match`` in numpy, the kernel's reference: round r matches the r-th detection of every (image, class) at
        once (the rounds of one group are sequential, a ground truth is used once; groups never share one)."""
        t = min(iou_threshold, 1 - 1e-10)
        n = self.n
        tp, gt_of, iou_of = np.zeros(n, bool), np.full(n, -1, np.int64), np.zeros(n)
        used = np.zeros(len(self.gcls), bool)
        by_rank = np.argsort(self.rank, kind="stable")
        rounds = np.split(by_rank, np.cumsum(np.bincount(self.rank))[:-1]) if n else []
        for act in rounds:
            act = act[self.c_cnt[act] > 0]
            if not len(act):
                continue
            pos = _ranges(self.c_start[act], self.c_cnt[act])
            v = np.where(used[self.p_gt[pos]], -1.0, self.p_iou[pos])
            seg = np.cumsum(self.c_cnt[act]) - self.c_cnt[act]
            mx = np.maximum.reduceat(v, seg)
            # the last ground truth of the best IoU (cocoeval's `>=`)
            local = np.where(v == np.repeat(mx, self.c_cnt[act]), np.arange(len(v)), -1)
            best = pos[np.maximum.reduceat(local, seg)]
            hit = mx >= t
            d, gi = act[hit], self.p_gt[best[hit]]
            tp[d], gt_of[d], iou_of[d] = True, gi, mx[hit]
            used[gi] = True
        ignored = ~tp & (self.crowd_max >= t)
        return Matches(iou_threshold, tp, ignored, gt_of, iou_of, used)

    def ap(self, keep: np.ndarray, tp: np.ndarray, cls: np.ndarray, n_gt: np.ndarray) -> tuple[float, np.ndarray]:
        """cocoeval's AP of the detections ``keep`` with flags ``tp`` and classes ``cls`` (all [n]) against ``n_gt``
        ground truths per class. A class counts when it has ground truth in the split and, after a fix, still has
        ground truth or detections (tidecv's rule: AP 0 for a class whose ground truth was all removed).
        Returns (mean AP, per-class AP [K], nan where the class does not count)."""
        idx = self.ap_order[keep[self.ap_order]]
        c, t = cls[idx], tp[idx]
        o = np.argsort(c.astype(np.int16 if self.K < 2**15 else np.int64), kind="stable")  # 16 bits: radix sort
        c, t = c[o], t[o]
        counts = np.bincount(c, minlength=self.K)
        ends = np.cumsum(counts)
        tps_all = np.cumsum(t, dtype=np.float64)
        per_class = np.full(self.K, np.nan)
        for k in np.flatnonzero((self.n_gt > 0) & ((n_gt > 0) | (counts > 0))):
            nd = counts[k]
            if n_gt[k] == 0 or nd == 0:
                per_class[k] = 0.0
                continue
            lo = ends[k] - nd
            tps = tps_all[lo : ends[k]] - (tps_all[lo - 1] if lo else 0.0)  # exact: integer-valued floats
            rc = tps / n_gt[k]
            pr = tps / ((np.arange(1, nd + 1) - tps) + tps + np.spacing(1))  # cocoeval: tp / (fp + tp + eps)
            pr = np.maximum.accumulate(pr[::-1])[::-1]
            inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
            inds = inds[inds < nd]  # recall levels never reached count as precision 0
            per_class[k] = float(pr[inds].sum() / len(RECALL_THRESHOLDS))
        valid = per_class[~np.isnan(per_class)]
        return (float(valid.mean()) if len(valid) else -1.0), per_class


@dataclass
class Matches:
    """cocoeval-style matching of a _Frame's detections at one IoU threshold (arrays in the frame's order)."""

    iou_threshold: float
    tp: np.ndarray       # bool [n]
    ignored: np.ndarray  # bool [n]: unmatched, but on a crowd region of its class
    gt: np.ndarray       # int64 [n]: index of the matched ground truth, -1 if none
    iou: np.ndarray      # float64 [n]: IoU with the matched ground truth, 0 if none
    gt_used: np.ndarray  # bool [G]: matched ground truths


@dataclass
class ErrorBreakdown:
    """TIDE's breakdown at one foreground threshold. AP values are fractions in [0, 1]; dAP = fixed - original."""

    iou_threshold: float
    background_threshold: float
    ap: float                     # AP at iou_threshold (cocoeval's; -1 when no class has ground truth)
    dap: dict[str, float]         # ERROR_TYPES -> AP gain of fixing that type alone (nan: no class left to average)
    special_dap: dict[str, float]  # "fp", "fn" -> AP gain of removing every false positive / false negative
    counts: dict[str, int]        # ERROR_TYPES -> detections (ground truths for "miss") of that type
    num_detections: int           # evaluated (after the max_dets cap)
    num_tp: int
    num_ignored: int
    num_gt: int

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def _check_thresholds(iou_thresholds: Any, background_threshold: float) -> tuple[float, ...]:
    if isinstance(iou_thresholds, (int, float)):
        iou_thresholds = (iou_thresholds,)
    ts = tuple(float(t) for t in iou_thresholds)
    if not ts or any(not (0.0 < t <= 1.0) or math.isnan(t) for t in ts):
        raise ValueError(f"iou_thresholds must be a non-empty list of values in (0, 1], got {list(iou_thresholds)}")
    b = float(background_threshold)
    if not (0.0 <= b < min(ts)):
        raise ValueError(f"background_threshold must be in [0, {min(ts):g}) (below every foreground threshold), "
                         f"got {b}")
    return ts


def error_breakdown(
    gt: str | os.PathLike | GroundTruth,
    dets: Detections,
    iou_thresholds: float | tuple[float, ...] = (0.5, 0.75),
    background_threshold: float = 0.1,
    max_dets: int = 100,
    scores: Tensor | None = None,
) -> list[ErrorBreakdown]:
    """TIDE's error breakdown (see the module docstring) of ``dets`` at each foreground IoU threshold.

    Args:
        gt: COCO ground-truth json path (cached) or a GroundTruth.
        dets: N final detections, e.g. an NMS arm's output; labels are COCO category ids.
        iou_thresholds: foreground thresholds t_f, e.g. (0.5, 0.75).
        background_threshold: t_b, 0.1 as in TIDE.
        max_dets: detections kept per image, best score first (TIDE's and COCO's 100).
        scores (Tensor[N], optional): ranking score replacing ``dets.scores``.
    Returns:
        One ErrorBreakdown per threshold, in the given order.
    Cost: linear in detections x ground truths per image; a third of one COCO evaluation on the built-in val set,
    a seventh at COCO scale (docs/benchmarks.md, "Analyses").
    """
    ts = _check_thresholds(iou_thresholds, background_threshold)
    f = _Frame(load_gt(gt), dets, scores, max_dets, per_image=True)
    return [_breakdown(f, t, float(background_threshold)) for t in ts]


def _breakdown(f: _Frame, t: float, bg: float) -> ErrorBreakdown:
    m = f.match(t)
    fp = ~m.tp & ~m.ignored
    has_gt = f.p_cnt > 0
    same, used = f.p_same, m.gt_used[f.p_gt]
    m1, a1 = _segmax(f.p_iou, f.c_start, f.c_cnt)                           # own class, used or not
    m2, a2 = _segmax(np.where(same, -1.0, f.p_iou), f.p_start, f.p_cnt)    # other classes
    m3, _ = _segmax(np.where(same & used, f.p_iou, -1.0), f.p_start, f.p_cnt)  # own class, already matched
    m4, _ = _segmax(f.p_iou, f.p_start, f.p_cnt)                            # any ground truth
    loc = fp & has_gt & (m1 >= bg) & (m1 <= t)
    cls = fp & has_gt & ~loc & (m2 >= t)
    dupe = fp & has_gt & ~loc & ~cls & (m3 >= t)
    bkg = fp & ~loc & ~cls & ~dupe & (~has_gt | (m4 <= bg))
    both = fp & ~loc & ~cls & ~dupe & ~bkg

    # loc / cls errors aimed at an unmatched ground truth can claim it: the best-scored one (on ties the first by
    # image then row, tidecv's strict '>' in its image-by-image loop) becomes its true positive when its type is
    # fixed; the others vanish.
    target = np.full(f.n, -1, np.int64)
    target[loc] = f.p_gt[a1[loc]]
    target[cls] = f.p_gt[a2[cls]]
    claim = (loc | cls) & (target >= 0)
    claim &= ~m.gt_used[np.maximum(target, 0)]
    cand = np.flatnonzero(claim)
    best = np.zeros(f.n, bool)
    if len(cand):
        o = cand[np.lexsort((cand, -f.score[cand], target[cand]))]
        first = np.r_[True, target[o][1:] != target[o][:-1]]
        best[o[first]] = True
    usable = np.zeros(len(f.gcls), bool)
    usable[target[claim]] = True
    unmatched_gt = ~m.gt_used
    missed = unmatched_gt & ~usable

    keep = m.tp | fp
    base, _ = f.ap(keep, m.tp, f.cls, f.n_gt)

    def fixed_claims(kind: np.ndarray, relabel: bool) -> float:
        k, tp, c = keep & ~(kind & ~best), m.tp | (kind & best), f.cls
        if relabel:
            c = f.cls.copy()
            c[kind & best] = f.gcls[target[kind & best]]
        return f.ap(k, tp, c, f.n_gt)[0]

    def removed(kind: np.ndarray) -> float:
        return f.ap(keep & ~kind, m.tp, f.cls, f.n_gt)[0]

    def fewer_gt(drop: np.ndarray) -> float:
        return f.ap(keep, m.tp, f.cls, f.n_gt - np.bincount(f.gcls[drop], minlength=f.K))[0]

    fixed = {
        "cls": fixed_claims(cls, relabel=True),
        "loc": fixed_claims(loc, relabel=False),
        "both": removed(both),
        "dupe": removed(dupe),
        "bkg": removed(bkg),
        "miss": fewer_gt(missed),
    }
    special = {"fp": removed(fp), "fn": fewer_gt(unmatched_gt)}
    undefined = base == -1
    return ErrorBreakdown(
        iou_threshold=t,
        background_threshold=bg,
        ap=base,
        dap={k: (math.nan if undefined or v == -1 else v - base) for k, v in fixed.items()},
        special_dap={k: (math.nan if undefined or v == -1 else v - base) for k, v in special.items()},
        counts={"cls": int(cls.sum()), "loc": int(loc.sum()), "both": int(both.sum()), "dupe": int(dupe.sum()),
                "bkg": int(bkg.sum()), "miss": int(missed.sum())},
        num_detections=int(f.n),
        num_tp=int(m.tp.sum()),
        num_ignored=int(m.ignored.sum()),
        num_gt=int(len(f.gcls)),
    )


def match_detections(
    gt: str | os.PathLike | GroundTruth,
    dets: Detections,
    iou_threshold: float,
    max_dets: int = 100,
    scores: Tensor | None = None,
) -> dict[str, np.ndarray]:
    """cocoeval's matching at one IoU threshold (area "all", ``max_dets`` per image and class), for every detection.

    Returns:
        {"tp": bool [N], "ignored": bool [N] (on a crowd region), "evaluated": bool [N] (inside the max_dets cap),
         "gt_index": int64 [N] (row of ``gt.boxes`` matched, -1 if none), "iou": float64 [N] (with that ground truth,
         0 if none)}, in the input row order.
    """
    f = _Frame(load_gt(gt), dets, scores, max_dets, per_image=False)
    m = f.match(float(iou_threshold))
    n = len(dets)
    out = {"tp": np.zeros(n, bool), "ignored": np.zeros(n, bool), "evaluated": np.zeros(n, bool),
           "gt_index": np.full(n, -1, np.int64), "iou": np.zeros(n)}
    out["tp"][f.rows], out["ignored"][f.rows], out["evaluated"][f.rows] = m.tp, m.ignored, True
    out["gt_index"][f.rows], out["iou"][f.rows] = m.gt, m.iou
    return out


def coco_ap(
    gt: str | os.PathLike | GroundTruth,
    dets: Detections,
    scores: Tensor | None = None,
    max_dets: int = 100,
) -> dict[str, Any]:
    """cocoeval's box AP for area "all" with this module's vectorised matching: the AP keys of ``evaluate`` that
    need no area ranges, equal to them to float rounding (tested against pycocotools), at a fraction of the cost.

    Returns:
        {"AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90": float, "ap_per_threshold": list[float] (IoU
        0.50:0.05:0.95)}; fractions, -1 where no class has ground truth. No AP_S/M/L, no AR.
    """
    from iouctl.analysis.coco_eval import IOU_THRESHOLDS, SINGLE_THRESHOLD_KEYS

    f = _Frame(load_gt(gt), dets, scores, max_dets, per_image=False)
    f.match_all(IOU_THRESHOLDS)
    per_t = []
    for t in IOU_THRESHOLDS:
        m = f.match(t)
        per_t.append(f.ap(~m.ignored, m.tp, f.cls, f.n_gt)[0])
    valid = [v for v in per_t if v != -1]
    out: dict[str, Any] = {"AP": float(np.mean(valid)) if valid else -1.0, "AP50": per_t[0], "AP75": per_t[5]}
    for name, thr in SINGLE_THRESHOLD_KEYS.items():
        out[name] = per_t[int(np.argmin(np.abs(np.asarray(IOU_THRESHOLDS) - thr)))]
    out["ap_per_threshold"] = per_t
    return out


def errors_markdown(results: dict[str, list[ErrorBreakdown]] | list[ErrorBreakdown]) -> str:
    """Markdown tables of dAP (percentage points) per error type, one table per foreground threshold, one row per
    arm (``{arm: error_breakdown(...)}``) or a single unnamed row (a list); ``to_dict()`` forms are accepted."""
    from iouctl.analysis.coco_eval import fmt_ap

    if isinstance(results, list):
        results = {"": results}
    results = {a: [ErrorBreakdown(**_nan(r)) if isinstance(r, dict) else r for r in rows]
               for a, rows in results.items()}
    by_t: dict[float, list[tuple[str, ErrorBreakdown]]] = {}
    for arm, rows in results.items():
        for r in rows:
            by_t.setdefault(r.iou_threshold, []).append((arm, r))
    out = []
    for t, rows in by_t.items():
        thr = f"{round(100 * t):d}"
        cols = ["arm", f"AP{thr}", *ERROR_TYPES, "FP", "FN"]
        out += [f"TIDE errors at IoU {t:g} (background {rows[0][1].background_threshold:g}): AP gained by fixing each "
                f"error type alone, in AP points; counts in brackets.", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for arm, r in rows:
            cells = [arm or "-", fmt_ap(r.ap)]
            cells += [f"{_pts(r.dap[k])} ({r.counts[k]})" for k in ERROR_TYPES]
            cells += [_pts(r.special_dap[k]) for k in SPECIAL_TYPES]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _nan(d: dict) -> dict:
    """A to_dict() form back to floats: None (JSON's stand-in for nan) -> nan."""
    return {k: (_nan(v) if isinstance(v, dict) else math.nan if v is None else v) for k, v in d.items()}


def _pts(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"


__all__ = ["ERROR_TYPES", "SPECIAL_TYPES", "ErrorBreakdown", "coco_ap", "error_breakdown", "errors_markdown",
           "match_detections"]
