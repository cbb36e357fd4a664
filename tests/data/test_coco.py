"""COCO reader: validation errors name file + annotation id, skip_bad counts, dataset items, CocoData."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools.coco import COCO

from iouctl.data.coco import (
    COCO_KINDS,
    CocoData,
    CocoDetectionDataset,
    DatasetError,
    collate_detection,
    validate_coco,
    validate_coco_dict,
)

W, H = 20, 12


def base_coco():
    """3 images (the third without annotations), 2 categories with non-contiguous ids, 4 annotations."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
            {"id": 5, "file_name": "c.png", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 5, 4], "area": 20, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0.5, 0.25, 10.5, 8.0], "area": 84, "iscrowd": 1},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [4, 4, 3, 3], "area": 9, "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [15, 5, 8, 9], "area": 72, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


def write_images(folder, names=("a.png", "b.png", "c.png"), size=(W, H)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / n)


@pytest.fixture
def coco_dir(tmp_path):
    write_images(tmp_path / "img")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(base_coco()))
    return tmp_path, ann


def _write(tmp_path, data):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


def _set(i, key, value):
    def f(d):
        d["annotations"][i][key] = value
    return f


def _drop(i, key):
    def f(d):
        del d["annotations"][i][key]
    return f


# (mutation, kind, offending annotation id)
ANN_CASES = [
    (_drop(1, "bbox"), "missing_keys", "11"),
    (_drop(2, "category_id"), "missing_keys", "12"),
    (_drop(3, "image_id"), "missing_keys", "13"),
    (_set(1, "bbox", [1, 2, 3]), "bad_bbox", "11"),
    (_set(1, "bbox", [1, 2, "3", 4]), "bad_bbox", "11"),
    (_set(2, "bbox", [1, 2, float("nan"), 4]), "nonfinite_box", "12"),
    (_set(2, "bbox", [float("inf"), 2, 1, 4]), "nonfinite_box", "12"),
    (_set(0, "bbox", [1, 2, 0, 4]), "nonpositive_size", "10"),
    (_set(3, "bbox", [1, 2, 5, -4]), "nonpositive_size", "13"),
    (_set(0, "bbox", [W, 2, 5, 4]), "outside_image", "10"),
    (_set(0, "bbox", [-6, 2, 5, 4]), "outside_image", "10"),
    (_set(3, "category_id", 99), "unknown_category", "13"),
    (_set(3, "category_id", [3]), "unknown_category", "13"),
    (_set(2, "image_id", 42), "unknown_image", "12"),
    (_set(2, "image_id", "1"), "unknown_image", "12"),
    (_set(3, "id", 10), "duplicate_id", "10"),
    (_set(1, "iscrowd", 2), "bad_iscrowd", "11"),
]


@pytest.mark.parametrize("mutate, kind, ann_id", ANN_CASES)
def test_bad_annotation_names_file_and_id(coco_dir, mutate, kind, ann_id):
    tmp, _ = coco_dir
    data = base_coco()
    mutate(data)
    ann = _write(tmp, data)
    with pytest.raises(DatasetError) as e:
        validate_coco(ann, tmp / "img")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{ann}: 1 bad entries: ")
    assert f"ann ids {ann_id})" in msg
    assert "pass data.skip_bad=true to skip them" in msg

    rep = validate_coco(ann, tmp / "img", skip_bad=True)
    assert rep.counts == {kind: 1}
    assert rep.num_annotations == 3 and rep.num_images == 3
    assert f"skipped 1 {COCO_KINDS[kind][0]} (ann ids {ann_id})" in rep.summary()
    # the dataset built with skip_bad has exactly the 3 remaining annotations
    ds = CocoDetectionDataset(tmp / "img", ann, skip_bad=True)
    assert sum(len(ds[i][1]["labels"]) for i in range(len(ds))) == 3


