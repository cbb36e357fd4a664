"""VOC -> COCO conversion on a tiny VOC folder written here."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from iouctl.data.coco import CocoData, DatasetError, validate_coco
from iouctl.data.voc import VOC_CLASSES, convert_voc

W, H = 40, 30


def obj_xml(name, box, difficult=0, truncated=0):
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><truncated>{truncated}</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def ann_xml(vid, objects, w=W, h=H):
    return (f"<annotation><folder>VOC2007</folder><filename>{vid}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{''.join(objects)}</annotation>")


def make_voc(root, entries, split="trainval", jpeg=True):
    """entries: {voc_id: xml text}; writes Annotations/, ImageSets/Main/<split>.txt and JPEGImages/."""
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for vid, xml in entries.items():
        (root / "Annotations" / f"{vid}.xml").write_text(xml)
        if jpeg:
            Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / "JPEGImages" / f"{vid}.jpg")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


GOOD = {
    "000005": ann_xml("000005", [obj_xml("chair", (10, 20, 30, 25)), obj_xml("dog", (1, 1, 40, 30), difficult=1)]),
    "000007": ann_xml("000007", [obj_xml("car", (5, 6, 5, 6), truncated=1)]),  # a one-pixel box
    "2008_000002": ann_xml("2008_000002", [obj_xml("tvmonitor", (3.5, 4, 12.5, 9))]),
}


def voc_box_via_pixels(box, w=W, h=H):
    """COCO [x, y, w, h] of a VOC 1-based inclusive integer box, derived from a pixel mask: 1-based pixel k is
    0-based index k-1 and covers [k-1, k)."""
    xmin, ymin, xmax, ymax = box
    mask = np.zeros((h, w), bool)
    mask[ymin - 1:ymax, xmin - 1:xmax] = True  # rows/cols ymin..ymax and xmin..xmax, 1-based inclusive
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_convert_good_folder(tmp_path):
    root = make_voc(tmp_path / "VOC2007", GOOD)
    out, rep = convert_voc(root)
    assert out == root / "annotations" / "instances_trainval.json"
    assert rep.ok and rep.num_images == 3 and rep.num_annotations == 4
    assert rep.notes == {"difficult as crowd": 1} and "1 difficult as crowd" in rep.summary()
    data = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == list(enumerate(VOC_CLASSES, start=1))
    assert [(im["id"], im["file_name"], im["width"], im["height"], im["voc_id"]) for im in data["images"]] == [
        (1, "000005.jpg", W, H, "000005"), (2, "000007.jpg", W, H, "000007"),
        (3, "2008_000002.jpg", W, H, "2008_000002")]
    anns = data["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4]
    assert [VOC_CLASSES[a["category_id"] - 1] for a in anns] == ["chair", "dog", "car", "tvmonitor"]
    # integer boxes: exact, checked against a pixel-mask derivation of the 1-based inclusive convention
    assert anns[0]["bbox"] == voc_box_via_pixels((10, 20, 30, 25)) == [9, 19, 21, 6]
    assert anns[1]["bbox"] == voc_box_via_pixels((1, 1, 40, 30)) == [0, 0, W, H]  # whole image
    assert anns[2]["bbox"] == [4, 5, 1, 1]
    # float coordinates use the same formula: x = xmin - 1, w = xmax - xmin + 1 (exact in binary: .5 values)
    assert anns[3]["bbox"] == [2.5, 3, 10.0, 6]
    assert [a["iscrowd"] for a in anns] == [0, 1, 0, 0]
    assert [a["difficult"] for a in anns] == [0, 1, 0, 0] and [a["truncated"] for a in anns] == [0, 0, 1, 0]
    assert [a["area"] for a in anns] == [a["bbox"][2] * a["bbox"][3] for a in anns]
    # the output is a valid COCO file for pycocotools and for our own reader, images included
    coco = COCO(str(out))
    assert len(coco.getAnnIds(iscrowd=False)) == 3
    assert validate_coco(out, root / "JPEGImages").ok
    ds = CocoData(str(root), "annotations/instances_trainval.json", "annotations/instances_trainval.json",
                  "JPEGImages", "JPEGImages").dataset("val")
    image, target = ds[0]
    assert image.shape == (3, H, W) and target["boxes"].tolist() == [[9, 19, 30, 25], [0, 0, 40, 30]]


@pytest.mark.parametrize("policy, n, crowd", [("crowd", 4, [0, 1, 0, 0]), ("keep", 4, [0, 0, 0, 0]),
                                              ("drop", 3, [0, 0, 0])])
def test_difficult_policies(tmp_path, policy, n, crowd):
    root = make_voc(tmp_path, GOOD)
    out, rep = convert_voc(root, difficult=policy)
    anns = json.loads(out.read_text())["annotations"]
    assert len(anns) == n and [a["iscrowd"] for a in anns] == crowd
    with pytest.raises(DatasetError, match="difficult='ignore' is not valid; valid: crowd, keep, drop"):
        convert_voc(root, difficult="ignore", overwrite=True)


def bad_folder(tmp_path):
    entries = dict(GOOD)
    entries["000009"] = "<annotation><size><width>40</width>\n<height>30</height></size>\n<object><name>cat</name"
    entries["000012"] = ann_xml("000012", [obj_xml("cat", (2, 2, 9, 9)), obj_xml("cat", (20, 5, 10, 15)),
                                           obj_xml("unicorn", (2, 2, 9, 9)), obj_xml("cat", (2, "a", 9, 9))])
    return make_voc(tmp_path / "VOC2007", entries)


def test_broken_xml_and_bad_boxes_are_reported(tmp_path):
    root = bad_folder(tmp_path)
    with pytest.raises(DatasetError) as e:
        convert_voc(root)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{root}: 4 bad entries: ")
    assert "1 unparsable XML files (file:line:col Annotations/000009.xml:3:" in msg
    assert "(file object # Annotations/000012.xml object #1)" in msg
    assert "Annotations/000012.xml object #2 ('unicorn')" in msg
    assert "Annotations/000012.xml object #3" in msg
    assert "pass --skip-bad to skip them (other class names: --classes FILE, or `iouctl data import voc`)" in msg
    assert not (root / "annotations").exists()  # nothing written on error


def test_skip_bad_counts_every_kind(tmp_path):
    root = bad_folder(tmp_path)
    (root / "JPEGImages" / "000007.jpg").unlink()
    with open(root / "ImageSets" / "Main" / "trainval.txt", "a") as f:
        f.write("000099\n")  # listed but without XML
    out, rep = convert_voc(root, skip_bad=True)
    assert rep.counts == {"broken_xml": 1, "nonpositive_size": 1, "unknown_class": 1, "bad_box": 1,
                          "missing_file": 1, "missing_xml": 1}
    data = json.loads(out.read_text())
    assert [im["voc_id"] for im in data["images"]] == ["000005", "2008_000002", "000012"]
    # 000012 keeps its one good object
    assert [a["bbox"] for a in data["annotations"] if a["image_id"] == 3] == [[1, 1, 8, 8]]
    assert "skipped" in rep.summary() and "unparsable XML" in rep.summary()


def test_never_overwrites_unless_asked(tmp_path):
    root = make_voc(tmp_path, GOOD)
    out = tmp_path / "custom" / "voc.json"
    convert_voc(root, out=out)
    before = out.read_bytes()
    out.write_text("user data")
    with pytest.raises(DatasetError, match=r"output exists: .*voc.json; pass --overwrite"):
        convert_voc(root, out=out)
    assert out.read_text() == "user data"
    convert_voc(root, out=out, overwrite=True)
    assert out.read_bytes() == before


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="VOC root not found"):
        convert_voc(tmp_path / "nowhere")
    devkit = tmp_path / "VOCdevkit"
    make_voc(devkit / "VOC2012", GOOD, split="train")
    with pytest.raises(DatasetError, match=r"not a VOC folder: missing Annotations.*did you mean .*VOC2012\?"):
        convert_voc(devkit)
    with pytest.raises(DatasetError, match=r"split file not found: .*trainval.txt; splits there: train"):
        convert_voc(devkit / "VOC2012")


def test_bad_size_is_reported(tmp_path):
    root = make_voc(tmp_path, {"000001": ann_xml("000001", [obj_xml("cat", (1, 1, 5, 5))], w=0)})
    with pytest.raises(DatasetError, match=r"without a valid <size>.*Annotations/000001.xml"):
        convert_voc(root)


def test_custom_classes(tmp_path):
    objects = [obj_xml("Tree", (1, 1, 5, 5)), obj_xml("car", (2, 2, 4, 4))]
    root = make_voc(tmp_path, {"000001": ann_xml("000001", objects)})
    out, rep = convert_voc(root, classes=["Tree", "car"])
    data = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "Tree"), (2, "car")]
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [(1, [0, 0, 5, 5]), (2, [1, 1, 3, 3])]


def test_import_voc_on_a_pascal_folder(tmp_path):
    """`iouctl data import voc` on a Pascal-layout folder: the classes found, with the same box convention."""
    from iouctl.data.importers import import_dataset

    root = make_voc(tmp_path / "VOC2007", GOOD, split="train")
    (root / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n")
    (root / "ImageSets" / "Main" / "train.txt").write_text("000005\n000007\n")
    res = import_dataset("voc", root, tmp_path / "out")
    assert [c["name"] for c in res.coco["train"]["categories"]] == ["car", "chair", "dog", "tvmonitor"]
    assert [im["file_name"] for im in res.coco["train"]["images"]] == ["JPEGImages/000005.jpg", "JPEGImages/000007.jpg"]
    assert [a["bbox"] for a in res.coco["train"]["annotations"]] == [[9, 19, 21, 6], [0, 0, W, H], [4, 5, 1, 1]]
    assert [a["bbox"] for a in res.coco["val"]["annotations"]] == [[2.5, 3, 10.0, 6]]
