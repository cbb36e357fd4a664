"""`import_dataset`: VOC / YOLO / CSV sources written here -> a COCO dataset folder, checked against the pixels."""
import json
import os
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from iouctl.data import CocoData
from iouctl.data.coco import DatasetError, validate_coco
from iouctl.data.importers import formats, import_dataset, split_names
from tests.data.import_fixtures import (
    H, SCENES, W, boxes_from_pixels, draw, make_csv, make_voc, make_yolo, voc_object, voc_pixel_objects, voc_xml,
)


def load(out):
    return {s: json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val")}


def by_file(coco):
    """{file_name: (image entry, {class name: sorted bboxes})} over both splits."""
    out = {}
    for d in coco.values():
        names = {c["id"]: c["name"] for c in d["categories"]}
        for im in d["images"]:
            boxes = {}
            for a in d["annotations"]:
                if a["image_id"] == im["id"]:
                    boxes.setdefault(names[a["category_id"]], []).append(a["bbox"])
            out[im["file_name"]] = (im, {k: sorted(v) for k, v in boxes.items()})
    return out


def assert_boxes_match_pixels(out, coco, stem_of, approx=False):
    """Every image's boxes, per class, equal the rectangles found in its pixels (read through DIR/images)."""
    files = by_file(coco)
    assert sorted(stem_of(f) for f in files) == sorted(SCENES)
    for f, (im, boxes) in files.items():
        assert (im["width"], im["height"]) == (W, H)
        for name in ("Tree", "Car"):
            want = boxes_from_pixels(out / "images" / f, name)
            got = boxes.get(name, [])
            if approx:
                assert got == [pytest.approx(b, abs=1e-9) for b in want], f
            else:
                assert got == want, f


def test_formats_are_the_importer_modules():
    assert formats() == ["csv", "voc", "yolo"]


def test_voc_without_imagesets(tmp_path):
    src = make_voc(tmp_path / "src")
    out = tmp_path / "out"
    res = import_dataset("voc", src, out)
    coco = load(out)
    assert coco == res.coco
    # classes found in the files, sorted; the same list in both splits
    assert [(c["id"], c["name"]) for c in coco["train"]["categories"]] == [(1, "Car"), (2, "Tree")]
    assert coco["val"]["categories"] == coco["train"]["categories"]
    # 5 images, val fraction 0.2 -> one val image; the negative image is kept
    assert (len(coco["train"]["images"]), len(coco["val"]["images"])) == (4, 1)
    assert_boxes_match_pixels(out, coco, lambda f: f.removeprefix("JPEGImages/").removesuffix(".png"))
    files = by_file(coco)
    assert files["JPEGImages/d.png"][1] == {}
    for d in coco.values():
        assert [im["id"] for im in d["images"]] == list(range(1, len(d["images"]) + 1))
        assert [a["id"] for a in d["annotations"]] == list(range(1, len(d["annotations"]) + 1))
        assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in d["annotations"])
        assert all(isinstance(v, float) for a in d["annotations"] for v in a["bbox"])
    # images are symlinks to the absolute source paths; pycocotools and our validator accept the folder
    link = out / "images" / "JPEGImages" / "a.png"
    assert link.is_symlink() and os.readlink(link) == str((src / "JPEGImages" / "a.png").resolve())
    assert len(COCO(str(out / "annotations" / "train.json")).getAnnIds()) == len(coco["train"]["annotations"])
    for split in ("train", "val"):
        assert validate_coco(out / "annotations" / f"{split}.json", out / "images").ok
    assert res.split_from == "random by image, val fraction 0.2, seed 0"


