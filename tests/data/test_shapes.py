"""Built-in shapes dataset: determinism, caching, atomicity, boxes vs drawn pixels, crowding statistics."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from iouctl.data import shapes as shapes_mod
from iouctl.data.coco import DatasetError
from iouctl.data.shapes import SHAPE_NAMES, ShapesData, ShapesError

# pycocotools' RLE decode trips a numpy 2 DeprecationWarning inside the library; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = dict(num_train=6, num_val=3, image_size=64, min_objects=2, max_objects=6, min_size=8, max_size=24)
# flat colours, no noise: every pixel is exactly the background colour or an object's fill/outline colour
FLAT = dict(num_train=24, num_val=4, image_size=64, min_objects=2, max_objects=8, min_size=8, max_size=24,
            noise=0.0, texture=False)


def box_iou_xywh(a, b):
    """Plain-Python IoU of two COCO [x, y, w, h] boxes (independent of any library code)."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def tight_box(mask):
    """[x, y, w, h] in pixel edges of the True pixels of a bool [H, W] mask, by plain loops."""
    ys, xs = [], []
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                ys.append(y)
                xs.append(x)
    return [min(xs), min(ys), max(xs) + 1 - min(xs), max(ys) + 1 - min(ys)]


def all_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    d = ShapesData(str(tmp_path_factory.mktemp("flat")), seed=3, **FLAT)
    d.prepare()
    return d


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = ShapesData(str(tmp_path / "a"), seed=7, **TINY)
    b = ShapesData(str(tmp_path / "b"), seed=7, **TINY)
    a.prepare()
    b.prepare()
    assert a.root.name == b.root.name
    fa, fb = all_files(a.root), all_files(b.root)
    assert len([k for k in fa if k.endswith(".png")]) == TINY["num_train"] + TINY["num_val"]
    assert fa == fb


def test_different_seed_and_split_streams_differ(tmp_path):
    a = ShapesData(str(tmp_path), seed=7, **TINY)
    c = ShapesData(str(tmp_path), seed=8, **TINY)
    a.prepare()
    c.prepare()
    assert a.root != c.root
    assert a.ann_file("train").read_bytes() != c.ann_file("train").read_bytes()
    for i in range(TINY["num_val"]):
        assert (a.image_dir("val") / f"{i:06d}.png").read_bytes() != (c.image_dir("val") / f"{i:06d}.png").read_bytes()
    # train and val come from different seed streams: image 0 of each differ
    assert (a.image_dir("train") / "000000.png").read_bytes() != (a.image_dir("val") / "000000.png").read_bytes()


def test_second_prepare_is_noop(tmp_path, monkeypatch):
    d = ShapesData(str(tmp_path), **TINY)
    calls = []
    real = ShapesData._generate
    monkeypatch.setattr(ShapesData, "_generate", lambda self, *a: (calls.append(1), real(self, *a)))
    d.prepare()
    stamp = {p: p.stat().st_mtime_ns for p in d.root.rglob("*")}
    ShapesData(str(tmp_path), **TINY).prepare()
    assert calls == [1]
    assert {p: p.stat().st_mtime_ns for p in d.root.rglob("*")} == stamp
    # only the finished folder is left in the cache dir: no temp folders
    assert [p.name for p in tmp_path.iterdir()] == [d.root.name]


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"num_train": 7}, {"num_val": 4}, {"image_size": 72}, {"min_objects": 3}, {"max_objects": 7},
    {"classes": ["circle", "star"]}, {"min_size": 9}, {"max_size": 25}, {"cluster_prob": 0.2},
    {"min_visible": 0.5}, {"noise": 0.0}, {"texture": False},
])
def test_any_parameter_change_gives_new_folder(tmp_path, change):
    base = ShapesData(str(tmp_path), **TINY)
    other = ShapesData(str(tmp_path), **{**TINY, **change})
    assert other.root != base.root
    assert other.root.parent == base.root.parent


