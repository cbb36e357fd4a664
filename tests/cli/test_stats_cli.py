"""`iouctl data stats` and model sizes `auto` through the Typer app: printed tables and suggestions, stats.json
against numpy on the annotation file, sizes recorded in a train run's config.yaml and restored by eval."""
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from iouctl.cli import app
from tests.lanes import sample

runner = CliRunner()
TINY_DATA = ["data.num_train=8", "data.num_val=4", "data.image_size=64", "data.max_size=24"]
TINY_TRAIN = ["experiment=tiny", "optim.lr=0.005"]


@pytest.fixture
def env(tmp_path):
    return tmp_path


def _shapes(env):
    """The tiny built-in dataset, generated under the test's folder (compiled kernels stay in the session cache)."""
    return [*TINY_DATA, f"data.cache_dir={env / 'cache' / 'datasets'}"]


def _runs(root, command):
    return sorted((root / "runs" / command).iterdir())


def _coco_folder(root):
    """A COCO folder: 3 train images of 120x90 (one without width/height in the JSON), custom class names, a crowd
    box, an image without boxes; val the same file."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (120, 90)).save(root / "img" / f"{i}.jpg")
    images = [{"id": 1, "file_name": "0.jpg", "width": 120, "height": 90}, {"id": 2, "file_name": "1.jpg"},
              {"id": 3, "file_name": "2.jpg", "width": 120, "height": 90}]
    boxes = [(1, 10, 20, 1), (1, 30, 12, 2), (1, 6, 6, 1), (2, 40, 40, 2), (2, 16, 24, 1)]
    anns = [{"id": j + 1, "image_id": i, "category_id": c, "bbox": [5, 5, w, h], "area": w * h, "iscrowd": 0}
            for j, (i, w, h, c) in enumerate(boxes)]
    anns.append({"id": 99, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 80], "area": 8000, "iscrowd": 1})
    ann = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "Tree"}, {"id": 2, "name": "Car"}]}
    for split in ("train", "val"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps(ann))
    return ["data=coco", f"data.root={root}", "data.train_ann=annotations/train.json",
            "data.val_ann=annotations/val.json", "data.train_images=img", "data.val_images=img"], boxes


@pytest.mark.slow
def test_stats_of_a_coco_folder(env):
    args, boxes = _coco_folder(env / "coco")
    r = runner.invoke(app, ["data", "stats", *args, f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = _runs(env, "data")
    stats = json.loads((d / "stats.json").read_text())
    s = stats["splits"]["train"]
    w = np.array([b[1] for b in boxes], dtype=float)
    h = np.array([b[2] for b in boxes], dtype=float)
    assert (s["images"], s["boxes"], s["crowd_boxes"], s["images_without_objects"]) == (3, 5, 1, 1)
    assert s["image_width"] == {"min": 120, "median": 120, "max": 120}  # image 2 measured from its file
    assert s["objects_per_image"] == {"min": 0, "median": 2, "p95": pytest.approx(np.percentile([3, 2, 0], 95)),
                                      "max": 3, "mean": pytest.approx(5 / 3)}
    for q in (5, 25, 50, 75, 95):
        assert s["box_size"][f"p{q}"] == pytest.approx(np.percentile(np.sqrt(w * h), q))
        assert s["aspect_ratio"][f"p{q}"] == pytest.approx(np.percentile(w / h, q))
    assert s["classes"] == {"Tree": 3, "Car": 2}

    # suggestions: the 90x120 image at its own size; one per anchor layout, the options sharing it named together
    sug = stats["suggestions"]
    assert set(sug) == {"faster_rcnn, iou_net", "iou_retina, retina"}
    first = round(np.percentile(np.sqrt(w * h), 5) * np.sqrt(2))
    assert sug["iou_retina, retina"]["anchor_sizes"] == [first, 2 * first, 4 * first]
    assert sug["faster_rcnn, iou_net"]["anchor_sizes"] == [first * 2 ** k for k in range(5)]
    line = f"model.min_size=90 model.max_size=120 model.anchor_sizes=[{first},{2 * first},{4 * first}]"
    assert sug["iou_retina, retina"]["overrides"] == line
    out = " ".join(r.stderr.split())  # rich may wrap
    assert line in out and "Tree" in out and "sqrt(w*h)" in out and "p5..p95" in out
    assert (d / "plots" / "box_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "status").read_text().strip() == "COMPLETED"


@pytest.mark.slow
def test_stats_of_the_builtin_dataset_match_its_json(env):
    r = runner.invoke(app, ["data", "stats", *_shapes(env), f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = _runs(env, "data")
    stats = json.loads((d / "stats.json").read_text())
    (ann,) = (env / "cache" / "datasets").glob("shapes-*/annotations/instances_val.json")
    coco = json.loads(ann.read_text())
    sides = np.array([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco["annotations"]])
    v = stats["splits"]["val"]
    assert v["boxes"] == len(sides) and v["images"] == 4 and v["image_height"]["median"] == 64
    assert [v["box_size"][f"p{q}"] for q in (5, 50, 95)] == pytest.approx(np.percentile(sides, [5, 50, 95]))


@pytest.mark.slow
def test_auto_sizes_recorded_in_the_run_and_restored_by_eval(env):
    auto = ["model.min_size=auto", "model.max_size=auto", "model.anchor_sizes=auto"]
    r = runner.invoke(app, ["train", "model=iou_net", *TINY_TRAIN, *_shapes(env), *auto, f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = _runs(env, "train")
    model = yaml.safe_load((d / "config.yaml").read_text())["model"]
    (ann,) = (env / "cache" / "datasets").glob("shapes-*/annotations/instances_train.json")
    sides = [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in json.loads(ann.read_text())["annotations"]]
    first = round(np.percentile(sides, 5) * np.sqrt(2))  # 64-px images kept at 64: no resize
    assert (model["min_size"], model["max_size"]) == (64, 64)
    assert model["anchor_sizes"] == [first * 2 ** k for k in range(5)]
    out = " ".join(r.stderr.split())
    assert f"model.min_size=64 model.max_size=64 model.anchor_sizes=[{','.join(map(str, model['anchor_sizes']))}]" \
        in out
    assert "model.anchor_sizes=auto" in (d / "overrides.yaml").read_text()  # what was typed stays recorded

    r = runner.invoke(app, ["eval", f"run={d}", f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (e,) = _runs(env, "eval")
    assert yaml.safe_load((e / "config.yaml").read_text())["model"]["anchor_sizes"] == model["anchor_sizes"]
    assert "sizes from the training split" not in r.stderr  # restored, never derived again


def test_auto_for_retina_uses_its_own_pyramid(env):
    from iouctl import config
    from iouctl.engine.sizes import resolve_auto_sizes
    from iouctl.runs import open_run

    conf = config.compose("train", ["model=retina", *TINY_TRAIN, *_shapes(env), "model.anchor_sizes=auto",
                                    f"paths.runs_dir={env / 'runs'}"])
    data = config.instantiate(conf.data)
    data.prepare()
    with open_run("train", "t", str(env / "runs"), config.to_yaml(conf), [], config=config.to_dict(conf)) as run:
        resolve_auto_sizes(conf, data, run)
        saved = yaml.safe_load((run.dir / "config.yaml").read_text())["model"]
    assert saved["anchor_sizes"] == list(conf.model.anchor_sizes) and len(saved["anchor_sizes"]) == 3  # P3..P5
    assert saved["min_size"] == 128  # not auto: as configured


@pytest.mark.parametrize("override, valid", sample([
    ("model.anchor_sizes=foo", "list of integers >= 1"),
    ("model.anchor_sizes=[16,0,64]", "list of integers >= 1"),
    ("model.min_size=abc", "an integer >= 1"),
    ("model.max_size=1.5", "an integer >= 1"),
], 2))
def test_bad_size_values_are_one_line(env, override, valid):
    r = runner.invoke(app, ["train", *TINY_TRAIN, *_shapes(env), override, f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and override.split("=")[0] in lines[0]
    assert valid in lines[0] and "or auto" in lines[0] and "Traceback" not in r.output
    assert not (env / "runs").exists()  # refused at composition: no run directory, no data touched


def test_box_size_plot_draws_every_box_and_the_anchors(tmp_path):
    from iouctl.data.stats import read_split
    from iouctl.engine.sizes import plot_box_sizes

    images = [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}]
    anns = [{"id": k, "image_id": 1, "category_id": 1, "bbox": [0, 0, s, s], "iscrowd": 0}
            for k, s in enumerate((8, 12, 20, 30, 50), 1)]
    boxes = read_split({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    sug = {"retina": {"min_size": 50, "max_size": 100, "anchor_sizes": [6, 12, 24]}}  # everything resized by 0.5
    out = plot_box_sizes(boxes, sug, tmp_path / "p.png")
    panel = out["panels"]["retina"]
    assert panel["counts"].sum() == 5 and panel["anchors"] == [6, 12, 24]
    drawn = np.repeat(np.sqrt(panel["edges"][:-1] * panel["edges"][1:]), panel["counts"].astype(int))
    assert drawn.min() == pytest.approx(4, rel=0.1) and drawn.max() == pytest.approx(25, rel=0.1)  # sizes x 0.5
    assert out["path"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_without_boxes_print_the_tables_and_suggest_nothing(env):
    root = env / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 24)).save(root / "img" / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}], "annotations": [],
           "categories": [{"id": 1, "name": "thing"}]}
    for split in ("train", "val"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps(ann))
    r = runner.invoke(app, ["data", "stats", "data=coco", f"data.root={root}", "data.train_ann=annotations/train.json",
                            "data.val_ann=annotations/val.json", "data.train_images=img", "data.val_images=img",
                            f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = _runs(env, "data")
    stats = json.loads((d / "stats.json").read_text())
    assert stats["suggestions"] == {} and stats["splits"]["train"]["images_without_objects"] == 1
    assert "no model sizes to suggest" in r.stderr and not (d / "plots").exists()
