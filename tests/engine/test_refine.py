"""`iouctl refine` at tiny scale: a tiny iou_net run refined end to end, checked against independent evaluation."""
import json

import pytest
import torch
from typer.testing import CliRunner

from iouctl.analysis import AP_KEYS, error_breakdown, evaluate
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
    # TIDE's breakdown before / after: "after" is that of the saved refined detections, computed again here; the
    # breakdown's AP at 0.5 / 0.75 is cocoeval's AP50 / AP75 of the same detections (at most 100 per image)
    after = [e.to_dict() for e in error_breakdown(gt, refined, (0.5, 0.75))]
    assert s["errors"]["after"] == after
    for when in ("before", "after"):
        assert [e["iou_threshold"] for e in s["errors"][when]] == [0.5, 0.75]
        assert s["errors"][when][0]["ap"] == pytest.approx(s[f"ap_{when}"]["AP50"], abs=1e-12)
        assert s["errors"][when][1]["ap"] == pytest.approx(s[f"ap_{when}"]["AP75"], abs=1e-12)
    md = (d / "results.md").read_text()
    assert "TIDE errors at IoU 0.75" in md and "| before |" in md and "| after |" in md
    assert "TIDE at IoU 0.5: localization errors" in r.output


def test_refine_markdown_shows_the_error_breakdown_and_reads_older_summaries():
    from iouctl.engine.refine import markdown

    ap = {k: 0.5 for k in AP_KEYS}
    s = {"refiner": "r", "nms": "n", "report_score": "cls", "images": 1, "boxes_refined": 2,
         "ap_before": ap, "ap_after": ap, "ap_delta": {k: 0.0 for k in AP_KEYS},
         "mean_true_iou_before": 0.6, "mean_true_iou_after": 0.7, "mean_true_iou_before_matched": 0.7,
         "mean_true_iou_after_matched": 0.8, "mean_pred_iou_before": 0.6, "mean_pred_iou_after": 0.7,
         "share_improved": 0.5, "share_worse": 0.1, "mean_steps": 2.0, "ms_per_image": 3.0}
    old = markdown(s)  # a summary written before the breakdown existed
    assert not any("TIDE" in line for line in old)

    def breakdown(loc: int, dloc: float) -> dict:
        counts = {"cls": 0, "loc": loc, "both": 0, "dupe": 1, "bkg": 0, "miss": 3}
        return {"iou_threshold": 0.75, "background_threshold": 0.1, "ap": 0.4,
                "dap": {k: (dloc if k == "loc" else 0.0) for k in counts}, "special_dap": {"fp": 0.1, "fn": None},
                "counts": counts, "num_detections": 9, "num_tp": 5, "num_ignored": 0, "num_gt": 8}

    s["errors"] = {"before": [breakdown(4, 0.12)], "after": [breakdown(1, 0.03)]}
    md = "\n".join(markdown(s))
    assert "- TIDE at IoU 0.75: localization errors 4 -> 1 (dAP 12.00 -> 3.00), duplicates 1 -> 1, missed 3 -> 3" in md
    assert "| before | 40.0 | 0.00 (0) | 12.00 (4) |" in md and "| after | 40.0 | 0.00 (0) | 3.00 (1) |" in md


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