def test_generator_version_is_in_the_hash(tmp_path, monkeypatch):
    before = ShapesData(str(tmp_path), **TINY).root
    monkeypatch.setattr(shapes_mod, "GENERATOR_VERSION", shapes_mod.GENERATOR_VERSION + 1)
    assert ShapesData(str(tmp_path), **TINY).root != before


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = shapes_mod.render_image
    count = []

    def dies_on_fourth(*a, **k):
        count.append(1)
        if len(count) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(shapes_mod, "render_image", dies_on_fourth)
    d = ShapesData(str(tmp_path), **TINY)
    with pytest.raises(KeyboardInterrupt):
        d.prepare()
    assert not d.root.exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shapes_mod, "render_image", real)
    d.prepare()
    assert d.ann_file("val").is_file()


def test_damaged_cache_is_reported(tmp_path):
    d = ShapesData(str(tmp_path), **TINY)
    d.prepare()
    d.ann_file("val").unlink()
    with pytest.raises(ShapesError, match="instances_val.json.*delete the folder"):
        d.prepare()


def test_progress_callback_counts_all_images(tmp_path):
    seen = []
    ShapesData(str(tmp_path), **TINY).prepare(progress=lambda done, total: seen.append((done, total)))
    n = TINY["num_train"] + TINY["num_val"]
    assert seen == [(i + 1, n) for i in range(n)]


def test_loads_in_pycocotools_with_declared_categories(flat):
    coco = COCO(str(flat.ann_file("train")))
    assert len(coco.getImgIds()) == FLAT["num_train"]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle", "cross",
                                                                      "ellipse"]
    assert flat.num_classes == 5 and [c["id"] for c in flat.categories] == [1, 2, 3, 4, 5]
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(1 <= a["category_id"] <= 5 for a in anns)


def _image_and_anns(d: ShapesData, split: str):
    data = json.loads(d.ann_file(split).read_text())
    by_img = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_img[a["image_id"]].append(a)
    for im in data["images"]:
        pix = np.asarray(Image.open(d.image_dir(split) / im["file_name"]).convert("RGB"))
        yield pix, by_img[im["id"]]


def _background(pix):
    # flat mode: the background is one colour and covers most of the image (objects are small), so it is the mode
    colours, counts = np.unique(pix.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()]


def test_annotations_match_drawn_pixels(flat):
    """Every drawn (non-background) pixel belongs to exactly one annotation's visible mask; visible masks lie in their
    boxes; an unoccluded object's box is the tight box of its pixels. Tolerance 0 px: rasterisation tests pixel
    centres without anti-aliasing, so the box is exact by construction (the requirement is <= 1 px)."""
    checked_unoccluded = 0
    for pix, anns in _image_and_anns(flat, "train"):
        drawn = (pix != _background(pix)).any(axis=2)
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        union = np.zeros_like(drawn)
        for a, m in zip(anns, masks):
            assert not (union & m).any(), "visible masks overlap"
            union |= m
            assert m.sum() == a["area"]
            x, y, w, h = a["bbox"]
            vb = tight_box(m)
            # visible part inside the amodal box
            assert x <= vb[0] and y <= vb[1] and vb[0] + vb[2] <= x + w and vb[1] + vb[3] <= y + h
            if a["visible_fraction"] == 1.0:
                assert vb == a["bbox"]
                checked_unoccluded += 1
        np.testing.assert_array_equal(union, drawn)  # no unlabeled fragments, no invisible GT
        # boxes touching no other box: the drawn pixels inside are that object's alone
        for i, a in enumerate(anns):
            if all(box_iou_xywh(a["bbox"], b["bbox"]) == 0 for j, b in enumerate(anns) if j != i):
                x, y, w, h = a["bbox"]
                sub = np.zeros_like(drawn)
                sub[y:y + h, x:x + w] = drawn[y:y + h, x:x + w]
                assert tight_box(sub) == a["bbox"]
    assert checked_unoccluded >= 20