def test_voc_layout_variants(tmp_path):
    """Missing <size> (read from the image), <size> 0, images beside the XML, float coordinates, difficult."""
    src = tmp_path / "src"
    (src / "Annotations").mkdir(parents=True)
    draw(src / "JPEGImages" / "a.jpg", [], size=(50, 40))
    (src / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", [voc_object("Tree", (3.5, 4, 12.5, 9))], size=None))
    draw(src / "Annotations" / "b.png", [], size=(30, 20))  # beside its XML, which names no file
    (src / "Annotations" / "b.xml").write_text(
        "<annotation><size><width>0</width><height>0</height></size>"
        + voc_object("Car", (1, 1, 30, 20), difficult=1) + "</annotation>")
    out = tmp_path / "out"
    res = import_dataset("voc", src, out)
    files = by_file(res.coco)
    im, boxes = files["JPEGImages/a.jpg"]
    assert (im["width"], im["height"]) == (50, 40) and im["voc_id"] == "a"
    assert boxes == {"Tree": [[2.5, 3.0, 10.0, 6.0]]}  # x = xmin - 1, w = xmax - xmin + 1
    im, boxes = files["Annotations/b.png"]
    assert (im["width"], im["height"]) == (30, 20) and boxes == {"Car": [[0.0, 0.0, 30.0, 20.0]]}
    crowd = [a for d in res.coco.values() for a in d["annotations"] if a["difficult"]]
    assert len(crowd) == 1 and crowd[0]["iscrowd"] == 1 and res.report.notes == {"difficult as crowd": 1}
    res = import_dataset("voc", src, out, overwrite=True, difficult="drop")
    assert sum(len(d["annotations"]) for d in res.coco.values()) == 1


def test_voc_flat_labelimg_folder(tmp_path):
    """LabelImg's default: the XML files beside the images in one folder."""
    src = tmp_path / "src"
    for stem, boxes in SCENES.items():
        draw(src / f"{stem}.png", boxes)
        (src / f"{stem}.xml").write_text(voc_xml(f"{stem}.png", voc_pixel_objects(boxes)))
    res = import_dataset("voc", src, tmp_path / "out")
    assert_boxes_match_pixels(tmp_path / "out", res.coco, lambda f: f.removesuffix(".png"))


def test_voc_imagesets_are_used(tmp_path):
    src = make_voc(tmp_path / "src", imagesets={"train": ["c", "a", "b"], "val": ["d", "e"],
                                                 "trainval": list("abcd"), "test": ["e"]})
    res = import_dataset("voc", src, tmp_path / "out")
    assert [im["voc_id"] for im in res.coco["train"]["images"]] == ["c", "a", "b"]  # split-file order
    assert [im["voc_id"] for im in res.coco["val"]["images"]] == ["d", "e"]
    assert res.split_from == "ImageSets/Main/train.txt, val.txt"
    res = import_dataset("voc", src, tmp_path / "out", overwrite=True, split_train="trainval", split_val="test")
    assert [len(res.coco[s]["images"]) for s in ("train", "val")] == [4, 1]
    (src / "ImageSets" / "Main" / "test.txt").write_text("e\nb\na\n")
    with pytest.raises(DatasetError, match=r"trainval.txt and test.txt share 2 ids \(a, b\); train and val must not "):
        import_dataset("voc", src, tmp_path / "out2", split_train="trainval", split_val="test")
    with pytest.raises(DatasetError, match=r"split file not found: .*nosuch.txt; splits there: test, train, "
                                           r"trainval, val \(choose them with --split-train NAME --split-val NAME"):
        import_dataset("voc", src, tmp_path / "out2", split_val="nosuch")
    with pytest.raises(DatasetError, match="has its own train/val split .*--val-fraction applies only"):
        import_dataset("voc", src, tmp_path / "out2", val_fraction=0.5)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("names_as_dict", [False, True])
def test_yolo(tmp_path, names_as_dict):
    # class order is YOLO's index order (not alphabetical): Tree is class 0
    src = make_yolo(tmp_path / "src", names=("Tree", "Car"), names_as_dict=names_as_dict)
    out = tmp_path / "out"
    res = import_dataset("yolo", src / "data.yaml", out)
    assert [(c["id"], c["name"]) for c in res.coco["train"]["categories"]] == [(1, "Tree"), (2, "Car")]
    assert [im["file_name"] for im in res.coco["val"]["images"]] == ["images/val/e.png"]
    assert [im["file_name"] for im in res.coco["train"]["images"]] == [f"images/train/{s}.png" for s in "abcd"]
    # YOLO's fractions do not come back to whole pixels exactly in floating point
    assert_boxes_match_pixels(out, res.coco, lambda f: f.rsplit("/", 1)[1][0], approx=True)
    assert by_file(res.coco)["images/train/d.png"][1] == {}  # no label file: a negative image
    assert res.split_from == "data.yaml train/val"


def test_yolo_path_key_folder_source_and_no_val(tmp_path):
    src = make_yolo(tmp_path / "src", path_key=True, splits={"train": list("abcde")})
    (src / "data.yaml").write_text("path: ds\ntrain: images/train\nnames: [Car, Tree]\n")
    res = import_dataset("yolo", src, tmp_path / "out", val_fraction=0.4)  # the folder holding data.yaml
    assert [len(res.coco[s]["images"]) for s in ("train", "val")] == [3, 2]
    assert res.split_from.startswith("random")


@pytest.mark.parametrize("header", [True, False])
def test_csv(tmp_path, header):
    src = make_csv(tmp_path / "src", header=header)
    out = tmp_path / "out"
    res = import_dataset("csv", src, out, seed=3)
    assert [c["name"] for c in res.coco["train"]["categories"]] == ["Car", "Tree"]
    assert_boxes_match_pixels(out, res.coco, lambda f: f.removeprefix("images/").removesuffix(".png"))
    assert by_file(res.coco)["images/d.png"][1] == {}  # the "path,,,,," row


def test_csv_equal_basenames_in_folders_do_not_collide(tmp_path):
    src = make_csv(tmp_path / "src", folders=True)
    res = import_dataset("csv", src, tmp_path / "out")
    files = by_file(res.coco)
    assert {"val/img.png", "train/img.png"} <= set(files)
    assert files["val/img.png"][1] == {"Tree": [[4.0, 6.0, 16.0, 24.0]], "Car": [[30.0, 10.0, 22.0, 12.0]]}
    assert files["train/img.png"][1] == {"Car": [[0.0, 0.0, 10.0, 8.0]]}


def test_random_split_is_deterministic_by_image():
    names = [f"img{i:02d}.jpg" for i in range(10)]
    val = split_names(names, 0.2, 0)
    assert len(val) == 2 and val == split_names(list(reversed(names)), 0.2, 0)  # input order does not matter
    assert len({frozenset(split_names(names, 0.2, s)) for s in range(10)}) > 1  # the seed matters
    assert len(split_names(names[:2], 0.01, 0)) == 1 and len(split_names(names[:2], 0.99, 0)) == 1
    assert split_names(names[:1], 0.5, 0) == set()


def test_classes_file(tmp_path):
    src = make_voc(tmp_path / "src")
    classes = tmp_path / "classes.txt"
    classes.write_text("Tree\nCar\nBike\n")
    res = import_dataset("voc", src, tmp_path / "out", classes=classes)
    assert [(c["id"], c["name"]) for c in res.coco["val"]["categories"]] == [(1, "Tree"), (2, "Car"), (3, "Bike")]
    classes.write_text("Tree\n")
    with pytest.raises(DatasetError, match=r"3 objects of an unknown class \(file object # Annotations/a.xml "
                                           r"object #1 \('Car'\).*pass --skip-bad to skip them"):
        import_dataset("voc", src, tmp_path / "out2", classes=classes)
    assert not (tmp_path / "out2").exists()
    res = import_dataset("voc", src, tmp_path / "out2", classes=classes, skip_bad=True)
    assert res.report.counts == {"unknown_class": 3}
    assert [c["name"] for c in res.coco["train"]["categories"]] == ["Tree"]
    assert sum(len(b["Tree"]) for _, b in by_file(res.coco).values() if b) == 3
    classes.write_text("Tree\nTree\n")
    with pytest.raises(DatasetError, match="class 'Tree' is listed twice"):
        import_dataset("voc", src, tmp_path / "out3", classes=classes)


def test_copy_instead_of_links(tmp_path):
    src = make_csv(tmp_path / "src")
    import_dataset("csv", src, tmp_path / "out", copy=True)
    copied = tmp_path / "out" / "images" / "images" / "a.png"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (tmp_path / "src" / "images" / "a.png").read_bytes()  # never re-encoded


def test_existing_output_is_refused_then_replaced(tmp_path):
    src = make_csv(tmp_path / "src")
    out = tmp_path / "out"
    import_dataset("csv", src, out)
    (out / "notes.txt").write_text("mine")
    before = (out / "annotations" / "train.json").read_bytes()
    with pytest.raises(DatasetError, match=r"output exists: .*train.json; pass --overwrite"):
        import_dataset("csv", src, out, seed=1)
    assert (out / "annotations" / "train.json").read_bytes() == before
    import_dataset("csv", src, out, seed=1, overwrite=True)
    assert (out / "annotations" / "train.json").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # only annotations/ and images/ are replaced
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "images", "notes.txt"]  # no staging left


