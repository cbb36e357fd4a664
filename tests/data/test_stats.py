"""Dataset statistics against numpy on the JSON, and the size rule on built-in-like and 400-px-tile-like data."""
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from iouctl.data import ShapesData
from iouctl.data.coco import DatasetError
from iouctl.data.stats import AnchorPyramid, read_split, resize_scales, split_stats, suggest_sizes

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
RCNN = AnchorPyramid(first_stride=4, min_levels=5, max_levels=5)
RETINA = AnchorPyramid(first_stride=8, min_levels=3, max_levels=5)


def _coco(image_sizes, boxes, cats=("a", "b")):
    """image_sizes: [(w, h) or None]; boxes: [(image index, w, h, category index, iscrowd)]."""
    images = [{"id": 10 + i, "file_name": f"{i}.png", **({} if s is None else {"width": s[0], "height": s[1]})}
              for i, s in enumerate(image_sizes)]
    anns = [{"id": j + 1, "image_id": 10 + i, "category_id": 100 + c, "bbox": [1.0, 2.0, w, h], "iscrowd": crowd}
            for j, (i, w, h, c, crowd) in enumerate(boxes)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 100 + k, "name": n} for k, n in enumerate(cats)]}


def test_stats_equal_numpy_on_the_json(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(50, 300)), int(rng.integers(50, 300))) for _ in range(30)] + [None]
    Image.new("RGB", (77, 55)).save(tmp_path / "30.png")  # the image without width/height: read from its header
    boxes = [(int(rng.integers(0, 29)), float(rng.uniform(2, 60)), float(rng.uniform(2, 60)), int(rng.integers(0, 2)),
              int(rng.random() < 0.1)) for _ in range(200)] + [(30, 7.0, 5.0, 1, 0)]
    coco = _coco(sizes, boxes, cats=("a", "b", "never"))  # image 29 has no box; class "never" has none
    s = split_stats(read_split(coco, tmp_path))

    widths = np.array([w for w, _ in sizes[:30]] + [77.0])
    heights = np.array([h for _, h in sizes[:30]] + [55.0])
    kept = [a for a in coco["annotations"] if not a["iscrowd"]]
    w = np.array([a["bbox"][2] for a in kept])
    h = np.array([a["bbox"][3] for a in kept])
    per_image = np.array([sum(a["image_id"] == im["id"] for a in kept) for im in coco["images"]])
    assert s["images"] == 31 and s["boxes"] == len(kept) and s["crowd_boxes"] == 201 - len(kept) > 0
    assert s["image_width"] == {"min": widths.min(), "median": np.median(widths), "max": widths.max()}
    assert s["image_height"] == {"min": heights.min(), "median": np.median(heights), "max": heights.max()}
    assert 55.0 in heights and 77.0 in widths
    assert s["images_without_objects"] == int((per_image == 0).sum()) >= 1
    assert s["objects_per_image"]["p95"] == pytest.approx(np.percentile(per_image, 95), abs=1e-12)
    assert s["objects_per_image"]["median"] == np.median(per_image) and s["objects_per_image"]["max"] == per_image.max()
    for key, v in (("box_size", np.sqrt(w * h)), ("box_width", w), ("box_height", h), ("aspect_ratio", w / h)):
        for q in (5, 25, 50, 75, 95):
            assert s[key][f"p{q}"] == pytest.approx(np.percentile(v, q), rel=1e-12), (key, q)
        assert (s[key]["min"], s[key]["max"]) == (v.min(), v.max())
    cats = [a["category_id"] for a in kept]
    assert s["classes"] == {"a": cats.count(100), "b": cats.count(101), "never": 0}


def test_box_percentiles_by_hand():
    # squares of side 10, 20, 30, 40: linear percentiles p5 = 10 + 0.15 * 10, p50 = 25, p95 = 30 + 0.85 * 10
    s = split_stats(read_split(_coco([(100, 50)], [(0, x, x, 0, 0) for x in (10, 20, 30, 40)])))
    assert s["box_size"] == {"min": 10, "p5": 11.5, "p25": 17.5, "p50": 25, "p75": 32.5, "p95": 38.5, "max": 40}
    assert s["aspect_ratio"]["p50"] == 1.0 and s["objects_per_image"]["min"] == 4


def test_empty_split_and_missing_size_without_folder():
    s = split_stats(read_split(_coco([(64, 64)], [])))
    assert s["boxes"] == 0 and s["box_size"]["p50"] is None and s["images_without_objects"] == 1
    with pytest.raises(DatasetError, match="no width/height"):
        read_split(_coco([None], []))
    with pytest.raises(DatasetError, match="no boxes in the training split"):
        suggest_sizes(read_split(_coco([(64, 64)], [])), RETINA)


