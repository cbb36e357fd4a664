"""A run is restored from what it recorded (its group choices, overrides and config), never by guessing; a
constructor's own error is a bug, not a user error."""
import shutil

import pytest
import yaml
from omegaconf import OmegaConf

from iouctl import config
from iouctl.cli.common import run_experiment
from iouctl.errors import ConfigError
from tests.lanes import sample

TINY = ["experiment=tiny", "data.num_train=8", "data.num_val=4"]


def _record(runs, command, overrides):
    """A run of `command` as the CLI opens it (config, overrides, choices), with nothing done in it."""
    run_experiment(command, [*overrides, f"paths.runs_dir={runs}"], False, lambda cfg, run: None)
    (d,) = (runs / command).iterdir()
    return d


def _restore(command, run_dir, given=()):
    """`command`'s config with the model/data/pool of the run in `run_dir` restored, as eval and refine do."""
    from iouctl.engine.inputs import RESTORED, restoring

    extra = restoring(command, run_dir, RESTORED, list(given))
    return config.compose(command, [*extra, *given], allow_missing=True)


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of conf/ that a test may edit (as a later version of iouctl would), used by every composition."""
    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    monkeypatch.setattr(config, "CONF_DIR", conf)
    return conf


def _edit(conf, option_file, key, value):
    text = (conf / option_file).read_text()
    lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines()]
    assert lines != text.splitlines(), key
    (conf / option_file).write_text("\n".join(lines) + "\n")


def test_a_run_records_its_group_choices(tmp_path):
    d = _record(tmp_path, "train", ["model=iou_net", *TINY])
    choices = yaml.safe_load((d / "choices.yaml").read_text())
    assert choices["model"] == "iou_net" and choices["experiment"] == "tiny" and choices["data"] == "shapes"
    assert choices["augment"] == "flip" and not any(k.startswith(("hydra", "schema")) for k in choices)
    assert yaml.safe_load((d / "overrides.yaml").read_text())[:2] == ["model=iou_net", "experiment=tiny"]


@pytest.mark.parametrize("recorded_choices", [True, False], ids=["choices", "older-run-without-choices"])
def test_a_key_added_to_the_option_since_the_run_takes_that_options_default(tmp_path, conf_copy, recorded_choices):
    d = _record(tmp_path, "train", ["model=iou_net", "model.box_score_thresh=0.1", *TINY])
    # the run predates iou_bins: its config.yaml lacks it; iou_net.yaml now has it, with its own default (7), and
    # faster_rcnn.yaml (the same _target_) another (10)
    saved = yaml.safe_load((d / "config.yaml").read_text())
    del saved["model"]["iou_bins"]
    (d / "config.yaml").write_text(yaml.safe_dump(saved))
    _edit(conf_copy, "model/iou_net.yaml", "iou_bins", 7)
    _edit(conf_copy, "model/iou_net.yaml", "jitter_per_gt", 4)  # a default changed since: the run keeps its 16
    if not recorded_choices:
        (d / "choices.yaml").unlink()

    cfg = _restore("eval", d)
    assert cfg.model.iou_bins == 7 and cfg.model.iou_head is True and cfg.name == "iou_net"
    assert cfg.model.jitter_per_gt == 16 and cfg.model.box_score_thresh == 0.1  # as the run had them
    assert cfg.data.num_train == 8 and cfg.data.num_val == 4 and cfg.data.image_size == 96  # experiment=tiny's 96
    assert OmegaConf.to_container(cfg.pool) == saved["pool"]


@pytest.mark.slow
def test_the_users_overrides_win(tmp_path):
    d = _record(tmp_path, "train", ["model=iou_net", "model.box_score_thresh=0.1", *TINY])
    cfg = _restore("eval", d, ["model.box_score_thresh=0.3", "data.num_val=2"])
    assert cfg.model.box_score_thresh == 0.3 and cfg.data.num_val == 2 and cfg.data.num_train == 8
    cfg = _restore("eval", d, ["model=iou_retina"])  # a group chosen anew keeps that option's values
    assert cfg.model._target_.endswith("retinanet") and cfg.model.min_size == 128 and cfg.data.num_train == 8
    assert cfg.name == "iou_retina"  # and the run is named for it, not for the restored iou_net


@pytest.mark.slow
def test_an_eval_run_restores_as_its_train_run_did(tmp_path):
    """An eval run records the choices its restore made: a refine of it gets the train run's model again."""
    d = _record(tmp_path, "train", ["model=iou_net", "model.box_score_thresh=0.1", *TINY])
    from iouctl.engine.inputs import RESTORED, restoring

    extra = restoring("eval", d, RESTORED, [])
    run_experiment("eval", [*extra, f"paths.runs_dir={tmp_path}"], False, lambda cfg, run: None)
    (e,) = (tmp_path / "eval").iterdir()
    assert yaml.safe_load((e / "choices.yaml").read_text())["model"] == "iou_net"
    cfg = _restore("refine", e)
    assert cfg.model.box_score_thresh == 0.1 and cfg.model.iou_head is True and cfg.data.num_train == 8


# ------------------------------------------------------------------------------------------ instantiate
def constructor_with_a_bug(**kwargs):
    raise ValueError("shape '[4, 5]' is invalid for input of size 7")