def test_bad_entries_stop_the_import_or_are_skipped(tmp_path):
    src = make_voc(tmp_path / "src")
    (src / "Annotations" / "f.xml").write_text("<annotation><object>\n<name>Car")  # broken
    (src / "Annotations" / "g.xml").write_text(voc_xml("g.png", [voc_object("Car", (1, 1, 5, 5))]))  # no image
    (src / "Annotations" / "a.xml").write_text(voc_xml("a.png", [voc_object("Car", (20, 5, 10, 15)),  # xmax < xmin
                                                                 voc_object("Car", (70, 50, 80, 60)),  # outside
                                                                 voc_object("Tree", (2, 2, 9, 9))]))
    (src / "JPEGImages" / "b.png").write_bytes(b"not an image")
    (src / "Annotations" / "c.xml").write_text(voc_xml("c.png", [], size=(100, 100)))  # image is 64x48
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as e:
        import_dataset("voc", src, out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{src}: 6 bad entries: ")
    for part in ("1 unparsable XML files (file:line:col Annotations/f.xml:2:", "g.png (named by Annotations/g.xml)",
                 "1 images that cannot be read as an image (files JPEGImages/b.png (UnidentifiedImageError)",
                 "JPEGImages/c.png is 64x48, Annotations/c.xml says 100x100",
                 "(file object # Annotations/a.xml object #0)",
                 "1 boxes entirely outside their image (file object # Annotations/a.xml object #1)",
                 "pass --skip-bad to skip them"):
        assert part in msg, part
    assert not out.exists()
    res = import_dataset("voc", src, out, skip_bad=True)
    assert res.report.counts == {"broken_xml": 1, "missing_file": 1, "unreadable_image": 1, "size_mismatch": 1,
                                 "nonpositive_size": 1, "outside_image": 1}
    assert sorted(by_file(res.coco)) == ["JPEGImages/a.png", "JPEGImages/d.png", "JPEGImages/e.png"]
    assert by_file(res.coco)["JPEGImages/a.png"][1] == {"Tree": [[1.0, 1.0, 8.0, 8.0]]}


def test_yolo_and_csv_bad_lines(tmp_path):
    src = make_yolo(tmp_path / "yolo")
    (src / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2\n1 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n"
                                                    "0 30 20 10 10\n")
    with pytest.raises(DatasetError) as e:
        import_dataset("yolo", src, tmp_path / "out")
    msg = str(e.value)
    assert "2 label lines that are not 'class cx cy w h'" in msg and "labels/train/a.txt:1, labels/train/a.txt:4" \
        in msg and "labels/train/a.txt:3 (class 7; names has 2)" in msg
    csv = make_csv(tmp_path / "csv")
    with open(csv, "a") as f:
        f.write("images/a.png,1,2,x,4,Car\nimages/zz.png,1,2,3,4,Car\nimages/a.png,1,2,3,4\n")
    with pytest.raises(DatasetError) as e:
        import_dataset("csv", csv, tmp_path / "out")
    msg = str(e.value)
    assert "2 rows that are not image_path,xmin,ymin,xmax,ymax,label" in msg and "labels.csv:9, labels.csv:11" \
        in msg and "1 images whose file is missing (files images/zz.png)" in msg


@pytest.mark.parametrize("fmt, make, expected", [
    ("voc", lambda p: p.mkdir(), "no annotation XML files; expected a Pascal VOC folder"),
    ("yolo", lambda p: p.mkdir(), "expected an Ultralytics data.yaml"),
    ("csv", lambda p: p.mkdir(), "CSV source is not a file"),
    ("voc", lambda p: None, "voc source not found: .*; expected a Pascal VOC folder"),
])
def test_not_a_source_of_the_format(tmp_path, fmt, make, expected):
    make(tmp_path / "src")
    with pytest.raises(DatasetError, match=expected):
        import_dataset(fmt, tmp_path / "src", tmp_path / "out")


def test_option_of_another_format_and_bad_fraction(tmp_path):
    src = make_csv(tmp_path / "src")
    with pytest.raises(DatasetError, match="--difficult does not apply to csv; only to: voc"):
        import_dataset("csv", src, tmp_path / "out", difficult="keep")
    with pytest.raises(DatasetError, match="--val-fraction 1.0 is not valid"):
        import_dataset("csv", src, tmp_path / "out", val_fraction=1.0)


def test_out_holding_the_source_images_is_refused(tmp_path):
    src = make_yolo(tmp_path / "src")
    with pytest.raises(DatasetError, match="its images/ folder holds source images"):
        import_dataset("yolo", src, src, overwrite=True)
    assert (src / "images" / "train" / "a.png").is_file() and not (src / "annotations").exists()


def test_imported_folder_loads_with_coco_data(tmp_path):
    src = make_voc(tmp_path / "src", imagesets={"train": ["a", "b", "c"], "val": ["d", "e"]})
    out = tmp_path / "out"
    import_dataset("voc", src, out)
    data = CocoData(root=str(out), train_ann="annotations/train.json", val_ann="annotations/val.json",
                    train_images="images", val_images="images")
    data.prepare()
    assert [c["name"] for c in data.categories] == ["Car", "Tree"] and data.num_classes == 2
    image, target = data.dataset("train")[0]  # image a
    assert image.shape == (3, H, W)
    assert target["boxes"].tolist() == [[4, 6, 20, 30], [30, 10, 52, 22]] and target["labels"].tolist() == [2, 1]
    # the rectangle's pixels are where the box says
    assert image[:, 6, 4].tolist() == pytest.approx([0, 200 / 255, 0]) and image[:, 30, 20].tolist() == [
        pytest.approx(128 / 255)] * 3
    assert len(data.dataset("val")) == 2


def test_overlapping_yolo_splits_and_sources_without_objects(tmp_path):
    src = make_yolo(tmp_path / "yolo")
    (src / "data.yaml").write_text("train: images/train\nval: [images/val, images/train]\nnames: [Car, Tree]\n")
    with pytest.raises(DatasetError, match=r"data.yaml: train and val share 4 images .*must not overlap"):
        import_dataset("yolo", src, tmp_path / "out")
    csv = tmp_path / "csv" / "labels.csv"
    draw(tmp_path / "csv" / "a.png", [])
    csv.write_text("a.png,,,,,\n")
    with pytest.raises(DatasetError, match="no objects in any image; .* give --classes FILE"):
        import_dataset("csv", csv, tmp_path / "out")
    classes = tmp_path / "classes.txt"
    classes.write_text("Car\n")
    res = import_dataset("csv", csv, tmp_path / "out", classes=classes)
    assert [len(res.coco[s]["images"]) for s in ("train", "val")] == [1, 0]


def test_an_annotations_folder_with_other_files_is_never_replaced(tmp_path):
    """A folder where `convert-voc` wrote its JSON (or a CSV lives) is refused, --overwrite or not: the import
    replaces annotations/ as a whole."""
    src = make_voc(tmp_path / "src")
    out = tmp_path / "out"
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / "instances_trainval.json").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match="holds files an import did not write .instances_trainval.json"):
            import_dataset("voc", src, out, overwrite=overwrite)
    assert (out / "annotations" / "instances_trainval.json").read_text() == "{}"


def test_a_failed_publish_puts_the_previous_import_back(tmp_path, monkeypatch):
    src = make_voc(tmp_path / "src")
    out = tmp_path / "out"
    import_dataset("voc", src, out)
    before = (out / "annotations" / "train.json").read_text()
    links = sorted(p.name for p in (out / "images").rglob("*"))
    real_replace = os.replace

    def failing(a, b):  # moving the new annotations/ in fails, after images/ was swapped in
        if str(a).endswith("annotations") and ".import-" in str(a) and "old" not in Path(a).parts:
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        import_dataset("voc", src, out, overwrite=True, val_fraction=0.5, seed=3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "annotations" / "train.json").read_text() == before
    assert sorted(p.name for p in (out / "images").rglob("*")) == links
    assert [p.name for p in out.iterdir() if p.name.startswith(".import-")] == []
