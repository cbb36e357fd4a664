"""Each model evaluates with its paper's own post-processing (model.inference) unless nms= is given."""
import json

import pytest
from typer.testing import CliRunner

from iouctl.cli import app
from iouctl.engine.compose import compose
from iouctl.errors import ConfigError
from tests.lanes import sample

runner = CliRunner()


@pytest.mark.parametrize("command", sample(["train", "eval"], 2))
@pytest.mark.parametrize("model,target,score", [
    ("iou_retina", "GreedyNMS", "fused"), ("retina", "GreedyNMS", "cls"),
    ("iou_net", "IoUGuidedNMS", None), ("faster_rcnn", "GreedyNMS", "cls")])
def test_the_models_own_inference_by_default(command, model, target, score):
    cfg = compose(command, [f"model={model}"])
    assert cfg.nms._target_.endswith(target) and cfg.nms.get("score") == score


@pytest.mark.parametrize("model", ["retina", "iou_retina"])
@pytest.mark.parametrize("quality,score", sample([("none", "cls"), ("iou", "fused"), ("centerness", "fused"),
                                                  ("iou_cls", "cls"), ("qfl", "cls")], 2))
def test_a_retinanet_ranks_by_its_quality_heads_score(model, quality, score):
    """The RetinaNet options hold no inference of their own (null): model.quality decides it, so iou_retina with the
    IoU inside its classification score (iou_cls, qfl) does not ask for a fused score its detections cannot give."""
    cfg = compose("eval", [f"model={model}", f"model.quality={quality}"])
    assert cfg.nms._target_.endswith("GreedyNMS") and cfg.nms.score == score


@pytest.mark.slow
def test_nms_given_wins_and_nms_keys_refine_the_models_own():
    assert compose("eval", ["model=iou_retina", "nms=greedy"]).nms.score == "cls"
    assert compose("eval", ["model=iou_net", "nms=soft_linear"]).nms._target_.endswith("SoftNMS")
    cfg = compose("eval", ["model=iou_retina", "nms.iou_threshold=0.6"])
    assert (cfg.nms.score, cfg.nms.iou_threshold) == ("fused", 0.6)
    assert compose("eval", ["model=iou_retina", "model.inference=[\"nms=iou_guided\"]"]).nms._target_.endswith("IoUGuidedNMS")


def test_model_inference_holds_nms_overrides_only():
    with pytest.raises(ConfigError, match="model.inference holds 'optim.lr=1'"):
        compose("train", ["model=iou_retina", "model.inference=[\"optim.lr=1\"]"])


@pytest.mark.slow
def test_train_reports_and_uses_the_models_inference(tmp_path):
    r = runner.invoke(app, ["train", "model=iou_retina", "experiment=tiny", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 0, r.output
    assert "inference: nms=greedy nms.score=fused (the model's own: model.inference)" in r.stderr
    run = next((tmp_path / "train").iterdir())
    assert json.loads((run / "eval_val.json").read_text())["nms"] == "greedy[fused]@0.5"
    r = runner.invoke(app, ["eval", f"run={run}", "nms=greedy", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 0, r.output
    assert "inference: nms=greedy (given; the model's own: nms=greedy nms.score=fused)" in r.stderr
    ev = next((tmp_path / "eval").iterdir())
    assert json.loads((ev / "eval_val.json").read_text())["nms"] == "greedy[cls]@0.5"
