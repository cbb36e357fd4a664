"""Precise RoI Pooling (IoU-Net, Jiang et al. 2018): exact bin averages of the bilinearly interpolated feature map,
differentiable in the features and in the box coordinates. An alternative to ``torchvision.ops.roi_align`` with
the same box format (no half-pixel offset: feature cell (j, i) sits at (x=i, y=j)).

Kernels: ``kernels/prroi_pool/`` (schema + CPU + CUDA; the per-element math shared by CPU and CUDA in
``prroi_pool_math.h``), built on first use; autograd and fake kernels live here.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from iouctl.ops import _extension
from iouctl.ops.reference import prroi_pool_reference

_LIB = "prroi_pool"
_registered = False
_register_lock = threading.Lock()
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# 'direct': the CUDA kernels' per-element bodies run by the CPU build (the oracle of the CUDA math; slower than 'cpp')
IMPLS = (*_extension.IMPLS, "direct")
# the C++ op pair each compiled implementation calls
_OPS = {"cpp": ("prroi_pool", "_prroi_pool_backward"), "cuda": ("prroi_pool", "_prroi_pool_backward"),
        "direct": ("_prroi_pool_direct", "_prroi_pool_direct_backward")}


def _setup_context(ctx, inputs, output) -> None:
    input, rois, ph, pw, scale = inputs
    ctx.save_for_backward(input, rois, output)
    ctx.params = (ph, pw, scale)


def _make_backward(backward_op: str):
    def _backward(ctx, grad: Tensor):
        input, rois, output = ctx.saved_tensors
        ph, pw, scale = ctx.params
        need_input, need_rois = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gi, gr = getattr(torch.ops.iouctl, backward_op)(grad, input, rois, output, ph, pw, scale, need_input,
                                                        need_rois)
        return (gi if need_input else None, gr if need_rois else None, None, None, None)

    return _backward


def _double_backward(ctx, *grads):
    raise RuntimeError("prroi_pool: double backward (gradient of the gradient) is not supported; "
                       "use create_graph=False, or impl='reference' which autograd differentiates twice")


def _register() -> None:
    """Attach fake (meta) and autograd kernels to the C++ ops, once, after the library is loaded."""
    global _registered
    with _register_lock:
        if _registered or not _extension.load_library(_LIB):
            return

        def _fake(input, rois, pooled_height, pooled_width, spatial_scale):
            return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

        def _fake_backward(grad, input, rois, output, pooled_height, pooled_width, spatial_scale, input_grad,
                           rois_grad):
            gi = torch.empty_like(input) if input_grad else input.new_empty((0,))
            gr = rois.new_empty((rois.shape[0], 5)) if rois_grad else rois.new_empty((0,))
            return gi, gr

        for forward, backward in set(_OPS.values()):
            torch.library.register_fake(f"iouctl::{forward}", _fake)
            torch.library.register_fake(f"iouctl::{backward}", _fake_backward)
            torch.library.register_autograd(f"iouctl::{forward}", _make_backward(backward),
                                            setup_context=_setup_context)
            torch.library.register_autograd(f"iouctl::{backward}", _double_backward,
                                            setup_context=lambda ctx, inputs, output: None)
        _registered = True


@torch.compiler.assume_constant_result  # torch.compile: resolved once at trace time (the build/lock stay eager)
def _resolve(impl: str, device_type: str) -> str:
    """'cpp' | 'cuda' | 'direct' | 'reference' for ``impl`` on ``device_type``, with the op's Python parts
    registered."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "direct":
        if device_type != "cpu":
            raise ValueError(f"impl='direct' runs on CPU tensors but the input is on {device_type}; it is the CPU "
                             "check of the CUDA math (on a GPU, impl='cuda' runs the same element bodies)")
        if not _extension.load_library(_LIB):
            raise RuntimeError(f"impl='direct': the '{_LIB}' kernels failed to build; see "
                               f"{_extension.build_log(_LIB) or 'the KernelBuildWarning above'}")
        kind = _extension.record_impl(_LIB, "prroi_pool", device_type, "direct")
    else:
        kind = _extension.select_impl(_LIB, impl, device_type)
    if kind != "reference":
        _register()
    return kind


def _pair(output_size) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"output_size must be a positive int or a pair (PH, PW) of positive ints; got {output_size!r}")
    return size


