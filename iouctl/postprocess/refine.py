"""IoU-guided box refinement (IoU-Net Algorithm 2): gradient ascent on the predicted IoU w.r.t. the box.

The network is frozen; only box coordinates move. All boxes of all images move together: one forward + backward of
the IoU predictor per iteration (the forward that checks step t is also the one that gives the gradient of step t+1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

REPORT_SCORES = ("cls", "cluster", "cls_times_iou")
MIN_SIDE = 1.0  # px: a step that would leave a box thinner than this is undone and the box frozen

# predict_iou(boxes per image, their rows in the concatenated input) -> predicted IoU per image, differentiable in
# the boxes; the rows let the caller pick each box's class (frozen boxes leave the batch)
IoUPredictor = Callable[[list[Tensor], list[Tensor]], list[Tensor]]


@dataclass
class Refinement:
    """What a refinement did, per box in the order of the concatenated input boxes."""

    boxes: list[Tensor]       # refined boxes per image, Tensor[K_i, 4]
    iou_before: Tensor        # [K] predicted IoU of the input boxes (after clipping to the image)
    iou_after: Tensor         # [K] predicted IoU of the refined boxes
    steps: Tensor             # [K] int64 accepted steps of each box
    iterations: int           # iterations run (< T when every box froze early)


class IoURefiner:
    """Gradient ascent on the predicted IoU w.r.t. box coordinates (defaults: IoU-Net Alg. 2).

    step: lambda; x-gradients are scaled by the box width, y-gradients by its height. omega1 / omega2: a box freezes
    when |gain| < omega1 (converged) or gain < omega2 (degraded; Alg. 2 keeps the degraded step). iterations: T;
    top_k: boxes refined per image (best reported scores after NMS). revert_on_degrade: the trackers' variant, which
    undoes any step that lowers the predicted IoU and multiplies that box's step by step_decay (no omega2 freeze).
    report_score: the score a refined box reports (cls: its own classification score; cluster: the score the NMS
    gave it, IoU-guided NMS's best cls of its cluster; cls_times_iou: cluster times the refined predicted IoU).
    Boxes stay inside the image with sides >= 1 px.
    """

    def __init__(self, step: float = 0.5, omega1: float = 0.001, omega2: float = -0.01, iterations: int = 5,
                 top_k: int = 100, revert_on_degrade: bool = False, step_decay: float = 0.5,
                 report_score: str = "cluster") -> None:
        if not step > 0:
            raise ValueError(f"refiner.step must be > 0, got {step}")
        if not omega1 >= 0 or not omega2 <= 0:
            raise ValueError(f"refiner.omega1 must be >= 0 and refiner.omega2 <= 0, got {omega1}, {omega2}")
        if isinstance(iterations, bool) or isinstance(top_k, bool) or iterations < 1 or top_k < 1:
            raise ValueError(f"refiner.iterations and refiner.top_k must be integers >= 1, got {iterations}, {top_k}")
        if not 0 < step_decay <= 1:
            raise ValueError(f"refiner.step_decay must be in (0, 1], got {step_decay}")
        if report_score not in REPORT_SCORES:
            raise ValueError(f"refiner.report_score={report_score!r}; valid: {', '.join(REPORT_SCORES)}")
        self.step, self.omega1, self.omega2 = float(step), float(omega1), float(omega2)
        self.iterations, self.top_k = int(iterations), int(top_k)
        self.revert_on_degrade, self.step_decay, self.report_score = bool(revert_on_degrade), float(step_decay), report_score

    @property
    def name(self) -> str:
        variant = f", revert x{self.step_decay:g}" if self.revert_on_degrade else ""
        return f"iou-net(lambda={self.step:g}, T={self.iterations}{variant})"

    def __call__(self, predict_iou: IoUPredictor, boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
                 ) -> Refinement:
        """Refine `boxes` (per image Tensor[K_i, 4] xyxy in the pixels `predict_iou` reads, image (h, w) in
        `image_sizes`). `predict_iou` is called with every still-moving box of every image at once."""
        if len(boxes) != len(image_sizes):
            raise ValueError(f"one image size per image: {len(boxes)} box sets, {len(image_sizes)} sizes")
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            empty = boxes[0].new_zeros((0,)) if boxes else torch.zeros(0)
            return Refinement([b.detach().clone() for b in boxes], empty, empty.clone(),
                              torch.zeros(0, dtype=torch.int64), 0)
        b = torch.cat([x.detach() for x in boxes]).float()
        image = torch.repeat_interleave(torch.arange(len(counts), device=b.device), torch.tensor(counts, device=b.device))
        limit = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=b.dtype, device=b.device)[image]
        b = torch.minimum(b.clamp(min=0), limit)
        n_img = len(counts)

        def evaluate(idx: Tensor, bx: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
            """Predicted IoU (and its gradient w.r.t. the box) of boxes bx, rows idx of the concatenated set."""
            per_image = torch.bincount(image[idx], minlength=n_img).tolist()
            with torch.enable_grad():
                x = bx.detach().requires_grad_(need_grad)
                iou = torch.cat(predict_iou(list(x.split(per_image)), list(idx.split(per_image))))
                grad = torch.autograd.grad(iou.sum(), x)[0] if need_grad else None
            return iou.detach().float(), grad

        everything = torch.arange(len(b), device=b.device)
        iou, grad = evaluate(everything, b, need_grad=True)
        iou_before = iou.clone()
        step = torch.full((len(b),), self.step, dtype=b.dtype, device=b.device)
        steps = torch.zeros(len(b), dtype=torch.int64, device=b.device)
        side = b[:, 2:] - b[:, :2]
        active = (side >= MIN_SIDE).all(dim=1)
        iterations = 0
        for t in range(self.iterations):
            idx = torch.where(active)[0]
            if idx.numel() == 0:
                break
            iterations += 1
            wh = (b[idx, 2:] - b[idx, :2]).repeat(1, 2)
            proposal = b[idx] + step[idx, None] * grad[idx] * wh
            proposal = torch.minimum(proposal.clamp(min=0), limit[idx])
            valid = ((proposal[:, 2:] - proposal[:, :2]) >= MIN_SIDE).all(dim=1)  # False for NaN too
            proposal = torch.where(valid[:, None], proposal, b[idx])  # the predictor never sees a broken box
            # the last check needs no gradient: no step follows it
            new_iou, new_grad = evaluate(idx, proposal, need_grad=t + 1 < self.iterations)
            gain = new_iou - iou[idx]
            if self.revert_on_degrade:
                accept = valid & (gain >= 0)
                freeze = ~valid | (accept & (gain.abs() < self.omega1))
                step[idx[~accept]] *= self.step_decay
            else:
                accept = valid
                freeze = ~valid | (gain.abs() < self.omega1) | (gain < self.omega2)
            moved = idx[accept]
            b[moved] = proposal[accept]
            iou[moved] = new_iou[accept]
            steps[moved] += 1
            if new_grad is not None:
                grad[moved] = new_grad[accept]
            active[idx[freeze]] = False
        return Refinement(list(b.split(counts)), iou_before, iou, steps, iterations)