@pytest.fixture(scope="module")
def builtin_like(tmp_path_factory):
    # the built-in dataset's first 256 training images (the generator seeds each image alone: the same images)
    data = ShapesData(str(tmp_path_factory.mktemp("cache")), num_train=256, num_val=1)
    data.prepare()
    return read_split(data.dataset("train").coco_dict())


@pytest.mark.slow
def test_rule_reproduces_the_hand_set_defaults_on_builtin_data(builtin_like):
    for option, pyramid in (("faster_rcnn", RCNN), ("iou_net", RCNN), ("retina", RETINA), ("iou_retina", RETINA)):
        conf = yaml.safe_load((CONF / f"{option}.yaml").read_text())
        s = suggest_sizes(builtin_like, pyramid, conf["aspect_ratios"])
        assert (s.min_size, s.max_size, s.anchor_sizes) == (conf["min_size"], conf["max_size"], conf["anchor_sizes"])
        assert s.aspect_ratios is None  # [0.5, 1, 2] cover the shapes
    assert s.overrides() == ["model.min_size=128", "model.max_size=128", "model.anchor_sizes=[16,32,64]"]


def _tiles(rng, n_images=60, lo=16.0, hi=74.0, size=(400, 400), aspect=(0.8, 1.25)):
    """Aerial-tile-like data: 15-40 boxes per image, sides log-uniform in [lo, hi], mild aspect jitter."""
    boxes = []
    for i in range(n_images):
        for _ in range(int(rng.integers(15, 41))):
            side, r = math.exp(rng.uniform(math.log(lo), math.log(hi))), rng.uniform(*aspect)
            boxes.append((i, side * math.sqrt(r), side / math.sqrt(r), 0, 0))
    return read_split(_coco([size] * n_images, boxes, cats=("tree",)))


def test_rule_on_400px_tiles():
    t = _tiles(np.random.default_rng(1))
    p5, p95 = np.percentile(np.sqrt(t.boxes[:, 0] * t.boxes[:, 1]), (5, 95))
    first = round(p5 * math.sqrt(2))
    assert 23 <= first <= 26  # ~ 17.5 px * sqrt(2)
    retina, rcnn = suggest_sizes(t, RETINA), suggest_sizes(t, RCNN)
    assert (retina.min_size, retina.max_size) == (rcnn.min_size, rcnn.max_size) == (400, 400)  # no resampling
    assert retina.anchor_sizes == [first, 2 * first, 4 * first]  # 2 levels reach p95; P3..P5 kept
    assert rcnn.anchor_sizes == [first * 2 ** k for k in range(5)]
    # every box from p5 to p95 has an anchor within a factor sqrt(2) (IoU >= 0.5 at the same shape and centre)
    assert first / math.sqrt(2) <= p5 and retina.anchor_sizes[-1] * math.sqrt(2) >= p95
    assert "p5..p95 = " in retina.reasons["anchor sizes"] and "400 x 400" in retina.reasons["image size"]


def test_large_images_are_capped_and_anchors_follow_the_resize():
    # 4000x3000 photos: scaled by 800/3000 to 1067x800; 150-px boxes become 40 px
    t = read_split(_coco([(4000, 3000)] * 3, [(i, 150.0, 150.0, 0, 0) for i in range(3)]))
    s = suggest_sizes(t, RETINA)
    assert (s.min_size, s.max_size) == (800, 1067)
    assert resize_scales(t.image_sizes, 800, 1067)[0] == pytest.approx(800 / 3000)
    assert s.anchor_sizes == [57, 114, 228]  # round(40 * sqrt(2)) = 57
    assert "scaled by 0.267" in s.reasons["image size"]


@pytest.mark.slow
def test_a_given_size_is_kept_and_the_other_made_consistent(builtin_like):
    s = suggest_sizes(builtin_like, RETINA, min_size=256)  # upsampling 2x: anchors double too
    assert (s.min_size, s.max_size, s.anchor_sizes) == (256, 256, [31, 62, 124])  # round(22 * sqrt(2))
    s = suggest_sizes(builtin_like, RETINA, max_size=96)
    assert (s.min_size, s.max_size) == (96, 96)


def test_aspect_ratios_extended_only_when_the_data_says_so():
    rng = np.random.default_rng(2)
    poles = read_split(_coco([(400, 400)], [(0, 10.0, float(h), 0, 0) for h in rng.uniform(40, 70, 50)]))
    s = suggest_sizes(poles, RETINA, [0.5, 1.0, 2.0])
    assert s.aspect_ratios == [0.5, 1.0, 2.0, 4.0]  # h/w p95 ~6.8: 4 * 2.25 = 9 covers it, 2 * 2.25 does not
    assert s.overrides()[-1] == "model.aspect_ratios=[0.5,1,2,4]"
    assert suggest_sizes(_tiles(rng, n_images=5), RETINA, [0.5, 1.0, 2.0]).aspect_ratios is None
