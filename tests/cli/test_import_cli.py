"""`iouctl data import` through the Typer app: the summary, and one line with exit code 2 for each kind of bad input."""
import json

import pytest
from typer.testing import CliRunner

from iouctl.cli import app
from tests.data.import_fixtures import draw, make_csv, make_voc, make_yolo, voc_object, voc_xml

runner = CliRunner()


@pytest.mark.slow
def test_import_prints_summary_and_how_to_use_it(tmp_path):
    src = make_voc(tmp_path / "src")
    (src / "Annotations" / "a.xml").write_text(voc_xml("a.png", [voc_object("Tree", (5, 7, 20, 30), difficult=1),
                                                                 voc_object("Car", (31, 11, 52, 22))]))
    out = tmp_path / "out"
    r = runner.invoke(app, ["data", "import", "voc", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stderr.split())
    assert f"imported 5 images, 6 boxes into {out} (split: random by image, val fraction 0.2, seed 0)" in text
    assert "boxes per class" in text and "1 difficult as crowd" in text
    assert f"use it: iouctl train data=coco data.root={out}" in text
    rows = [ln.split() for ln in r.stderr.splitlines()]
    # images table: split, images, width, height, objects per image, without objects, boxes (non-crowd), crowd
    per_split = {t[0]: [int(t[i]) for i in (1, 5, 6, 7)] for t in rows if len(t) == 8 and t[0] in ("train", "val")}
    assert [a + b for a, b in zip(per_split["train"], per_split["val"])] == [5, 1, 5, 1]
    # box sizes: train and val rows for sqrt(w*h), width, height, aspect; per class: non-crowd boxes
    assert sum(t[1] == "sqrt(w*h)" for t in rows if len(t) == 9) == 2
    per_class = {t[0]: int(t[1]) + int(t[2]) for t in rows if len(t) == 3 and t[0] in ("Car", "Tree")}
    assert per_class == {"Car": 3, "Tree": 2}
    assert json.loads((out / "annotations" / "val.json").read_text())["categories"][0]["name"] == "Car"

    r = runner.invoke(app, ["data", "import", "voc", str(src), "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.strip() == (f"error: output exists: {out}/annotations/train.json; pass "
                                                     f"--overwrite to replace {out}/annotations and {out}/images")
    r = runner.invoke(app, ["data", "import", "voc", str(src), "--out", str(out), "--overwrite", "--copy"])
    assert r.exit_code == 0, r.output
    assert not (out / "images" / "JPEGImages" / "a.png").is_symlink()


@pytest.mark.slow
def test_skip_bad_reports_what_was_skipped(tmp_path):
    csv = make_csv(tmp_path / "src")
    with open(csv, "a") as f:
        f.write("images/a.png,1,2,3\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["data", "import", "csv", str(csv), "--out", str(out)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = runner.invoke(app, ["data", "import", "csv", str(csv), "--out", str(out), "--skip-bad"])
    assert r.exit_code == 0, r.output
    assert "skipped 1 rows that are not image_path,xmin,ymin,xmax,ymax,label (or image_path,,,,,) (file:line " \
           "labels.csv:9)" in " ".join(r.stderr.split())


def _voc(tmp_path, xml, image=True):
    src = make_voc(tmp_path / "src", scenes={"a": []})
    (src / "Annotations" / "a.xml").write_text(xml)
    if not image:
        (src / "JPEGImages" / "a.png").unlink()
    return src


def _yolo_line(tmp_path, line):
    src = make_yolo(tmp_path / "src")
    (src / "labels" / "train" / "b.txt").write_text(line)
    return src


def _csv_row(tmp_path, row):
    csv = make_csv(tmp_path / "src")
    with open(csv, "a") as f:
        f.write(row)
    return csv


BAD = {
    "broken XML": ("voc", lambda p: _voc(p, "<annotation>\n<object><name>Car</name"),
                   "1 unparsable XML files (file:line:col Annotations/a.xml:2:"),
    "xmax < xmin": ("voc", lambda p: _voc(p, voc_xml("a.png", [voc_object("Car", (20, 5, 10, 15))])),
                    "1 boxes with zero or negative width or height (file object # Annotations/a.xml object #0)"),
    "box outside the image": ("voc", lambda p: _voc(p, voc_xml("a.png", [voc_object("Car", (65, 1, 70, 5))])),
                              "1 boxes entirely outside their image (file object # Annotations/a.xml object #0)"),
    "non-numeric box": ("voc", lambda p: _voc(p, voc_xml("a.png", [voc_object("Car", (1, "x", 5, 5))])),
                        "1 objects without a numeric <bndbox> xmin/ymin/xmax/ymax (file object # Annotations/a.xml "
                        "object #0)"),
    "empty class name": ("voc", lambda p: _voc(p, voc_xml("a.png", [voc_object("", (1, 1, 5, 5))])),
                         "1 objects without a class <name> (file object # Annotations/a.xml object #0)"),
    "bad size": ("voc", lambda p: _voc(p, voc_xml("a.png", [], size=(-4, 48))),
                 "1 XML files without a valid <size> width/height (files Annotations/a.xml)"),
    "size mismatch": ("voc", lambda p: _voc(p, voc_xml("a.png", [], size=(640, 480))),
                      "1 images whose size differs from their annotation's (files JPEGImages/a.png is 64x48, "
                      "Annotations/a.xml says 640x480)"),
    "missing image": ("voc", lambda p: _voc(p, voc_xml("a.png", []), image=False),
                      "1 images whose file is missing (files a.png (named by Annotations/a.xml))"),
    "unreadable image": ("voc", lambda p: (make_voc(p / "src", scenes={"a": []}), (p / "src" / "JPEGImages" / "a.png")
                                           .write_bytes(b"\x89PNG garbage"))[0],
                         "1 images that cannot be read as an image (files JPEGImages/a.png (UnidentifiedImageError))"),
    "label line with 4 numbers": ("yolo", lambda p: _yolo_line(p, "0 0.5 0.5 0.1 0.1\n1 0.5 0.5 0.1\n"),
                                  "1 label lines that are not 'class cx cy w h' with a class index and fractions in "
                                  "[0, 1] (file:line labels/train/b.txt:2)"),
    "label in pixels": ("yolo", lambda p: _yolo_line(p, "0 32 24 10 10\n"),
                        "(file:line labels/train/b.txt:1)"),
    "class index without a name": ("yolo", lambda p: _yolo_line(p, "5 0.5 0.5 0.1 0.1\n"),
                                   "1 objects of an unknown class (file:line labels/train/b.txt:1 (class 5; names "
                                   "has 2))"),
    "csv row": ("csv", lambda p: _csv_row(p, "images/a.png,1,2,3,four,Car\n"),
                "1 rows that are not image_path,xmin,ymin,xmax,ymax,label (or image_path,,,,,) (file:line "
                "labels.csv:9)"),
    "csv missing image": ("csv", lambda p: _csv_row(p, "images/zz.png,1,2,3,4,Car\n"),
                          "1 images whose file is missing (files images/zz.png)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_entry_is_one_line_exit_2(tmp_path, case):
    fmt, make, expected = BAD[case]
    src = make(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["data", "import", fmt, str(src), "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: 1 bad entries: ")
    assert expected in lines[0] and lines[0].endswith("pass --skip-bad to skip them")
    assert "Traceback" not in r.output and not out.exists()


def test_unknown_class_with_classes_file(tmp_path):
    src = make_yolo(tmp_path / "src")
    classes = tmp_path / "classes.txt"
    classes.write_text("Car\n")
    r = runner.invoke(app, ["data", "import", "yolo", str(src), "--out", str(tmp_path / "out"), "--classes",
                            str(classes)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "3 objects of an unknown class (file:line labels/train/a.txt:1 ('Tree')" in r.stderr


@pytest.mark.parametrize("args, expected", [
    (["voc", "{tmp}/nowhere"], "error: voc source not found: {tmp}/nowhere; expected a Pascal VOC folder"),
    (["yolo", "{tmp}/empty"], "error: {tmp}/empty: expected an Ultralytics data.yaml (names, train, val) or the "
                              "folder holding it; yaml files there: none"),
    (["yolo", "{tmp}"], "error: {tmp}/data.yaml: expected a mapping with 'names', 'train' and 'val', got NoneType"),
    (["csv", "{tmp}/data.yaml"], "error: {tmp}/data.yaml: no rows; expected a CSV file"),
    (["csv", "{tmp}/x.csv", "--difficult", "keep"], "error: --difficult does not apply to csv; only to: voc"),
    (["voc", "{tmp}", "--classes", "{tmp}/none.txt"], "error: classes file not found: {tmp}/none.txt"),
])
def test_bad_source_or_option_is_one_line(tmp_path, args, expected):
    (tmp_path / "data.yaml").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.csv").write_text("a.png,,,,,\n")
    args = [a.format(tmp=tmp_path) for a in args]
    r = runner.invoke(app, ["data", "import", *args, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith(expected.format(tmp=tmp_path)), r.stderr


def test_unknown_format_lists_the_formats(tmp_path):
    r = runner.invoke(app, ["data", "import", "coco", str(tmp_path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "'coco' is not one of" in r.output and "'yolo'" in r.output


def test_yolo_imports_png_named_in_yaml_folder(tmp_path):
    """A folder source: data.yaml found in it; negative images (no label file, empty label file) kept."""
    src = make_yolo(tmp_path / "src")
    (src / "labels" / "val" / "e.txt").write_text("")
    draw(src / "images" / "val" / "f.png", [])
    r = runner.invoke(app, ["data", "import", "yolo", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    val = json.loads((tmp_path / "out" / "annotations" / "val.json").read_text())
    assert [im["file_name"] for im in val["images"]] == ["images/val/e.png", "images/val/f.png"]
    assert val["annotations"] == [] and "split: data.yaml train/val" in " ".join(r.stderr.split())
