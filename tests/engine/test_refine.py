"""`iouctl refine` at tiny scale: a tiny iou_net run refined end to end, checked against independent evaluation."""
import json

import pytest
import torch
from typer.testing import CliRunner

from iouctl.analysis import evaluate
from iouctl.cli import app
from iouctl.data.detections import Detections
from iouctl.postprocess.suppression import IoUGuidedNMS

pytestmark = pytest.mark.slow  # every test shares the module fixture that trains two models

runner = CliRunner()
TINY = ["experiment=tiny", "data.num_train=8", "data.num_val=4", "data.image_size=64", "data.max_size=24",
        "model.min_size=64", "model.max_size=64", "optim.lr=0.005"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny iou_net run and one tiny iou_retina run, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("refine")
    mp = pytest.MonkeyPatch()
    mp.setenv("IOUCTL_CACHE_DIR", str(root / "cache"))
    runs = root / "runs"
    for model in ("iou_net", "iou_retina"):
        r = runner.invoke(app, ["train", f"model={model}", *TINY, "model.box_score_thresh=0.0" if model == "iou_net"
                                else "model.score_thresh=0.0", f"paths.runs_dir={runs}"])
        assert r.exit_code == 0, r.output
    yield runs
    mp.undo()


def _run_dirs(runs, command):
    return sorted((runs / command).iterdir()) if (runs / command).is_dir() else []


def _train_dir(runs, model):
    (d,) = [d for d in _run_dirs(runs, "train") if f"_{model}" in d.name]
    return d


def test_refine_an_iou_net_run(trained):
    train_dir = _train_dir(trained, "iou_net")
    r = runner.invoke(app, ["refine", f"run={train_dir}", f"paths.runs_dir={trained}", "refiner.step=2.0"])
    assert r.exit_code == 0, r.output
    d = _run_dirs(trained, "refine")[-1]
    s = json.loads((d / "refine.json").read_text())
    assert s["boxes_refined"] > 0 and s["images"] > 0 and 1 <= max(s["iterations_per_batch"]) <= 5
    assert (d / "plots" / "true_iou_before_after.png").stat().st_size > 0
    # "before" is IoU-guided NMS on the run's own raw detections, evaluated independently here
    raw = Detections.load(train_dir / "detections" / "val.npz")
    gt = next((trained.parent / "cache").rglob("instances_val.json"))
    expect = evaluate(gt, IoUGuidedNMS(0.5, 100)(raw))
    assert s["ap_before"]["AP"] == pytest.approx(expect["AP"], abs=1e-12)
    refined = Detections.load(d / "detections" / "refined_val.npz")
    assert len(refined) == s["boxes_refined"]  # top_k=100 >= the kept boxes per image: every kept box moves
    assert s["ap_after"]["AP"] == pytest.approx(evaluate(gt, refined)["AP"], abs=1e-12)
    b = refined.boxes
    assert torch.isfinite(b).all() and (b[:, 2:] > b[:, :2]).all() and (b >= 0).all() and (b <= 64).all()
    moved = (refined.boxes - IoUGuidedNMS(0.5, 100)(raw).boxes).abs().amax(1) > 1e-4
    assert moved.any()
    assert s["share_improved"] + s["share_worse"] <= 1.0
    for key in ("mean_true_iou_before", "mean_true_iou_after", "mean_pred_iou_before", "mean_pred_iou_after"):
        assert 0.0 <= s[key] <= 1.0
    assert "mean true IoU" in r.output and "AP90" in r.output


def test_refine_an_eval_run_and_refiner_none(trained):
    train_dir = _train_dir(trained, "iou_net")
    r = runner.invoke(app, ["eval", f"run={train_dir}", f"paths.runs_dir={trained}", "model.box_score_thresh=0.0"])
    assert r.exit_code == 0, r.output
    eval_dir = [d for d in _run_dirs(trained, "eval") if (d / "source.json").is_file()][-1]
    r = runner.invoke(app, ["refine", f"run={eval_dir}", f"paths.runs_dir={trained}", "refiner=none"])
    assert r.exit_code == 0, r.output
    s = json.loads((_run_dirs(trained, "refine")[-1] / "refine.json").read_text())
    assert s["refiner"] == "none" and s["ap_before"] == s["ap_after"]


def test_refine_without_a_run_picks_the_latest_iou_net_run(trained):
    r = runner.invoke(app, ["refine", f"paths.runs_dir={trained}"])
    assert r.exit_code == 0, r.output


def test_a_model_without_a_box_iou_head_is_one_line(trained):
    before = _run_dirs(trained, "refine")
    r = runner.invoke(app, ["refine", f"run={_train_dir(trained, 'iou_retina')}", f"paths.runs_dir={trained}"])
    assert r.exit_code == 2
    assert "no box-differentiable IoU head" in r.output and "model=iou_net" in r.output
    assert _run_dirs(trained, "refine") == before  # no run directory for a refused command


def test_missing_run_and_bad_settings(trained, tmp_path):
    r = runner.invoke(app, ["refine", f"run={tmp_path / 'nope'}", f"paths.runs_dir={trained}"])
    assert r.exit_code == 2 and "no such run folder" in r.output
    r = runner.invoke(app, ["refine", f"paths.runs_dir={tmp_path / 'empty'}"])
    assert r.exit_code == 2 and "iouctl train model=iou_net" in r.output
    r = runner.invoke(app, ["refine", "refiner.report_score=max", f"paths.runs_dir={trained}"])
    assert r.exit_code == 2 and "report_score" in r.output