def test_missing_image_file(coco_dir):
    tmp, ann = coco_dir
    (tmp / "img" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 images whose file is missing \(image id: file 2: b.png\).*skip_bad"):
        validate_coco(ann, tmp / "img")
    rep = validate_coco(ann, tmp / "img", skip_bad=True)
    assert rep.counts == {"missing_file": 1}
    assert rep.on_skipped_image == 2  # image 2 had annotations 12 and 13: counted, not silently dropped
    assert "dropped 2 annotations of skipped images" in rep.summary()
    ds = CocoDetectionDataset(tmp / "img", ann, skip_bad=True)
    assert ds.image_ids == [1, 5]
    # without image_dir only the JSON is checked
    assert validate_coco(ann).ok


@pytest.mark.parametrize("mutate, kind, ident", [
    (lambda d: d["images"][1].pop("file_name"), "image_missing_keys", "2"),
    (lambda d: d["images"][1].pop("id"), "image_missing_keys", "#1"),
    (lambda d: d["images"][0].update(width=0), "image_bad_size", "1"),
    (lambda d: d["images"][0].update(height="12"), "image_bad_size", "1"),
])
def test_bad_image_entries(coco_dir, mutate, kind, ident):
    tmp, _ = coco_dir
    data = base_coco()
    mutate(data)
    ann = _write(tmp, data)
    with pytest.raises(DatasetError, match=rf"image ids {ident}\).*skip_bad=true"):
        validate_coco(ann, tmp / "img")
    rep = validate_coco(ann, tmp / "img", skip_bad=True)
    assert rep.counts[kind] == 1 and rep.num_images == 2


def test_duplicate_image_ids_drop_both(coco_dir):
    tmp, _ = coco_dir
    data = base_coco()
    data["images"][2]["id"] = 2
    ann = _write(tmp, data)
    rep = validate_coco(ann, tmp / "img", skip_bad=True)
    assert rep.counts == {"image_duplicate_id": 2}
    assert [im["id"] for im in rep.images] == [1]
    assert rep.on_skipped_image == 2


def test_many_errors_counted_with_first_ids(coco_dir):
    tmp, _ = coco_dir
    data = base_coco()
    for k in range(20):
        data["annotations"].append({"id": 100 + k, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 1]})
    data["annotations"][0]["category_id"] = 99
    ann = _write(tmp, data)
    with pytest.raises(DatasetError) as e:
        validate_coco(ann, tmp / "img")
    msg = str(e.value)
    assert "21 bad entries" in msg
    assert "20 boxes with zero or negative width/height (ann ids 100, 101, 102, ...)" in msg
    assert "1 annotations with an unknown category id (ann ids 10)" in msg
    rep = validate_coco(ann, tmp / "img", skip_bad=True)
    assert rep.counts == {"nonpositive_size": 20, "unknown_category": 1} and rep.num_bad == 21
    assert rep.num_annotations == 3


def test_broken_json_reports_line_and_column(tmp_path):
    ann = tmp_path / "broken.json"
    # the stray comma opens line 3; json reports the position of the unexpected token
    ann.write_text('{\n  "images": [],\n  , "annotations": []}\n')
    with pytest.raises(DatasetError, match=rf"^{ann}:3:3: invalid JSON: "):
        validate_coco(ann)


@pytest.mark.parametrize("data, match", [
    ([], "top level must be a JSON object"),
    ({"images": [], "annotations": []}, "missing top-level key 'categories'"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' must be a list"),
    ({"images": [], "annotations": [], "categories": [{"id": 1}]}, "category #0 needs an integer 'id'"),
    ({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]},
     "duplicate category id 1"),
])
def test_structural_errors_are_fatal_even_with_skip_bad(tmp_path, data, match):
    ann = _write(tmp_path, data)
    with pytest.raises(DatasetError, match=match) as e:
        validate_coco(ann, skip_bad=True)
    assert str(e.value).startswith(str(ann)) and "\n" not in str(e.value)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found: .*nope.json"):
        validate_coco(tmp_path / "nope.json")
    ann = _write(tmp_path, base_coco())
    with pytest.raises(DatasetError, match="image folder not found: .*noimg"):
        validate_coco(ann, tmp_path / "noimg")
    with pytest.raises(DatasetError, match="COCO dataset root not found"):
        CocoData(str(tmp_path / "missing_root"), "a.json", "b.json").prepare()


def test_items_match_json_by_plain_loop(coco_dir):
    tmp, ann = coco_dir
    ds = CocoDetectionDataset(tmp / "img", ann)
    data = base_coco()
    assert len(ds) == 3 and ds.image_ids == [1, 2, 5]
    for i, im in enumerate(data["images"]):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, H, W)
        ref = np.asarray(Image.open(tmp / "img" / im["file_name"]).convert("RGB"), dtype=np.float64) / 255.0
        # float32 of k/255 vs float64: error <= 2^-24 relative, i.e. < 1e-7 absolute in [0, 1]
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), ref, atol=1e-7, rtol=0)
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        expect = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(anns), 4)
        # all test coordinates are exact in float32 (small dyadic fractions): exact equality
        assert target["boxes"].tolist() == expect
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        assert target["image_id"] == im["id"]
    assert ds[2][1]["boxes"].shape == (0, 4)  # image without annotations
    with pytest.raises(IndexError):
        ds[3]


def test_image_size_mismatch_names_the_file(coco_dir):
    tmp, ann = coco_dir
    write_images(tmp / "img", names=("b.png",), size=(W + 1, H))
    ds = CocoDetectionDataset(tmp / "img", ann)
    with pytest.raises(DatasetError, match=rf"b.png: image is {W + 1}x{H} but .*ann.json says {W}x{H}"):
        ds[1]


