"""The post-processing arms (conf/nms/{diou,matrix,cluster,box_voting,wbf}.yaml): config files, per-(image, class)
behaviour against the single-group ops run one group at a time, and what they do to the detections."""
from __future__ import annotations

import inspect

import pytest
import torch
import torchvision

from iouctl import config, schema
from iouctl.data.detections import Detections
from iouctl.errors import IouctlError
from iouctl.ops import postprocess as ops
from iouctl.postprocess.suppression import GreedyNMS, Kept, NoPredictedIoU
from iouctl.postprocess.suppression import KeptBoxes
from iouctl.postprocess.variants import BoxVoting, ClusterNMS, DIoUNMS, MatrixNMS, WeightedBoxesFusion
from tests.lanes import sample

OPTIONS = {"diou": DIoUNMS, "matrix": MatrixNMS, "cluster": ClusterNMS, "box_voting": BoxVoting,
           "wbf": WeightedBoxesFusion}


def detections(n_images=4, per_image=120, n_classes=3, seed=0, with_ious=True, spread=0.1):
    """Pre-NMS-like detections: jittered copies of random objects in 200 x 200 images (ids 10, 11, ...)."""
    g = torch.Generator().manual_seed(seed)
    image_ids, boxes, labels = [], [], []
    for im in range(n_images):
        k = 8
        side = 20 + torch.rand(k, generator=g) * 60
        ctr = 40 + torch.rand(k, 2, generator=g) * 120
        cls = torch.randint(1, n_classes + 1, (k,), generator=g)
        which = torch.randint(0, k, (per_image,), generator=g)
        jit = torch.randn(per_image, 4, generator=g) * spread
        wh = side[which, None] * torch.exp(jit[:, 2:])
        xy = ctr[which] + jit[:, :2] * side[which, None]
        boxes.append(torch.cat([xy - wh / 2, xy + wh / 2], 1).clamp(0, 200))
        labels.append(cls[which])
        image_ids.append(torch.full((per_image,), 10 + im))
    n = n_images * per_image
    scores = torch.rand(n, generator=g)
    ious = torch.rand(n, generator=g) if with_ious else None
    return Detections(torch.cat(image_ids), torch.cat(boxes), torch.cat(labels), scores, ious,
                      meta={"model": "test", "cls_weight": 0.5})


def per_group(dets, fn, k):
    """fn(rows of one (image, class)) -> (kept rows, reported scores[, boxes]) run group by group; then the k best
    reported scores of each image (ties: row order). The arms' contract, written with one op call per group."""
    out = []
    for img in dets.image_ids.unique().tolist():
        parts = []
        for c in dets.labels[dets.image_ids == img].unique().tolist():
            rows = torch.nonzero((dets.image_ids == img) & (dets.labels == c))[:, 0]
            parts.append(fn(rows))
        cols = [torch.cat(c) for c in zip(*parts)]
        order = sorted(range(len(cols[0])), key=lambda q: (-float(cols[1][q]), int(cols[0][q])))[:k]
        out.append([c[order] for c in cols])
    return [torch.cat(c) for c in zip(*out)]


# ----------------------------------------------------------------------------------------------- config files
@pytest.mark.parametrize("option", OPTIONS)
def test_option_file_builds_its_arm_with_the_documented_defaults(option):
    node = config.option_node("nms", option)
    arm = config.instantiate(node)
    assert type(arm) is OPTIONS[option]
    params = inspect.signature(OPTIONS[option]).parameters
    keys = [k for k in node if k != "_target_"]
    assert set(keys) == set(params)  # every constructor argument is a config key, and no other (no cls_weight)
    for k in keys:
        assert node[k] == params[k].default, f"conf/nms/{option}.yaml {k}={node[k]} vs the class default"
    assert arm.name and not arm.needs_iou


@pytest.mark.parametrize("override,match", sample([
    ("nms=diou nms.beta=0", "nms.beta=0.0 is not valid"),
    ("nms=matrix nms.kernel=box", "nms.kernel=box is not valid; valid: one of gaussian, linear"),
    ("nms=cluster nms.weight_threshold=1.5", "nms.weight_threshold=1.5 is not valid"),
    ("nms=cluster nms.max_iterations=0", "nms.max_iterations=0 is not valid"),
    ("nms=box_voting nms.vote_threshold=0", "nms.vote_threshold=0.0 is not valid"),
    ("nms=wbf nms.conf_type=box_and_model_avg", "nms.conf_type=box_and_model_avg is not valid"),
    ("nms=wbf nms.cls_weight=0.5", "unknown config key 'nms.cls_weight'"),
], 2))
def test_bad_values_are_refused_at_composition(override, match):
    with pytest.raises(IouctlError, match=match) as e:
        config.compose("nms-ablate", override.split())
    assert "\n" not in str(e.value)


def test_schema_choices_are_the_ops_constants():
    assert schema.MATRIX_KERNELS == ops.MATRIX_KERNELS and schema.WBF_CONF_TYPES == ops.WBF_CONF_TYPES


