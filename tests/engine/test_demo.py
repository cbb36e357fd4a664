"""`iouctl demo` end to end at tiny scale: every step's files, a report built from the runs it made."""
import json

import pytest
from typer.testing import CliRunner

from iouctl.cli import app

runner = CliRunner()
TRAIN = ["model=iou_net", "schedule.max_iters=4", "schedule.warmup_iters=1", "schedule.lr_steps=[3]", "batch_size=2",
         "num_workers=0", "model.min_size=64", "model.max_size=64", "model.box_score_thresh=0.0"]
TINY_TRAIN = "train_overrides=[" + ",".join(f"'{o}'" for o in TRAIN) + "]"  # Hydra: quoted list items


@pytest.mark.slow
def test_demo_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(app, ["demo", "data.num_train=8", "data.num_val=4", "data.image_size=64", "data.max_size=24",
                            TINY_TRAIN, f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = list((tmp_path / "runs" / "demo").iterdir())
    assert (d / "status").read_text().strip() == "COMPLETED"
    summary = json.loads((d / "summary.json").read_text())
    assert list(summary["steps"]) == ["data", "train", "nms-ablate", "refine", "bench-pool"]
    # each step's numbers are those its own folder holds
    ablation = json.loads((d / "nms_ablate" / "results.json").read_text())
    assert ablation["arms"] == summary["steps"]["nms-ablate"]["arms"]
    assert ablation["source"] == str(d / "train" / "detections" / "val.npz")
    refine = json.loads((d / "refine" / "refine.json").read_text())
    assert refine == summary["steps"]["refine"] and refine["boxes_refined"] > 0
    ev = json.loads((d / "train" / "eval_val.json").read_text())
    assert ev["metrics"]["AP"] == summary["steps"]["train"]["eval"]["metrics"]["AP"]
    report = (d / "report.md").read_text()
    baseline = ablation["arms"][0]
    assert f"| {baseline['arm']} | {100 * baseline['AP']:.1f} |" in report
    assert f"mean true IoU of the refined boxes: {refine['mean_true_iou_before']:.4f}" in report
    for link in ("nms_ablate/plots/ap_vs_iou_threshold.png", "bench_pool/plots/bench_pool.png",
                 "refine/plots/true_iou_before_after.png", "train/plots/score_vs_true_iou_val.png"):
        assert link in report and (d / link).is_file()
    assert (d / "train" / "checkpoints" / "last.pt").is_file()
    # the demo's train folder is a run that refine can be pointed at later
    r = runner.invoke(app, ["refine", f"run={d / 'train'}", f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output


def test_demo_bad_step_override_fails_before_running(tmp_path):
    r = runner.invoke(app, ["demo", "data.seed=abc", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "'data.seed'" in r.stderr
    assert not any(tmp_path.iterdir())
    r = runner.invoke(app, ["demo", "train_overrides=['optim.lr=abc']", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "optim.lr" in r.stderr
    r = runner.invoke(app, ["demo", "steps=[data,refine]", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "needs the 'train' step" in r.stderr
    assert not any(tmp_path.iterdir())
