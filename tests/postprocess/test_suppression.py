"""The ranking scores of the NMS arms: the fused score takes its weight from the model that made the detections."""
import pytest
import torch

from iouctl.data.detections import Detections, DetectionsFormatError
from iouctl.postprocess.suppression import GreedyNMS, all_scores, ranking_score


def _dets(meta):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(20, 2, generator=g) * 20], dim=1)
    return Detections(torch.zeros(20, dtype=torch.int64), boxes, torch.ones(20, dtype=torch.int64),
                      torch.rand(20, generator=g), torch.rand(20, generator=g), meta)


@pytest.mark.parametrize("a", [0.0, 0.3, 0.5, 1.0])
def test_fused_score_uses_the_models_cls_weight(a):
    d = _dets({"cls_weight": a})
    want = d.scores.double() ** a * d.ious.double() ** (1 - a)
    torch.testing.assert_close(ranking_score(d, "fused").double(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(all_scores(d)["fused"], ranking_score(d, "fused"))


def test_detections_without_a_recorded_weight_use_the_papers():
    d = _dets({})
    torch.testing.assert_close(ranking_score(d, "fused"), (d.scores * d.ious).sqrt(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [1.5, -0.1, "half", True])
def test_a_bad_recorded_weight_is_one_line(bad):
    with pytest.raises(DetectionsFormatError, match="cls_weight"):
        ranking_score(_dets({"cls_weight": bad}), "fused")


def test_greedy_arm_ranks_by_the_fused_score_of_the_detections():
    d = _dets({"cls_weight": 0.2})
    kept = GreedyNMS(0.5, "fused").keep(d)
    s = ranking_score(d, "fused")
    assert torch.equal(kept.scores, s[kept.index])
    assert torch.all(kept.scores[:-1] >= kept.scores[1:])


def test_group_ids_number_image_class_pairs_in_order_and_follow_changes():
    from iouctl.postprocess.suppression import group_ids

    g = torch.Generator().manual_seed(1)
    n = 500
    img = torch.randint(0, 40, (n,), generator=g) * 7 - 3  # sparse ids, one negative
    lab = torch.randint(1, 91, (n,), generator=g)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, 1)
    d = Detections(img, boxes, lab, torch.rand(n, generator=g))
    # reference: rank of each (image, label) pair among the distinct pairs sorted lexicographically, in Python
    pairs = sorted(set(zip(img.tolist(), lab.tolist())))
    want = torch.tensor([pairs.index(p) for p in zip(img.tolist(), lab.tolist())])
    assert torch.equal(group_ids(d), want)
    assert group_ids(d) is group_ids(d)  # cached: every arm of a grid reads the same groups
    d.labels[0] = 95  # in place: the cache must notice
    pairs = sorted(set(zip(img.tolist(), d.labels.tolist())))
    assert torch.equal(group_ids(d), torch.tensor([pairs.index(p) for p in zip(img.tolist(), d.labels.tolist())]))
    d.labels = torch.ones(n, dtype=torch.int64)  # a new tensor
    pairs = sorted(set(img.tolist()))
    assert torch.equal(group_ids(d), torch.tensor([pairs.index(i) for i in img.tolist()]))
