"""The NMS family as ops: greedy and IoU-guided NMS (IoU-Net, Alg. 1), Soft-NMS (Bodla et al. 2017), per-class
variants, and the IoU-aware score fusion (Wu et al. 2019).

Kernels: ``kernels/nms/`` (schemas + CPU + CUDA), built on first use; pure-PyTorch references in
``iouctl/ops/reference.py``. Conventions shared by every op here:

- boxes are Tensor[N, 4] (x1, y1, x2, y2); a box is suppressed when its IoU with a kept box is > iou_threshold
  (strictly, as torchvision.ops.nms); the IoU is computed in the boxes' dtype exactly as torchvision computes it
  (float16/bfloat16 boxes in float32), so greedy keep sets equal torchvision's bit for bit.
- Ranking is by decreasing score with ties broken by increasing index (a stable sort); per-class work is
  independent, so results never depend on the thread count.
- Batched variants are exact per category (no coordinate-offset trick) and return the kept boxes of all categories
  merged by decreasing score, ties by index (torchvision's batched_nms order).
- NaN scores raise ValueError (there is no meaningful rank for them); ±inf ranks are allowed in greedy and IoU-guided
  NMS; Soft-NMS multiplies scores and needs them finite. A box with NaN coordinates has NaN IoU with everything, which
  counts as no overlap; a zero-area box likewise (0/0) never suppresses nor is suppressed, as in torchvision.
- The ops are not differentiable: inputs are detached; outputs are on the input device.

``impl``: "auto" (the compiled kernel for the tensors' device; CUDA tensors without a CUDA build run the CPU kernel
on a host copy; the reference when the build failed), "cpp", "cuda" (raises when not built), "reference".
The CUDA kernels run the greedy scan of each category in one thread block (per-class segments, any number of boxes),
with the IoU and suppression rule of the CPU kernels (``kernels/nms/nms_math.h``), so keep sets are equal bit for
bit; their one device-to-host read is the number of kept boxes. Soft-NMS on CUDA tensors runs the CPU kernel on a
host copy. The NaN checks below read CUDA tensors back once each.
"""
from __future__ import annotations

import math
import numbers
import threading

import torch
from torch import Tensor

from iouctl.ops import _extension
from iouctl.ops import reference as ref

__all__ = [
    "batched_iou_guided_nms",
    "batched_nms",
    "batched_soft_nms",
    "iou_aware_score",
    "iou_guided_nms",
    "nms",
    "soft_nms",
]

_LIB = "nms"
SOFT_METHODS = ("linear", "gaussian")
_registered = False
_register_lock = threading.Lock()