@pytest.mark.parametrize("make,match", [
    (lambda: DIoUNMS(beta=-1), "nms.beta must be > 0"),
    (lambda: MatrixNMS(kernel="box"), "nms.kernel must be one of"),
    (lambda: ClusterNMS(spm=1), "nms.spm must be True or False"),
    (lambda: ClusterNMS(max_iterations=0), "nms.max_iterations must be an integer >= 1"),
    (lambda: BoxVoting(vote_threshold=1.5), "nms.vote_threshold must be > 0 and <= 1"),
    (lambda: WeightedBoxesFusion(conf_type="sum"), "nms.conf_type must be one of 'avg', 'max'"),
    (lambda: WeightedBoxesFusion(iou_threshold=2), "nms.iou_threshold must be >= 0 and <= 1"),
    (lambda: DIoUNMS(score="quality"), "nms.score='quality' is not valid"),
    (lambda: MatrixNMS(max_per_image=0), "nms.max_per_image must be an integer >= 1"),
])
def test_bad_constructor_arguments_are_one_line(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_names_tell_swept_settings_apart():
    arms = [DIoUNMS(0.5), DIoUNMS(0.6), DIoUNMS(0.5, beta=0.6), DIoUNMS(0.5, score="iou"),
            MatrixNMS(), MatrixNMS("linear"), MatrixNMS(sigma=0.5),
            ClusterNMS(), ClusterNMS(spm=True), ClusterNMS(spm=True, sigma=0.5), ClusterNMS(distance=True),
            ClusterNMS(weighted=True), ClusterNMS(spm=True, distance=True, weighted=True),
            BoxVoting(), BoxVoting(vote_threshold=0.7), WeightedBoxesFusion(), WeightedBoxesFusion(conf_type="max"),
            WeightedBoxesFusion(skip_box_threshold=0.1), GreedyNMS(0.5)]
    names = [a.name for a in arms]
    assert len(set(names)) == len(names), names
    assert ClusterNMS(spm=True, distance=True, weighted=True).name == "cluster+spm+d+w[cls]@0.5"


# ------------------------------------------------------------------------------------------- arm behaviour
@pytest.mark.parametrize("score", ["cls", "iou", "fused"])
def test_diou_arm_is_diou_nms_per_image_and_class(score):
    dets = detections(seed=1)
    arm = DIoUNMS(0.5, beta=0.6, score=score, max_per_image=30)
    s = {"cls": dets.scores, "iou": dets.ious, "fused": dets.scores.sqrt() * dets.ious.sqrt()}[score]  # a = 0.5
    kept = arm.keep(dets)
    assert type(kept) is Kept and arm.needs_iou == (score != "cls")
    want_rows, want_scores = per_group(
        dets, lambda r: (lambda k: (r[k], s[r][k]))(ops.diou_nms(dets.boxes[r], s[r], 0.5, 0.6)), 30)
    assert kept.index.tolist() == want_rows.tolist()
    torch.testing.assert_close(kept.scores, want_scores, rtol=1e-6, atol=0)


def test_diou_arm_keeps_boxes_greedy_nms_merges():
    dets = detections(seed=2)
    diou = DIoUNMS(0.5, max_per_image=10**6).keep(dets)
    greedy = GreedyNMS(0.5, max_per_image=10**6).keep(dets)
    assert len(diou.index) > len(greedy.index)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_arm_ranks_every_box_by_its_decayed_score(kernel):
    dets = detections(seed=3)
    kept = MatrixNMS(kernel, max_per_image=25).keep(dets)
    want_rows, want_scores = per_group(
        dets, lambda r: (r, ops.matrix_nms(dets.boxes[r], dets.scores[r], kernel)), 25)
    assert kept.index.tolist() == want_rows.tolist()
    torch.testing.assert_close(kept.scores, want_scores, rtol=1e-6, atol=0)
    assert bool((kept.scores <= dets.scores[kept.index]).all()) and bool((kept.scores < dets.scores[kept.index]).any())
    assert torch.bincount(dets.image_ids[kept.index] - 10).tolist() == [25] * 4  # nothing removed: k per image


@pytest.mark.parametrize("variant", [dict(), dict(spm=True), dict(distance=True), dict(weighted=True),
                                     dict(spm=True, distance=True, weighted=True)])
def test_cluster_arm_is_cluster_nms_per_image_and_class(variant):
    dets = detections(seed=4, spread=0.05)
    arm = ClusterNMS(0.5, **variant, max_per_image=40)
    kept = arm.keep(dets)
    assert isinstance(kept, KeptBoxes) == arm.moves_boxes == bool(variant.get("weighted"))

    def one(r):
        out = ops.cluster_nms(dets.boxes[r], dets.scores[r], 0.5, **variant)
        return (r[out[0]], out[1], out[2] if len(out) == 3 else dets.boxes[r][out[0]])

    want = per_group(dets, one, 40)
    assert kept.index.tolist() == want[0].tolist()
    torch.testing.assert_close(kept.scores, want[1], rtol=1e-6, atol=0)
    if variant == {}:
        greedy = GreedyNMS(0.5, max_per_image=40).keep(dets)
        assert torch.equal(kept.index, greedy.index)  # plain Cluster-NMS is greedy NMS
    if arm.moves_boxes:
        out = kept.apply(dets)
        torch.testing.assert_close(out.boxes, want[2], rtol=1e-6, atol=1e-4)
        assert not torch.equal(out.boxes, dets.boxes[kept.index])


def test_box_voting_arm_moves_kept_boxes_and_keeps_the_rest():
    dets = detections(seed=5, spread=0.05)
    kept = BoxVoting(0.5, max_per_image=30).keep(dets)
    greedy = GreedyNMS(0.5, max_per_image=30).keep(dets)
    assert isinstance(kept, KeptBoxes)
    assert torch.equal(kept.index, greedy.index) and torch.equal(kept.scores, greedy.scores)
    want = per_group(dets, lambda r: (lambda k, b: (r[k], dets.scores[r][k], b))(
        *ops.box_voting(dets.boxes[r], dets.scores[r], 0.5)), 30)
    out = kept.apply(dets)
    assert torch.equal(out.boxes, want[2])
    assert torch.equal(out.image_ids, dets.image_ids[kept.index]) and torch.equal(out.labels, dets.labels[kept.index])
    assert torch.equal(out.scores, dets.scores[kept.index]) and torch.equal(out.ious, dets.ious[kept.index])
    assert out.meta == dets.meta and float((out.boxes - dets.boxes[kept.index]).abs().max()) > 0.5


def test_box_voting_localizes_better_than_greedy_on_noisy_copies():
    # 30 boxes per object, each the object plus independent noise, scores unrelated to the noise: the voted box
    # averages the noise out, the greedy box keeps one sample's.
    g = torch.Generator().manual_seed(6)
    objects = torch.tensor([[20, 20, 80, 90], [100, 30, 170, 100], [40, 120, 150, 190.0]])
    boxes = objects.repeat_interleave(30, 0) + torch.randn(90, 4, generator=g) * 3
    dets = Detections(torch.zeros(90, dtype=torch.long), boxes, torch.ones(90, dtype=torch.long),
                      torch.rand(90, generator=g), meta={})
    true_iou = {}
    for name, arm in (("greedy", GreedyNMS(0.5)), ("voting", BoxVoting(0.5, vote_threshold=0.7)),
                      ("wbf", WeightedBoxesFusion()), ("cluster+w", ClusterNMS(weighted=True))):
        out = arm(dets)
        assert len(out) == 3
        true_iou[name] = float(torchvision.ops.box_iou(out.boxes, objects).max(1).values.mean())
    assert true_iou["voting"] > true_iou["greedy"] + 0.02
    assert true_iou["wbf"] > true_iou["greedy"] + 0.02 and true_iou["cluster+w"] > true_iou["greedy"]


@pytest.mark.parametrize("conf_type", ["avg", "max"])
def test_wbf_arm_fuses_per_image_and_class(conf_type):
    dets = detections(seed=7)
    kept = WeightedBoxesFusion(conf_type=conf_type, max_per_image=20).keep(dets)
    assert isinstance(kept, KeptBoxes)
    want = per_group(dets, lambda r: (lambda i, b, s: (r[i], s, b))(
        *ops.batched_weighted_boxes_fusion(dets.boxes[r], dets.scores[r], None, conf_type=conf_type)), 20)
    assert kept.index.tolist() == want[0].tolist()
    out = kept.apply(dets)
    assert torch.equal(out.boxes, want[2]) and torch.equal(out.scores, want[1])
    assert torch.equal(out.labels, dets.labels[kept.index]) and torch.equal(out.image_ids, dets.image_ids[kept.index])
    if conf_type == "max":
        assert torch.equal(out.scores, dets.scores[kept.index])  # a cluster's first box has its best score


@pytest.mark.parametrize("option", OPTIONS)
def test_empty_detections_and_needs_iou(option):
    arm = OPTIONS[option]()
    empty = detections(n_images=1, per_image=0)
    kept = arm.keep(empty)
    assert kept.index.shape == (0,) and len(kept.apply(empty)) == 0
    no_iou = detections(n_images=2, per_image=20, with_ious=False)
    assert len(OPTIONS[option]().keep(no_iou).index) > 0
    with pytest.raises(NoPredictedIoU, match="needs predicted IoUs"):
        OPTIONS[option](score="iou").keep(no_iou)


@pytest.mark.parametrize("option", OPTIONS)
def test_max_per_image(option):
    dets = detections(seed=8, per_image=200)
    kept = OPTIONS[option](max_per_image=7).keep(dets)
    counts = torch.bincount(dets.image_ids[kept.index] - 10)
    assert counts.max() <= 7 and counts.sum() == len(kept.index) > 0
    ids = dets.image_ids[kept.index].tolist()
    assert ids == sorted(ids)  # image by image
    for img in set(ids):
        s = kept.scores[dets.image_ids[kept.index] == img]
        assert torch.equal(s, s.sort(descending=True).values)  # best first
