"""IoU-guided box refinement (IoU-Net Algorithm 2). The optimisation loop arrives with the refinement issue."""
from __future__ import annotations

from iouctl.errors import NotAvailableYet

REPORT_SCORES = ("cls", "cluster", "cls_times_iou")


class IoURefiner:
    """Gradient ascent on the predicted IoU w.r.t. box coordinates (defaults: IoU-Net Alg. 2).

    step: lambda; omega1 / omega2: freeze a box when |gain| < omega1 (converged) or gain < omega2 (degraded);
    iterations: T; top_k: boxes refined per image; revert_on_degrade / step_decay: the trackers' variant.
    """

    def __init__(self, step: float = 0.5, omega1: float = 0.001, omega2: float = -0.01, iterations: int = 5,
                 top_k: int = 100, revert_on_degrade: bool = False, step_decay: float = 0.5,
                 report_score: str = "cls") -> None:
        if step <= 0:
            raise ValueError(f"refiner.step must be > 0, got {step}")
        if iterations < 1 or top_k < 1:
            raise ValueError(f"refiner.iterations and refiner.top_k must be >= 1, got {iterations}, {top_k}")
        if not 0 < step_decay <= 1:
            raise ValueError(f"refiner.step_decay must be in (0, 1], got {step_decay}")
        if report_score not in REPORT_SCORES:
            raise ValueError(f"refiner.report_score={report_score!r}; valid: {', '.join(REPORT_SCORES)}")
        self.step, self.omega1, self.omega2 = step, omega1, omega2
        self.iterations, self.top_k = iterations, top_k
        self.revert_on_degrade, self.step_decay, self.report_score = revert_on_degrade, step_decay, report_score

    def __call__(self, model, features, detections):
        raise NotAvailableYet("box refinement (IoU-Net Alg. 2) is not implemented yet in this version of iouctl")