def test_single_object_box_is_tight_box_of_drawn_pixels(tmp_path):
    d = ShapesData(str(tmp_path), seed=5, num_train=40, num_val=1, image_size=48, min_objects=1, max_objects=1,
                   min_size=6, max_size=40, classes=list(SHAPE_NAMES), noise=0.0, texture=False)
    d.prepare()
    seen_classes = set()
    for pix, anns in _image_and_anns(d, "train"):
        assert len(anns) == 1
        drawn = (pix != _background(pix)).any(axis=2)
        assert tight_box(drawn) == anns[0]["bbox"]  # exact, see test_annotations_match_drawn_pixels
        seen_classes.add(anns[0]["category_id"])
    assert len(seen_classes) >= 6  # the check covered most shape kinds


def test_crowding_makes_nms_matter(tmp_path):
    d = ShapesData(str(tmp_path), seed=0, num_train=0, num_val=64)
    d.prepare()
    data = json.loads(d.ann_file("val").read_text())
    by_img = {}
    for a in data["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    crowded = sum(
        any(a["category_id"] == b["category_id"] and box_iou_xywh(a["bbox"], b["bbox"]) > 0.3
            for a, b in itertools.combinations(anns, 2))
        for anns in by_img.values())
    # measured ~0.8 with the defaults; 0.5 leaves room for seed noise while still meaning "most images"
    assert crowded / 64 >= 0.5
    counts = [len(by_img.get(im["id"], [])) for im in data["images"]]
    assert min(counts) >= 3 and max(counts) <= 12
    vis = [a["visible_fraction"] for a in data["annotations"]]
    assert min(vis) >= 0.35 - 1e-4  # stored rounded to 4 decimals
    assert np.mean(np.array(vis) < 1) > 0.25  # occlusion is common, not a corner case


def test_dataset_items(flat):
    ds = flat.dataset("val")
    assert len(ds) == FLAT["num_val"]
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and str(image.dtype) == "torch.float32"
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["boxes"].dtype.is_floating_point and target["boxes"].shape[1] == 4
    assert str(target["labels"].dtype) == "torch.int64" and target["image_id"] == 1
    assert bool((target["boxes"][:, 2:] > target["boxes"][:, :2]).all())


@pytest.mark.parametrize("kwargs, match", [
    ({"classes": ["circle", "blob"]}, "unknown class.*valid names: circle"),
    ({"classes": []}, "classes must not be empty"),
    ({"min_objects": 5, "max_objects": 2}, "min_objects <= max_objects"),
    ({"min_size": 50, "max_size": 40}, "min_size <= max_size"),
    ({"image_size": 4}, "image_size"),
    ({"min_visible": 0.0}, "min_visible"),
    ({"cluster_prob": 1.5}, "cluster_prob"),
])
def test_bad_parameters_raise_one_line(tmp_path, kwargs, match):
    with pytest.raises(ShapesError, match=match) as e:
        ShapesData(str(tmp_path), **kwargs)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, DatasetError) and isinstance(e.value, ValueError)


def test_unknown_split_lists_valid_ones(tmp_path):
    d = ShapesData(str(tmp_path), **TINY)
    for call in (d.dataset, d.ann_file, d.image_dir):
        with pytest.raises(ValueError, match="unknown split 'test'; valid splits: train, val"):
            call("test")


def test_degenerate_sizes_do_not_crash(tmp_path):
    # zero images, zero objects, and a crowded tiny image that cannot fit all requested objects
    d = ShapesData(str(tmp_path), num_train=0, num_val=2, image_size=16, min_objects=0, max_objects=30,
                   min_size=4, max_size=12)
    d.prepare()
    assert len(d.dataset("train")) == 0
    ds = d.dataset("val")
    for i in range(len(ds)):
        _, t = ds[i]
        assert t["boxes"].shape[0] <= 30
        assert bool((t["boxes"] >= 0).all() and (t["boxes"] <= 16).all())
