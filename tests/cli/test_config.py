"""Config composition: every option of every group composes and instantiates; bad overrides give one clear error."""
import os

import pytest
from omegaconf import OmegaConf

from iouctl import config
from iouctl.errors import ConfigError
from tests.lanes import sample

# The command whose primary config holds each group.
GROUP_COMMAND = {
    "paths": "train", "data": "train", "model": "train", "pool": "train", "optim": "train", "logger": "train",
    "nms": "eval", "refiner": "refine", "experiment": "train", "augment": "train",
}
EXTRA = {("data", "coco"): ["data.root=/nonexistent/coco"],
         ("experiment", "coco_r50_1x_iou_retina"): ["data.root=/d"], ("experiment", "coco_r50_iou_net"): ["data.root=/d"]}


def all_options():
    return [(g, o) for g in config.groups() if g != "schema" for o in config.group_options(g)]


def test_every_group_is_known():
    assert set(config.groups()) == set(GROUP_COMMAND)


@pytest.mark.parametrize("command", list(config.COMMAND_CONFIGS))
def test_every_primary_config_composes(command):
    cfg = config.compose(command, [])
    assert cfg.name and isinstance(cfg.seed, int)
    assert "${" not in OmegaConf.to_yaml(cfg)  # fully resolved


@pytest.mark.parametrize("group,option", sample(all_options(), 2))
def test_every_option_composes_and_instantiates(group, option):
    cfg = config.compose(GROUP_COMMAND[group], [f"{group}={option}", *EXTRA.get((group, option), [])])
    if group == "experiment":
        if option == "tiny":
            assert cfg.data.num_train == 16 and cfg.schedule.max_iters == 4
        else:
            assert cfg.name == option and cfg.model.backbone == "resnet50"
        return
    node = cfg.get(group)
    if group == "paths":
        assert set(node) == {"runs_dir", "cache_dir"}
        return
    if group == "model":
        import torch

        model = config.instantiate_model(node, num_classes=3, pool=config.instantiate(cfg.pool))
        assert isinstance(model, torch.nn.Module) and (model.quality == "iou") == option.startswith("iou_")
        return
    obj = config.instantiate(node)
    if node is None:
        assert group in ("refiner", "augment") and option == "none" and obj is None
        return
    target = node["_target_"]
    expected = target.rsplit(".", 1)[1]
    if node.get("_partial_"):
        assert obj.func.__name__ == expected
    else:
        assert type(obj).__name__ == expected


def test_experiment_recipe_pins_the_paper_schedule():
    cfg = config.compose("train", ["experiment=coco_r50_iou_net", "data.root=/d"])
    assert cfg.model.backbone == "resnet50" and cfg.batch_size == 16 and cfg.optim.lr == 0.01
    assert cfg.schedule.max_iters == 160000 and list(cfg.schedule.lr_steps) == [120000]
    assert cfg.data._target_.endswith("CocoData") and cfg.model.iou_head is True


@pytest.mark.parametrize("override,needle", sample([
    ("optim.lr=abc", "'optim.lr'"),
    ("seed=x", "'seed'"),
    ("model.iou_head=maybe", "'model.iou_head'"),
    ("optim.lrr=0.1", "valid keys under 'optim': _partial_, _target_, lr, momentum"),
    ("nosuchkey=1", "unknown config key 'nosuchkey'"),
    ("+nosuchkey=1", "unknown config key 'nosuchkey'"),
    ("schedule.max_iters=0", "schedule.max_iters=0 is not valid; valid: an integer >= 1"),
    ("model=yolo", "valid: faster_rcnn, iou_net, iou_retina, retina"),
    ("data=voc", "valid: coco, shapes"),
    ("experiment=nope", "for config group 'experiment'"),
    ("a b", "cannot parse override"),
    ("data=coco", "missing required value(s) data.root"),
], 2))
def test_bad_overrides_give_one_line(override, needle):
    with pytest.raises(ConfigError) as info:
        config.compose("train", override.split(" ") if override != "a b" else ["a b"])
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_types_are_coerced_by_the_schema():
    cfg = config.compose("train", ["optim.lr=1", "schedule.lr_steps=[5,7]", "clip_grad_norm=null"])
    assert isinstance(cfg.optim.lr, float) and list(cfg.schedule.lr_steps) == [5, 7] and cfg.clip_grad_norm is None


def test_env_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "c"))
    cfg = config.compose("train", [])
    assert cfg.paths.cache_dir == str(tmp_path / "c") and cfg.data.cache_dir == str(tmp_path / "c" / "datasets")


def test_paths_a_later_command_restores_are_recorded_absolute(tmp_path, monkeypatch):
    """`data.root=ds` typed in one folder must still name that dataset when nms-ablate/eval restore the run from
    another folder."""
    monkeypatch.chdir(tmp_path)
    cfg = config.compose("train", ["data=coco", "data.root=ds", "model.init_from=w.pth", "model.pretrained=imagenet"])
    assert cfg.data.root == str(tmp_path / "ds")
    assert cfg.model.init_from == os.path.join(tmp_path, "w.pth") and cfg.model.pretrained == "imagenet"
