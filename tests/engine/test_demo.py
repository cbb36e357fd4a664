"""`iouctl demo` end to end at tiny scale: every step's files, a report built from the runs it made."""
import json

import pytest
from typer.testing import CliRunner

from iouctl.cli import app

runner = CliRunner()
TRAIN = ["model=iou_net", "schedule.max_iters=4", "schedule.warmup_iters=1", "schedule.lr_steps=[3]", "batch_size=2",
         "num_workers=0", "model.min_size=64", "model.max_size=64", "model.box_score_thresh=0.0"]
RETINA = ["schedule.max_iters=4", "schedule.warmup_iters=1", "schedule.lr_steps=[3]", "batch_size=2", "num_workers=0",
          "model.min_size=64", "model.max_size=64"]


def _listed(key, overrides):
    return f"{key}=[" + ",".join(f"'{o}'" for o in overrides) + "]"  # Hydra: quoted list items


TINY_TRAIN = _listed("train_overrides", TRAIN)
TINY_RETINA = _listed("single_stage_overrides", RETINA)
ALL_STEPS = ["data", "train", "nms-ablate", "refine", "train-retina", "train-iou-retina", "nms-iou-retina",
             "bench-pool"]


@pytest.mark.slow
def test_demo_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(app, ["demo", "data.num_train=8", "data.num_val=4", "data.image_size=64", "data.max_size=24",
                            TINY_TRAIN, TINY_RETINA, f"steps=[{','.join(ALL_STEPS)}]",
                            f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = list((tmp_path / "runs" / "demo").iterdir())
    assert (d / "status").read_text().strip() == "COMPLETED"
    summary = json.loads((d / "summary.json").read_text())
    assert list(summary["steps"]) == ALL_STEPS
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
                 "refine/plots/true_iou_before_after.png", "train/plots/score_vs_true_iou_val.png",
                 "train_iou_retina/plots/score_vs_true_iou_val.png"):
        assert link in report and (d / link).is_file()
    assert (d / "train" / "checkpoints" / "last.pt").is_file()

    # the single-stage half: each RetinaNet with its own inference, the same schedule, and iou_retina's cls vs fused
    iou = json.loads((d / "train_iou_retina" / "eval_val.json").read_text())
    base = json.loads((d / "train_retina" / "eval_val.json").read_text())
    assert iou["nms"] == "greedy[fused]@0.5" and base["nms"] == "greedy[cls]@0.5"
    assert summary["steps"]["train-iou-retina"]["model"] == "iou_retina"
    assert summary["steps"]["train-retina"]["model"] == "retina"
    assert summary["steps"]["train-iou-retina"]["iterations"] == summary["steps"]["train-retina"]["iterations"] == 4
    arms = json.loads((d / "nms_iou_retina" / "results.json").read_text())
    assert arms["source"] == str(d / "train_iou_retina" / "detections" / "val.npz")
    assert [r["arm"] for r in arms["arms"]] == ["greedy[cls]@0.5", "greedy[fused]@0.5"]
    # the fused arm is the model's own inference on the same detections: the train step's numbers exactly
    fused = arms["arms"][1]
    assert all(fused[k] == iou["metrics"][k] for k in ("AP", "AP50", "AP75", "AP90"))
    assert f"| iou_retina | `greedy[cls]@0.5` | {100 * arms['arms'][0]['AP']:.1f} |" in report
    assert f"| retina | `greedy[cls]@0.5` (its own) | {100 * base['metrics']['AP']:.1f} |" in report
    assert f"dAP {100 * (fused['AP'] - arms['arms'][0]['AP']):+.1f}" in report
    gain = 100 * (iou["metrics"]["AP"] - base["metrics"]["AP"])
    assert f"iou_retina (its own inference) vs retina: dAP {gain:+.1f}" in report
    for step in ("train_iou_retina", "train_retina"):  # runs later commands find as train runs
        assert json.loads((d / step / "meta.json").read_text())["command"] == "train"
        assert (d / step / "checkpoints" / "last.pt").is_file()

    # the demo's train folder is a run that refine can be pointed at later
    r = runner.invoke(app, ["refine", f"run={d / 'train'}", f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    # and iou_retina's: not refinable, as its recorded contract says (its IoU belongs to an anchor, not a box)
    r = runner.invoke(app, ["refine", f"run={d / 'train_iou_retina'}", f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 2 and "no box-differentiable IoU head" in r.stderr


@pytest.mark.slow
def test_demo_bad_step_override_fails_before_running(tmp_path):
    r = runner.invoke(app, ["demo", "data.seed=abc", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "'data.seed'" in r.stderr
    assert not any(tmp_path.iterdir())
    r = runner.invoke(app, ["demo", "train_overrides=['optim.lr=abc']", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "optim.lr" in r.stderr
    r = runner.invoke(app, ["demo", "single_stage_overrides=['schedule.max_iters=-1']", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "schedule.max_iters" in r.stderr
    r = runner.invoke(app, ["demo", "steps=[data,refine]", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "needs the 'train' step" in r.stderr
    r = runner.invoke(app, ["demo", "steps=[data,nms-iou-retina,train-iou-retina]", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "'nms-iou-retina' needs the 'train-iou-retina' step before it" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_default_demo_trains_both_detector_families():
    """conf/demo.yaml: iou_net's study, and iou_retina with its own inference and its cls vs fused arms."""
    from iouctl.engine.compose import compose
    from iouctl.engine.demo import plan

    cfg = compose("demo", [])
    steps = plan(cfg, [])
    assert list(steps) == [s for s in cfg.steps if s != "data"]  # the data step has no config of its own
    assert {"train", "train-iou-retina", "nms-iou-retina"} <= set(steps) and "train-retina" not in steps
    assert steps["train"].cfg.model.iou_head is True and steps["train"].cfg.nms._target_.endswith("IoUGuidedNMS")
    iou = steps["train-iou-retina"].cfg
    assert iou.model.quality == "iou" and iou.nms.score == "fused"  # its own inference: greedy by the fused score
    ablate = steps["nms-iou-retina"].cfg
    assert list(ablate.methods) == ["greedy"] and list(ablate.scores) == ["cls", "fused"]
    assert ablate.data == iou.data  # scored against the data it was trained on