def _rois(input: Tensor, boxes: Tensor | Sequence[Tensor], same_dtype: bool = True) -> Tensor:
    """boxes as Tensor[K, 5] (batch index, x1, y1, x2, y2), checked against ``input`` (dtype too, when
    ``same_dtype``)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError("boxes must be Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4] "
                             f"(one per image); got a Tensor of shape {tuple(boxes.shape)}")
        rois = boxes
    elif isinstance(boxes, (list, tuple)) and all(isinstance(b, Tensor) for b in boxes):
        for i, b in enumerate(boxes):
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be Tensor[L, 4] (x1, y1, x2, y2); got shape {tuple(b.shape)}")
            if b.device != input.device or (same_dtype and b.dtype != input.dtype):
                raise ValueError(f"boxes[{i}] is {b.dtype} on {b.device} but input is {input.dtype} on "
                                 f"{input.device}; they must match")
        if len(boxes) > input.shape[0]:
            raise ValueError(f"got boxes for {len(boxes)} images but the input batch has {input.shape[0]}")
        if not boxes:
            return input.new_zeros((0, 5))
        if not same_dtype and len({b.dtype for b in boxes}) > 1:
            boxes = [b.float() for b in boxes]
        index = [torch.full((len(b), 1), float(i), dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(index), torch.cat(list(boxes))], dim=1)
    else:
        raise ValueError(f"boxes must be Tensor[K, 5] or a list of Tensor[L, 4]; got {type(boxes).__name__}")
    if rois.device != input.device:
        raise ValueError(f"boxes are on {rois.device} but input is on {input.device}; they must be on one device")
    if same_dtype and rois.dtype != input.dtype:
        raise ValueError(f"boxes are {rois.dtype} but input is {input.dtype}; they must have the same dtype")
    return rois


def prroi_pool(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | tuple[int, int],
               spatial_scale: float = 1.0, *, impl: str = "auto") -> Tensor:
    """Precise RoI Pooling: the exact average of the bilinearly interpolated ``input`` over each bin.

    Cell (row j, column i) sits at (x=i, y=j) with no half-pixel offset; the map is 0 outside, falling off linearly
    over one cell; a box's width/height clamp at 0 and an empty (or infinite) bin gives 0; a box with a NaN
    coordinate gives NaN. Differentiable in ``input`` and in the box coordinates (the batch index gets 0).

    Args:
        input (Tensor[N, C, H, W]): float16, bfloat16, float32 or float64 (CPU computes low precision in float32;
            any memory layout).
        boxes (Tensor[K, 5] or list[Tensor[L, 4]]): (batch index, x1, y1, x2, y2), or one (x1, y1, x2, y2) tensor per
            image, in image coordinates; same dtype and device as ``input``.
        output_size (int or (PH, PW)): bins per RoI.
        spatial_scale (float): multiplies the box coordinates (e.g. 1/8 for a stride-8 map).
        impl: 'auto' (compiled kernel for the device, else the reference), 'cpp', 'cuda', 'reference', or
            'direct' (CPU only: the CUDA kernels' per-element code run on the CPU, in the CUDA dtypes).
    Returns:
        Tensor[K, C, PH, PW], in the input's dtype.
    Accuracy: the CPU kernel sums in float64 (prefix sums; bins thinner than 1/64 cell are summed directly), the
    CUDA kernel (and 'direct') in float32 (float64 for float64 input; the box gradient of a RoI with bins thinner
    than 1/64 cell in float64); float32 results are within ~1e-6 of the output scale.
    Autocast: under ``torch.autocast`` for the input's device the op pools in float32 (input and boxes cast, which
    may then differ in dtype) and returns the input's dtype, as ``torchvision.ops.roi_align`` does.
    A batch index that is not an integer in [0, N) raises ValueError on every device (on CUDA the forward reads
    one flag back from the GPU for it; while a CUDA graph is being captured it is not checked and the RoI gives NaN).
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"input must be Tensor[N, C, H, W]; got {shape}")
    if input.dtype not in _DTYPES:
        raise ValueError(f"input must be float16, bfloat16, float32 or float64; got {input.dtype}")
    ph, pw = _pair(output_size)
    scale = float(spatial_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"spatial_scale must be a finite number > 0; got {spatial_scale!r}")
    device_type = input.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    rois = _rois(input, boxes, same_dtype=not autocast)
    kind = _resolve(impl, device_type)
    if autocast:  # float32, as roi_align under autocast; the autocast kernel in prroi_pool.cpp does the same
        with torch.autocast(device_type, enabled=False):
            return _pool(input.float(), rois.float(), ph, pw, scale, kind).to(input.dtype)
    return _pool(input, rois, ph, pw, scale, kind)


def _pool(input: Tensor, rois: Tensor, ph: int, pw: int, scale: float, kind: str) -> Tensor:
    low = input.dtype in _LOW_PRECISION and kind not in ("cuda", "direct")  # those two compute half in float
    x, r = (input.float(), rois.float()) if low else (input, rois)
    if kind == "reference":
        out = prroi_pool_reference(x, r, ph, pw, scale)
    else:
        out = getattr(torch.ops.iouctl, _OPS[kind][0])(x, r, ph, pw, scale)
    return out.to(input.dtype) if low else out


class PrRoIPool(nn.Module):
    """Module form of :func:`prroi_pool`: ``PrRoIPool(output_size, spatial_scale)(input, boxes)``.

    input (Tensor[N, C, H, W]), boxes (Tensor[K, 5] or list[Tensor[L, 4]]) -> Tensor[K, C, PH, PW].
    """

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        self.impl = impl

    def forward(self, input: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
        return prroi_pool(input, boxes, self.output_size, self.spatial_scale, impl=self.impl)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, impl={self.impl!r}"