def _register_fakes() -> None:
    """Fake (meta) kernels, once the library is loaded: the number of kept boxes is data-dependent."""
    global _registered
    if _registered:  # checked before the lock: every op call comes here
        return
    with _register_lock:
        if _registered:
            return

        def _dynamic(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
            n = boxes.shape[0]  # a bound helps the compiler, but it must be a plain int (not a SymInt)
            ctx = torch.library.get_ctx()
            k = ctx.new_dynamic_size(max=n) if isinstance(n, int) else ctx.new_dynamic_size()
            return boxes.new_empty((k,), dtype=torch.long), scores.new_empty((k,))

        @torch.library.register_fake("iouctl::iou_guided_nms")
        def _fake_iou_guided(boxes, scores, ious, iou_threshold):
            return _dynamic(boxes, scores)

        @torch.library.register_fake("iouctl::batched_iou_guided_nms")
        def _fake_batched_iou_guided(boxes, scores, ious, idxs, iou_threshold):
            return _dynamic(boxes, scores)

        @torch.library.register_fake("iouctl::soft_nms")
        def _fake_soft(boxes, scores, method, sigma, iou_threshold, score_threshold):
            return _dynamic(boxes, scores)

        @torch.library.register_fake("iouctl::batched_soft_nms")
        def _fake_batched_soft(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
            return _dynamic(boxes, scores)

        _registered = True


def _resolve(impl: str, device: torch.device, op: str) -> str:
    """'cpp' (possibly on a host copy), 'cuda' or 'reference' for tensors on ``device``."""
    kind = _extension.resolve_or_host_copy(_LIB, impl, device, op)
    if kind != "reference":
        _register_fakes()
    return kind


_call_kernel = _extension.call_kernel


# --------------------------------------------------------------------------------------------------- validation
def _check_boxes(boxes) -> Tensor:
    if not isinstance(boxes, Tensor):
        raise ValueError(f"boxes must be a Tensor[N, 4] (x1, y1, x2, y2), got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be floating point (float16/bfloat16/float32/float64), got {boxes.dtype}")
    return boxes.detach()


def _check_vector(t, name: str, boxes: Tensor, *, integer: bool = False) -> Tensor:
    n = boxes.shape[0]
    what = "integer category ids" if integer else "floating point values"
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor[N] of {what}, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be Tensor[N] with N = {n} (one per box), got shape {tuple(t.shape)}")
    if integer:
        ok = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    else:
        ok = t.is_floating_point()
    if not ok:
        raise ValueError(f"{name} must hold {what}, got {t.dtype}")
    if t.device != boxes.device:
        raise ValueError(f"{name} is on {t.device} but boxes are on {boxes.device}; put them on one device")
    return t.detach()


def _check_no_nan(t: Tensor, name: str) -> None:
    nan = torch.isnan(t)
    if bool(nan.any()):
        i = int(nan.nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN (first at index {i}); NMS needs an ordering: replace or drop NaN "
                         "scores first")


def check_real(x, name: str, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    bad = math.isnan(x) or (lo is not None and (x <= lo if open_lo else x < lo)) or (hi is not None and x > hi)
    if bad:
        lo_s = "" if lo is None else (f"> {lo:g}" if open_lo else f">= {lo:g}")
        hi_s = "" if hi is None else f"<= {hi:g}"
        raise ValueError(f"{name} must be {' and '.join(s for s in (lo_s, hi_s) if s) or 'a number'}, got {x!r}")
    return x


def check_soft_args(method, sigma, iou_threshold, score_threshold) -> tuple[str, float, float, float]:
    if method not in SOFT_METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in SOFT_METHODS)}, got {method!r}")
    sigma = check_real(sigma, "sigma", 0.0, open_lo=True)
    if math.isinf(sigma):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    # score_threshold >= 0 keeps every live score >= 0, so a decay never raises a score (the kernel relies on it)
    return (method, sigma, check_real(iou_threshold, "iou_threshold", 0.0, 1.0),
            check_real(score_threshold, "score_threshold", 0.0))


def _check_finite(t: Tensor, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite for Soft-NMS (it multiplies them), got {float(t[i])} at index {i}")


# --------------------------------------------------------------------------------------------------------- ops
def iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, iou_threshold: float, *,
                   impl: str = "auto") -> tuple[Tensor, Tensor]:
    """IoU-guided NMS (IoU-Net, Algorithm 1): greedy NMS ranked by the predicted IoU.

    Args:
        boxes (Tensor[N, 4]): x1, y1, x2, y2.
        scores (Tensor[N]): classification scores (only used for the cluster scores).
        ious (Tensor[N]): predicted IoUs, the ranking score.
        iou_threshold (float in [0, 1]): suppress boxes whose IoU with a kept box is > iou_threshold.
    Returns:
        keep (Tensor[K] int64): indices of kept boxes, in decreasing ``ious`` (ties: increasing index).
        cluster_scores (Tensor[K], dtype of ``scores``): for keep[k], the max of ``scores`` over the boxes it
        suppressed, itself included.
    """
    boxes = _check_boxes(boxes)
    scores = _check_vector(scores, "scores", boxes)
    ious = _check_vector(ious, "ious", boxes)
    thr = check_real(iou_threshold, "iou_threshold", 0.0, 1.0)
    _check_no_nan(ious, "ious")
    _check_no_nan(scores, "scores")
    if _resolve(impl, boxes.device, "iou_guided_nms") == "reference":
        return ref.iou_guided_nms_reference(boxes, scores, ious, thr)
    return _call_kernel("iou_guided_nms", boxes.device, boxes, scores, ious, thr)


def batched_iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float, *,
                           impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``iou_guided_nms`` independently per category ``idxs`` (Tensor[N] integer), exactly.

    Returns (keep Tensor[K] int64, cluster_scores Tensor[K]) with all categories merged in decreasing ``ious``
    (ties: increasing index), as torchvision.ops.batched_nms orders its output.
    """
    boxes = _check_boxes(boxes)
    scores = _check_vector(scores, "scores", boxes)
    ious = _check_vector(ious, "ious", boxes)
    idxs = _check_vector(idxs, "idxs", boxes, integer=True)
    thr = check_real(iou_threshold, "iou_threshold", 0.0, 1.0)
    _check_no_nan(ious, "ious")
    _check_no_nan(scores, "scores")
    if _resolve(impl, boxes.device, "batched_iou_guided_nms") == "reference":
        return ref.batched_iou_guided_nms_reference(boxes, scores, ious, idxs, thr)
    return _call_kernel("batched_iou_guided_nms", boxes.device, boxes, scores, ious, idxs, thr)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, impl: str = "auto") -> Tensor:
    """Greedy NMS, same result as torchvision.ops.nms (ties in ``scores`` by increasing index).

    boxes Tensor[N, 4], scores Tensor[N]. Returns keep Tensor[K] int64 in decreasing score.
    """
    return iou_guided_nms(boxes, scores, scores, iou_threshold, impl=impl)[0]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, impl: str = "auto") -> Tensor:
    """Greedy NMS per category, exact (torchvision's coordinate-offset trick is not, in float32 with many boxes).

    boxes Tensor[N, 4], scores Tensor[N], idxs Tensor[N] integer. Returns keep Tensor[K] int64 in decreasing score.
    """
    return batched_iou_guided_nms(boxes, scores, scores, idxs, iou_threshold, impl=impl)[0]


def soft_nms(boxes: Tensor, scores: Tensor, method: str = "gaussian", sigma: float = 0.5,
             iou_threshold: float = 0.3, score_threshold: float = 0.001, *,
             impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017).

    Repeatedly selects the box with the highest current score (ties: lowest index) and decays the others:
    ``"linear"``: score *= 1 - IoU when IoU > iou_threshold; ``"gaussian"``: score *= exp(-IoU^2 / sigma) for every
    box (iou_threshold unused). Boxes whose score is (or decays) below ``score_threshold`` are dropped. Scores decay
    in float64.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N], finite).
    Returns:
        keep (Tensor[K] int64) in selection order, new_scores (Tensor[K], dtype of ``scores``): the decayed score
        of each kept box when it was selected (non-increasing).
    """
    boxes = _check_boxes(boxes)
    scores = _check_vector(scores, "scores", boxes)
    method, sigma, thr, st = check_soft_args(method, sigma, iou_threshold, score_threshold)
    _check_finite(scores, "scores")
    if _resolve(impl, boxes.device, "soft_nms") == "reference":
        return ref.soft_nms_reference(boxes, scores, method, sigma, thr, st)
    return _call_kernel("soft_nms", boxes.device, boxes, scores, method, sigma, thr, st)


def batched_soft_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, method: str = "gaussian", sigma: float = 0.5,
                     iou_threshold: float = 0.3, score_threshold: float = 0.001, *,
                     impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``soft_nms`` independently per category ``idxs`` (Tensor[N] integer).

    Returns (keep Tensor[K] int64, new_scores Tensor[K]) merged by decreasing decayed score (ties: increasing
    index); within one category that is its selection order.
    """
    boxes = _check_boxes(boxes)
    scores = _check_vector(scores, "scores", boxes)
    idxs = _check_vector(idxs, "idxs", boxes, integer=True)
    method, sigma, thr, st = check_soft_args(method, sigma, iou_threshold, score_threshold)
    _check_finite(scores, "scores")
    if _resolve(impl, boxes.device, "batched_soft_nms") == "reference":
        return ref.batched_soft_nms_reference(boxes, scores, idxs, method, sigma, thr, st)
    return _call_kernel("batched_soft_nms", boxes.device, boxes, scores, idxs, method, sigma, thr, st)


def iou_aware_score(scores: Tensor, ious: Tensor, cls_weight: float = 0.5) -> Tensor:
    """IoU-aware detection score (Wu et al. 2019): ``scores ** cls_weight * ious ** (1 - cls_weight)``.

    ``cls_weight`` in [0, 1] weights the *classification* score (1: cls only, 0: IoU only; official code 0.5).
    scores and ious are floating tensors of broadcastable shapes (e.g. Tensor[N, C] and Tensor[N, 1]); both are
    clamped to [0, 1] first, since a regressed IoU can overshoot and a negative base has no real power. NaN stays
    NaN. Differentiable (plain PyTorch). Returns the broadcast shape in the promoted dtype.
    """
    a = check_real(cls_weight, "cls_weight", 0.0, 1.0)
    for t, name in ((scores, "scores"), (ious, "ious")):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating point Tensor, got {got}")
    try:
        torch.broadcast_shapes(scores.shape, ious.shape)
    except RuntimeError:
        raise ValueError(f"scores {tuple(scores.shape)} and ious {tuple(ious.shape)} must have broadcastable shapes "
                         "(e.g. [N, C] and [N, 1])") from None
    if scores.device != ious.device:
        raise ValueError(f"scores are on {scores.device} but ious on {ious.device}; put them on one device")
    return scores.clamp(0.0, 1.0).pow(a) * ious.clamp(0.0, 1.0).pow(1.0 - a)
