"""Pure-PyTorch references for the iouctl kernels: the test oracles and the fallback when a build fails.

Precise RoI Pooling (IoU-Net, Jiang et al. 2018) in its exact separable form (docs PAPERS.md):
    out[k, c, p, q] = sum_{h, w} By[k, p, h] * F[b_k, c, h, w] * Bx[k, q, w] / bin_area,
    Bx[k, q, w] = G(x_{q+1} - w) - G(x_q - w),
with G the antiderivative of the bilinear hat. Differentiable by autograd in the input and the box coordinates.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ROI_CHUNK = 64  # RoIs per matmul: bounds the [chunk, PH, C, W] intermediate (a few MB at C=256)


def hat_antiderivative(t: Tensor) -> Tensor:
    """G(t) = integral of max(0, 1 - |s|) over s <= t: 0 below -1, 1 above 1, quadratic in between."""
    tc = t.clamp(-1.0, 1.0)  # clamp: G is flat outside [-1, 1], so the gradient is 0 there too
    return torch.where(tc < 0, 0.5 * (tc + 1) ** 2, 1 - 0.5 * (1 - tc) ** 2)


def _edge_weights(lo: Tensor, step: Tensor, bins: int, size: int) -> Tensor:
    """Bin weights [K, bins, size]: weight of feature column w in bin q = G(x_{q+1} - w) - G(x_q - w)."""
    q = torch.arange(bins + 1, device=lo.device, dtype=lo.dtype)
    edges = lo[:, None] + q[None, :] * step[:, None]  # [K, bins + 1]
    cells = torch.arange(size, device=lo.device, dtype=lo.dtype)
    g = hat_antiderivative(edges[:, :, None] - cells[None, None, :])  # [K, bins + 1, size]
    return g[:, 1:] - g[:, :-1]


def check_batch_index(rois: Tensor, batch: int) -> Tensor:
    """rois[:, 0] as int64 after checking every entry is an integer in [0, batch) (ValueError otherwise)."""
    b = rois[:, 0]
    bad = ~(torch.isfinite(b) & (b == torch.floor(b)) & (b >= 0) & (b < batch))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"prroi_pool: rois[{k}, 0] (batch index) is {float(b[k])}; it must be an integer in [0, {batch}) "
            f"for an input batch of {batch}"
        )
    return b.long()


def prroi_pool_reference(input: Tensor, rois: Tensor, pooled_height: int, pooled_width: int,
                         spatial_scale: float = 1.0) -> Tensor:
    """Exact PrRoI pooling by dense separable weights.

    Args:
        input (Tensor[N, C, H, W]): features; computed in its dtype (use float64 for an oracle).
        rois (Tensor[K, 5]): (batch index, x1, y1, x2, y2) in image coordinates, multiplied by ``spatial_scale``.
    Returns:
        Tensor[K, C, PH, PW]: bin averages; 0 for an empty or infinite bin, NaN for a box with NaN coordinates.
    """
    N, C, H, W = input.shape
    K = rois.shape[0]
    PH, PW = int(pooled_height), int(pooled_width)
    batch = check_batch_index(rois, N)
    coords = rois[:, 1:].to(input.dtype) * spatial_scale
    x1, y1, x2, y2 = coords.unbind(1)
    w, h = x2 - x1, y2 - y1
    bw, bh = w / PW, h / PH
    area = bw * bh
    normal = (w > 0) & (h > 0) & torch.isfinite(area) & (area > 0)
    nan_box = torch.isnan(w) | torch.isnan(h)
    # Non-normal boxes get a harmless stand-in so that no NaN/inf enters the graph (torch.where leaks NaN grads).
    one = torch.ones_like(bw)
    x1s, y1s = torch.where(normal, x1, 0 * one), torch.where(normal, y1, 0 * one)
    bws, bhs = torch.where(normal, bw, one), torch.where(normal, bh, one)
    Bx = _edge_weights(x1s, bws, PW, W)  # [K, PW, W]
    By = _edge_weights(y1s, bhs, PH, H)  # [K, PH, H]
    out = input.new_zeros((K, C, PH, PW))
    for n in range(N):
        idx = (batch == n).nonzero().flatten()
        feat = input[n].permute(1, 0, 2).reshape(H, C * W)  # [H, C * W]
        for chunk in idx.split(_ROI_CHUNK):
            t = (By[chunk].reshape(-1, H) @ feat).reshape(len(chunk), PH * C, W)  # rows ordered (p, c)
            val = torch.bmm(t, Bx[chunk].transpose(1, 2)).reshape(len(chunk), PH, C, PW).transpose(1, 2)
            out = out.index_put((chunk,), val)
    area_s = torch.where(normal, area, one)
    fill = torch.where(nan_box, torch.full_like(area, float("nan")), torch.zeros_like(area))
    return torch.where(normal[:, None, None, None], out / area_s[:, None, None, None], fill[:, None, None, None])
