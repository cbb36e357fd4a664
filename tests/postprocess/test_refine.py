"""IoU-Net Alg. 2 refinement, checked against a per-box loop written straight from the paper's pseudo-code."""
import pytest
import torch

from iouctl.models.retina import paired_box_iou
from iouctl.postprocess.refine import IoURefiner


def _scene(seed=0, n_img=3, per_img=7, size=(64, 80)):
    """Boxes near per-box targets; the 'predicted IoU' is the exact IoU with the target (smooth almost everywhere)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    targets, boxes = [], []
    for _ in range(n_img):
        xy = torch.rand(per_img, 2, generator=g) * torch.tensor([w - 30.0, h - 30.0]) + 2
        wh = torch.rand(per_img, 2, generator=g) * 20 + 6
        t = torch.cat([xy, xy + wh], 1)
        noise = (torch.rand(per_img, 4, generator=g) - 0.5) * wh.repeat(1, 2) * 0.5
        targets.append(t.double())
        boxes.append((t + noise).double())
    return boxes, targets, [size] * n_img


def _predictor(targets, calls=None):
    flat = torch.cat(targets)

    def predict(boxes, rows):
        if calls is not None:
            calls.append([len(b) for b in boxes])
        return [paired_box_iou(b, flat[r].to(b.dtype)) for b, r in zip(boxes, rows)]
    return predict


def _loop_reference(box, target, size, step, omega1, omega2, iterations):
    """Alg. 2 for one box, float64, two forwards per step as written (prev, then new)."""
    h, w = size
    limit = torch.tensor([w, h, w, h], dtype=torch.float64)
    b = torch.minimum(box.clamp(min=0), limit)
    for _ in range(iterations):
        x = b.clone().requires_grad_(True)
        prev = paired_box_iou(x[None], target[None])[0]
        (g,) = torch.autograd.grad(prev, x)
        wh = torch.stack([b[2] - b[0], b[3] - b[1]] * 2)
        new_b = torch.minimum((b + step * g * wh).clamp(min=0), limit)
        if (new_b[2:] - new_b[:2]).min() < 1.0:
            break
        new = paired_box_iou(new_b[None], target[None])[0]
        b = new_b
        gain = float(new.detach() - prev.detach())
        if abs(gain) < omega1 or gain < omega2:
            break
    return b


@pytest.mark.parametrize("step", [0.5, 2.0])
def test_matches_the_per_box_loop_of_the_paper(step):
    boxes, targets, sizes = _scene()
    out = IoURefiner(step=step)(_predictor(targets), [b.float() for b in boxes], sizes)
    refined = torch.cat(out.boxes)
    expected = torch.stack([_loop_reference(b, t, sizes[0], step, 0.001, -0.01, 5)
                            for bs, ts in zip(boxes, targets) for b, t in zip(bs, ts)])
    # float32 boxes of <= 80 px against the float64 loop: 1e-3 px covers 5 steps of float32 rounding
    torch.testing.assert_close(refined.double(), expected, atol=1e-3, rtol=0)


def test_raises_the_iou_and_reports_before_after():
    boxes, targets, sizes = _scene(seed=1)
    out = IoURefiner(step=0.5)(_predictor(targets), [b.float() for b in boxes], sizes)
    true_after = torch.cat([paired_box_iou(b.double(), t) for b, t in zip(out.boxes, targets)])
    true_before = torch.cat([paired_box_iou(b, t) for b, t in zip(boxes, targets)])
    assert true_after.mean() > true_before.mean() + 0.05
    torch.testing.assert_close(out.iou_after.double(), true_after, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.iou_before.double(), true_before, atol=1e-5, rtol=0)
    assert 1 <= out.iterations <= 5 and out.steps.max() <= out.iterations


def test_one_predictor_call_per_iteration_with_all_images():
    boxes, targets, sizes = _scene(n_img=4, per_img=5)
    calls = []
    out = IoURefiner(step=0.5, iterations=5)(_predictor(targets, calls), boxes, sizes)
    assert len(calls) == out.iterations + 1  # the initial gradient, then one check+gradient per step
    assert calls[0] == [5, 5, 5, 5]
    # frozen boxes leave the batch: the counts never grow
    assert all(sum(c) <= sum(p) for p, c in zip(calls, calls[1:]))


def test_boxes_stay_valid_and_inside_the_image_with_huge_steps():
    boxes, targets, sizes = _scene(seed=2)
    boxes[0][0] = torch.tensor([-5.0, -3.0, 100.0, 90.0], dtype=torch.float64)  # outside: clipped first
    out = IoURefiner(step=500.0, iterations=5)(_predictor(targets), boxes, sizes)
    h, w = sizes[0]
    for b in out.boxes:
        assert torch.isfinite(b).all()
        assert (b[:, 2:] - b[:, :2] >= 1.0 - 1e-6).all()
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()


def test_a_nan_gradient_freezes_the_box_where_it_is():
    boxes, targets, sizes = _scene(seed=5, n_img=1, per_img=3)
    seen = []

    def nan_for_row_1(bs, rows):
        seen.append(torch.cat(bs).detach().clone())
        iou = paired_box_iou(bs[0], torch.cat(targets)[rows[0]])
        return [torch.where(rows[0] == 1, iou * float("nan"), iou)]

    out = IoURefiner()(nan_for_row_1, boxes, sizes)
    assert all(torch.isfinite(x).all() for x in seen)  # the predictor never gets a NaN box
    torch.testing.assert_close(out.boxes[0][1].double(), boxes[0][1], atol=1e-5, rtol=0)
    assert out.steps[1] == 0 and torch.isfinite(out.boxes[0]).all()


def test_revert_variant_never_lowers_the_predicted_iou():
    boxes, targets, sizes = _scene(seed=3)
    predict = _predictor(targets)
    out = IoURefiner(step=3.0, revert_on_degrade=True, step_decay=0.5, iterations=8)(predict, boxes, sizes)
    assert (out.iou_after >= out.iou_before - 1e-6).all()
    plain = IoURefiner(step=3.0, iterations=8)(predict, boxes, sizes)
    assert (plain.iou_after < plain.iou_before - 1e-3).any()  # the plain algorithm does degrade at this step


def test_a_flat_predictor_freezes_every_box_after_one_step():
    boxes, _, sizes = _scene(seed=4)
    calls = []

    def flat(bs, rows):
        calls.append(1)
        return [b.sum(1) * 0 + 0.7 for b in bs]

    out = IoURefiner()(flat, boxes, sizes)
    assert out.iterations == 1 and len(calls) == 2
    h, w = sizes[0]
    clipped = torch.minimum(torch.cat(boxes).clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float64))
    torch.testing.assert_close(torch.cat(out.boxes).double(), clipped, atol=1e-5, rtol=0)


def test_empty_and_degenerate_inputs():
    out = IoURefiner()(_predictor([torch.zeros(0, 4)]), [torch.zeros(0, 4)], [(10, 10)])
    assert out.iterations == 0 and len(out.boxes[0]) == 0
    thin = [torch.tensor([[2.0, 2.0, 2.5, 8.0]])]  # narrower than 1 px: predicted, never moved
    out = IoURefiner()(_predictor([torch.tensor([[2.0, 2.0, 6.0, 8.0]])]), thin, [(10, 10)])
    assert out.iterations == 0 and torch.equal(out.boxes[0], thin[0])


@pytest.mark.parametrize("kwargs", [dict(step=0), dict(iterations=0), dict(top_k=0), dict(step_decay=0),
                                    dict(report_score="max"), dict(omega1=-1), dict(omega2=0.5)])
def test_bad_settings_are_one_clear_error(kwargs):
    with pytest.raises(ValueError, match="refiner"):
        IoURefiner(**kwargs)
