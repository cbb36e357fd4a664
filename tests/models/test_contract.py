"""The detector contract (iouctl.models.contract): every detector of conf/model/, and every quality head, returns what
the contract says in train and eval mode and declares its score, inference, ious and capabilities consistently."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from hydra.utils import get_method
from omegaconf import OmegaConf

from iouctl import config, schema
from iouctl.engine.compose import own_inference
from iouctl.models import contract
from iouctl.models.contract import QUALITIES, Detector, check_eval_output, check_train_output, describe
from tests.lanes import sample
from tests.models.test_rcnn import one_thread  # noqa: F401 -- its autouse fixture: one intra-op thread
from tests.models.test_retina import spread_scores

NUM_CLASSES = 3
# Model keys that configure post-processing (the CLI passes the rest to the model's constructor)
POSTPROCESS_KEYS = {"inference", "cls_weight"}
# What each option of conf/model/ declares: (quality, ious_meaning, score, inference, box_differentiable_iou)
DEFAULTS = {
    "retina": ("none", None, "cls", ("nms=greedy",), False),
    "iou_retina": ("iou", "iou", "fused", ("nms=greedy", "nms.score=fused"), False),
    "faster_rcnn": ("none", None, "cls", ("nms=greedy",), False),
    "iou_net": ("iou", "iou", "iou", ("nms=iou_guided",), True),
}


def model_args(option: str, *overrides: str) -> tuple[object, dict]:
    """(builder, constructor arguments) of a conf/model option with test sizes; a config key the builder does not
    take, other than the post-processing ones, fails here (a key accepted and never used)."""
    node = config.compose("train", [f"model={option}", "model.min_size=64", "model.max_size=64", *overrides]).model
    builder = get_method(node._target_)
    params = inspect.signature(builder).parameters
    values = OmegaConf.to_container(node, resolve=True)
    unknown = set(values) - set(params) - POSTPROCESS_KEYS - {"_target_"}
    assert not unknown, f"conf/model/{option}.yaml keys its builder does not take: {sorted(unknown)}"
    return builder, {k: v for k, v in values.items() if k in params}


def build(option: str, *overrides: str):
    builder, args = model_args(option, *overrides)
    torch.manual_seed(0)
    return builder(**args, num_classes=NUM_CLASSES)


def batch():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 80, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[8.0, 8.0, 56.0, 40.0]]), "labels": torch.tensor([1])}]
    return images, targets


def test_the_quality_enum_is_one():
    assert schema.QUALITIES == contract.QUALITIES == tuple(contract.QUALITY_HEADS)


@pytest.mark.parametrize("option", sample(sorted(DEFAULTS), 2))
def test_every_model_option_declares_the_contract(option):
    model = build(option)
    assert isinstance(model, Detector)
    got = (model.quality, model.ious_meaning, model.score, tuple(model.inference), model.box_differentiable_iou)
    assert got == DEFAULTS[option]
    record = describe(model)
    assert json.loads(json.dumps(record)) == record and record["num_classes"] == NUM_CLASSES
    # what the CLI applies (a config's own inference, or null: its quality head's) is what the model declares
    node = config.compose("train", [f"model={option}"]).model
    assert tuple(own_inference(node)) == tuple(model.inference)


def test_a_module_without_the_attributes_is_not_a_detector():
    assert not isinstance(torch.nn.Linear(2, 2), Detector)


@pytest.mark.parametrize("option", sample(sorted(DEFAULTS)[::-1], 2))
def test_train_and_eval_outputs_follow_the_contract(option):
    model = build(option)
    images, targets = batch()
    check_train_output(model.train()(images, targets))
    model.eval()
    if hasattr(model, "head"):  # an untrained RetinaNet scores ~0.01 everywhere: below the threshold
        spread_scores(model)
    with torch.no_grad():
        out = model(images)
    check_eval_output(model, out, len(images))
    assert sum(len(d["boxes"]) for d in out) > 0  # the check saw detections
    if model.box_differentiable_iou:  # refinement's capability: the predicted IoU follows the box
        feats, sizes = model.features(images[:1])
        boxes = out[0]["boxes"][:3].clone().requires_grad_()
        iou = model.predict_iou(feats, [boxes], [out[0]["labels"][:3]], sizes)[0]
        assert torch.autograd.grad(iou.sum(), boxes)[0].abs().sum() > 0


@pytest.mark.parametrize("quality", sample(QUALITIES, 2))
def test_every_quality_head_follows_the_contract(quality):
    model = build("iou_retina", f"model.quality={quality}")
    head = contract.QUALITY_HEADS[quality]
    assert isinstance(model, Detector) and model.quality == quality
    assert (model.ious_meaning, model.score, model.inference) == (head.ious_meaning, head.score, head.inference)
    images, targets = batch()
    losses = model.train()(images, targets)
    check_train_output(losses)
    spread_scores(model.eval())
    with torch.no_grad():
        out = model(images)
    check_eval_output(model, out, len(images))
    assert ("ious" in out[0]) == (quality in ("iou", "centerness"))


@pytest.mark.parametrize("quality", QUALITIES)
def test_declared_inference_runs_on_what_the_model_outputs(quality):
    """The inference names conf/nms options and valid keys, and ranks by a score the model's output carries."""
    head = contract.QUALITY_HEADS[quality]
    options = [o.split("=", 1)[1] for o in head.inference if o.startswith("nms=")]
    assert len(options) == 1 and options[0] in config.group_options("nms")
    nms = config.compose("train", list(head.inference)).nms
    score = nms.get("score", "iou" if options[0] == "iou_guided" else "cls")
    assert score == head.score and score in schema.SCORES
    assert (score == "cls") == (head.ious_meaning is None)  # iou and fused need the "ious" the model outputs


def test_check_eval_output_catches_a_broken_output():
    model = build("iou_retina")
    good = [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(2, dtype=torch.int64), "scores": torch.ones(2),
             "ious": torch.ones(2)}]
    check_eval_output(model, good, 1)
    for broken in ({"ious": None}, {"labels": torch.full((2,), NUM_CLASSES)}, {"scores": torch.full((2,), 1.5)},
                   {"boxes": torch.zeros(2, 4, dtype=torch.float64)}):
        bad = [{**good[0], **broken}]
        if broken.get("ious", 0) is None:
            del bad[0]["ious"]
        with pytest.raises(contract.ContractError):
            check_eval_output(model, bad, 1)