def constructor_refusing_a_value(x=0):
    raise ConfigError(f"x={x} is not valid; valid: >= 1")


def test_a_constructors_own_error_is_a_bug_and_keeps_its_type():
    node = OmegaConf.create({"_target_": f"{__name__}.constructor_with_a_bug", "x": 1})
    with pytest.raises(ValueError, match="is invalid for input of size 7") as e:
        config.instantiate(node)
    assert not isinstance(e.value, ConfigError)
    assert e.traceback[-1].name == "constructor_with_a_bug"  # the traceback reaches the constructor


@pytest.mark.parametrize("node, message", [
    ({"_target_": f"{__name__}.constructor_refusing_a_value", "x": 0}, "x=0 is not valid; valid: >= 1"),
    ({"_target_": "iouctl.models.no_such_model", "x": 0}, "Error locating target 'iouctl.models.no_such_model'"),
    ({"_target_": f"{__name__}.constructor_refusing_a_value", "x": "${nowhere}"}, "nowhere"),
])
def test_user_errors_while_instantiating_are_one_line(node, message):
    with pytest.raises(ConfigError) as e:
        config.instantiate(OmegaConf.create(node))
    assert message in str(e.value) and "\n" not in str(e.value) and "HYDRA_FULL_ERROR" not in str(e.value)


def test_a_constructor_bug_in_a_command_exits_1_with_the_traceback_in_the_log(tmp_path, capsys):
    def body(cfg, run):
        return config.instantiate(OmegaConf.create({"_target_": f"{__name__}.constructor_with_a_bug"}))

    with pytest.raises(Exception) as e:
        run_experiment("bench-pool", [f"paths.runs_dir={tmp_path}"], False, body)
    assert e.value.exit_code == 1
    (run_dir,) = (tmp_path / "bench-pool").iterdir()
    err = capsys.readouterr().err
    assert f"error: ValueError: shape '[4, 5]' is invalid for input of size 7 (traceback in {run_dir}/log)" in err
    log = (run_dir / "log").read_text()
    assert "Traceback (most recent call last)" in log and "in constructor_with_a_bug" in log


# ------------------------------------------------------------------------------------------ finding the run
@pytest.mark.slow
def test_nms_ablate_finds_the_detections_of_a_demos_train_step(tmp_path):
    """After `iouctl demo`, `iouctl nms-ablate --score iou` takes the detections of the demo's train step (a child
    run), scored against the data that step recorded."""
    import json

    from typer.testing import CliRunner

    from iouctl.cli import app
    from iouctl.runs import open_run

    runner = CliRunner()
    runs, data = tmp_path / "runs", ["data.num_train=8", "data.num_val=4", "data.image_size=64", "data.max_size=24"]
    r = runner.invoke(app, ["nms-ablate", "--synthetic", *data, f"paths.runs_dir={tmp_path / 'made'}"])
    assert r.exit_code == 0, r.output  # detections of the tiny dataset, recording their data, as a run makes them
    (made,) = (tmp_path / "made" / "nms-ablate").iterdir()
    choices: dict = {}
    given = ["model=iou_net", *data]
    trained = config.compose("train", given, choices=choices)
    with open_run("demo", "demo", runs, "name: demo\n", []) as demo:  # a demo whose train step made them
        step = demo.child("train")
        step.record_config(config.to_yaml(trained), given, choices)
        shutil.copy(made / "detections" / "val.npz", step.detections_path("val"))

    r = runner.invoke(app, ["nms-ablate", "--score", "iou", f"paths.runs_dir={runs}"])
    assert r.exit_code == 0, r.output
    (d,) = (runs / "nms-ablate").iterdir()
    results = json.loads((d / "results.json").read_text())
    assert results["source"] == str(step.dir / "detections" / "val.npz") and results["arms"]
    assert yaml.safe_load((d / "config.yaml").read_text())["data"]["num_val"] == 4  # the step's data, restored
    ops = json.loads((d / "meta.json").read_text())["ops"]  # what IoU-guided NMS ran on
    assert any("iou_guided" in op and ops[op]["impl"] in ("cpp", "reference") for op in ops), ops


@pytest.mark.parametrize("args, message", sample([
    (["eval"], "no completed train run under"),
    (["refine"], "no completed train/eval run of a model with a box-differentiable IoU head under"),
    (["nms-ablate", "--score", "iou"], "no completed eval/train run under"),
    (["refine", "run={runs}/nope"], "no such run folder"),
    (["eval", "run={demo}"], "has no checkpoints/last.pt"),
], 2))
def test_a_failed_lookup_makes_no_run_folder(tmp_path, args, message):
    from typer.testing import CliRunner

    from iouctl.cli import app
    from iouctl.runs import open_run

    runs = tmp_path / "runs"
    with open_run("demo", "demo", runs, "name: demo\n", []) as demo:
        demo.child("train")  # a step without a checkpoint or detections
    before = sorted(runs.rglob("*"))
    r = CliRunner().invoke(app, [*(a.format(runs=runs, demo=demo.dir) for a in args), f"paths.runs_dir={runs}"])
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert sorted(runs.rglob("*")) == before  # no run folder, FAILED or other