def test_unreadable_image_names_the_file(coco_dir):
    tmp, ann = coco_dir
    (tmp / "img" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*a.png"):
        CocoDetectionDataset(tmp / "img", ann)[0]


def test_collate_keeps_per_image_sizes(coco_dir):
    tmp, ann = coco_dir
    ds = CocoDetectionDataset(tmp / "img", ann)
    images, targets = collate_detection([ds[0], ds[2]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [1, 5]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    assert [len(b[0]) for b in loader] == [2, 1]
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])


def test_coco_dict_of_cleaned_dataset_loads_in_pycocotools(coco_dir):
    tmp, _ = coco_dir
    data = base_coco()
    data["annotations"][0]["bbox"] = [1, 1, float("nan"), 2]
    ann = _write(tmp, data)
    ds = CocoDetectionDataset(tmp / "img", ann, skip_bad=True)
    coco = COCO()
    coco.dataset = copy.deepcopy(ds.coco_dict())
    coco.createIndex()
    assert sorted(coco.getAnnIds()) == [11, 12, 13]


def test_coco_data_interface(tmp_path):
    root = tmp_path / "ds"
    write_images(root / "train2017")
    write_images(root / "val2017")
    (root / "annotations").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps(base_coco()))
    (root / "annotations" / "val.json").write_text(json.dumps(base_coco()))
    d = CocoData(str(root), "annotations/train.json", "annotations/val.json")
    assert d.ann_file("val") == root / "annotations" / "val.json" and d.image_dir("train") == root / "train2017"
    seen = []
    d.prepare(progress=lambda a, b: seen.append((a, b)))
    assert seen == [(3, 3)]  # check_images=val (the default) opens the val images, with progress
    assert d.num_classes == 2 and [c["name"] for c in d.categories] == ["cat", "dog"]
    assert len(d.dataset("train")) == 3
    with pytest.raises(DatasetError, match="unknown split 'test'; valid splits: train, val"):
        d.dataset("test")


def test_coco_data_skip_bad_and_category_mismatch(tmp_path):
    root = tmp_path / "ds"
    write_images(root / "tr")
    write_images(root / "va")
    bad = base_coco()
    bad["annotations"][0]["bbox"] = [0, 0, -1, 1]
    (root / "t.json").write_text(json.dumps(bad))
    (root / "v.json").write_text(json.dumps(base_coco()))
    with pytest.raises(DatasetError, match=r"t.json: 1 bad entries.*ann ids 10\)"):
        CocoData(str(root), "t.json", "v.json", "tr", "va").prepare()
    d = CocoData(str(root), "t.json", "v.json", "tr", "va", skip_bad=True)
    d.prepare()
    assert d.report("train").counts == {"nonpositive_size": 1}
    other = base_coco()
    other["categories"][1]["name"] = "wolf"
    (root / "v.json").write_text(json.dumps(other))
    with pytest.raises(DatasetError, match="different categories"):
        CocoData(str(root), "t.json", "v.json", "tr", "va", skip_bad=True).prepare()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 30) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["id", "image_id", "category_id", "bbox", "iscrowd"]), value=json_values,
       index=st.integers(0, 3))
def test_arbitrary_field_values_never_crash(field, value, index):
    """Any JSON value in any annotation field: either valid, or a DatasetError; with skip_bad never an error,
    and every kept box is finite with positive size."""
    data = base_coco()
    data["annotations"][index][field] = value
    try:
        validate_coco_dict(data, "fuzz.json")
    except DatasetError as e:
        assert "fuzz.json" in str(e) and "\n" not in str(e)
    rep = validate_coco_dict(data, "fuzz.json", skip_bad=True)
    assert rep.num_annotations + rep.num_bad == 4
    for a in rep.annotations:
        x, y, w, h = a["bbox"]
        assert all(math.isfinite(v) for v in a["bbox"]) and w > 0 and h > 0


def test_null_image_size_is_accepted_without_a_crash(tmp_path):
    import json

    from iouctl.data.coco import validate_coco

    ann = {"images": [{"id": 1, "file_name": "a.png", "width": None, "height": None}],
           "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 2], "area": 6, "iscrowd": 0}]}
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ann))
    assert validate_coco(p).ok




def test_auto_paths_follow_the_layout_of_the_annotation_file_found(tmp_path):
    """`data import` keeps the source's relative paths under images/ (e.g. images/train/a.jpg with file_name
    "train/a.jpg"): the image folder is the layout's (images), never a guessed images/train."""
    root = tmp_path / "ds"
    for split in ("train", "val"):
        write_images(root / "images" / split)
        d = base_coco()
        for im in d["images"]:
            im["file_name"] = f"{split}/{im['file_name']}"
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(d))
    data = CocoData(str(root))
    assert data.ann_file("train") == root / "annotations" / "train.json" and data.image_dir("val") == root / "images"
    data.prepare()
    assert len(data.dataset("train")) == 3
    (root / "train2017").mkdir()  # a COCO-named folder beside it changes nothing: no instances_train2017.json
    assert CocoData(str(root)).image_dir("train") == root / "images"
    with pytest.raises(DatasetError, match="data.train_ann=auto: none of annotations/instances_train2017.json, "
                                           "annotations/train.json exists"):
        CocoData(str(tmp_path)).ann_file("train")
