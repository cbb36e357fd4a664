"""cocoeval's matching and accumulation on arrays (kernels/coco_eval/): the Python face of ``iouctl::coco_match`` and
``iouctl::coco_accumulate``. iouctl.analysis.cocoeval_arrays builds their inputs from a GroundTruth and Detections;
their references are pycocotools and faster-coco-eval themselves (there is no pure-PyTorch copy: where the library
does not build, ``available()`` is False and callers evaluate with faster-coco-eval)."""
from __future__ import annotations

import numpy as np
import torch

from iouctl.ops import _extension

_LIB = "coco_eval"


def available() -> bool:
    """Whether the kernels are built and loaded (a failed build warns once, naming its log)."""
    return _extension.select_impl(_LIB, "auto", "cpu", "coco_match") == "cpp"


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def coco_match(iou: np.ndarray, pair_gt: np.ndarray, pair_offsets: np.ndarray, group_offsets: np.ndarray,
               gt_ignore: np.ndarray, gt_crowd: np.ndarray, det_outside: np.ndarray,
               thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cocoeval's greedy matching (kernels/coco_eval/coco_eval.cpp states the rules).

    Args:
        iou (float64[P]), pair_gt (int64[P]): candidate (detection, ground truth) pairs, detection by detection,
            ground truth in cocoeval's order; pair_offsets (int64[D+1]): detection d's pairs.
        group_offsets (int64[NG+1]): runs of detections (an image and class) in matching order.
        gt_ignore (bool[A, G]), gt_crowd (bool[G]), det_outside (bool[A, D]), thresholds (float64[T]).
    Returns:
        (match int64[A, T, D]: matched pair or -1, ignored bool[A, T, D]).
    """
    _extension.select_impl(_LIB, "cpp", "cpu", "coco_match")  # loads the library; raises naming the log if broken
    m, ig = torch.ops.iouctl.coco_match(
        _t(iou.astype(np.float64, copy=False)), _t(pair_gt.astype(np.int64, copy=False)),
        _t(pair_offsets.astype(np.int64, copy=False)), _t(group_offsets.astype(np.int64, copy=False)),
        _t(gt_ignore.astype(bool, copy=False)), _t(gt_crowd.astype(bool, copy=False)),
        _t(det_outside.astype(bool, copy=False)), _t(thresholds.astype(np.float64, copy=False)))
    return m.numpy(), ig.numpy()


def coco_accumulate(tp: np.ndarray, fp: np.ndarray, class_offsets: np.ndarray, rank: np.ndarray,
                    num_gt: np.ndarray, recall_thresholds: np.ndarray,
                    max_dets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """cocoeval's accumulate on true/false positive flags (bool[A, T, D]) of detections in accumulation order (by
    class, then score descending, image, rank): (precision float64[T, R, K, A, M], recall float64[T, K, A, M]), -1
    where a class has no ground truth in an area range. Shapes as in kernels/coco_eval/coco_eval.cpp."""
    _extension.select_impl(_LIB, "cpp", "cpu", "coco_accumulate")
    p, r = torch.ops.iouctl.coco_accumulate(
        _t(tp.astype(bool, copy=False)), _t(fp.astype(bool, copy=False)),
        _t(class_offsets.astype(np.int64, copy=False)), _t(rank.astype(np.int64, copy=False)),
        _t(num_gt.astype(np.int64, copy=False)), _t(recall_thresholds.astype(np.float64, copy=False)),
        [int(m) for m in max_dets])
    return p.numpy(), r.numpy()
