"""A COCO file_name cannot make iouctl read files outside the image folder unless data.allow_outside=true."""
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from iouctl.cli import app
from iouctl.data.coco import CocoData, CocoDetectionDataset, DatasetError, leaves_folder, validate_coco

runner = CliRunner()


@pytest.mark.parametrize("name, outside", [
    ("a.png", False), ("sub/a.png", False), ("sub/../a.png", False), ("./a.png", False), ("..a.png", False),
    ("../secret.png", True), ("../../secret.png", True), ("sub/../../secret.png", True), ("..", True),
    ("/etc/passwd", True), ("\\\\server\\share\\x.png", True), ("C:/x.png", True), ("c:\\x.png", True),
    ("..\\secret.png", True),
])
def test_leaves_folder(name, outside):
    assert leaves_folder(name) is outside


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(path)


def _dataset(root, names):
    """root/images/{a,b}.png, root/secret.png, and root/annotations/{train,val}.json naming `names`."""
    _image(root / "images" / "a.png", 10)
    _image(root / "images" / "b.png", 20)
    _image(root / "secret.png", 250)
    ann = {"images": [{"id": i + 1, "file_name": n, "width": 10, "height": 8} for i, n in enumerate(names)],
           "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 4, 4]}
                           for i in range(len(names))],
           "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps(ann))
    return root / "annotations" / "train.json"


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_outside_file_name_is_a_bad_entry_unless_allowed(tmp_path, how):
    secret = "../secret.png" if how == "relative" else str(tmp_path / "secret.png")
    ann = _dataset(tmp_path, ["a.png", secret, "b.png"])
    with pytest.raises(DatasetError) as e:
        validate_coco(ann, tmp_path / "images")
    msg = str(e.value)
    assert "\n" not in msg and "1 images whose file_name leads outside the image folder" in msg
    assert f"2: {secret}" in msg and "data.allow_outside=true" in msg and "data.skip_bad=true" in msg

    rep = validate_coco(ann, tmp_path / "images", skip_bad=True)
    assert rep.counts == {"outside_folder": 1} and [im["id"] for im in rep.images] == [1, 3]
    assert rep.on_skipped_image == 1  # its box counted as dropped, not silently lost

    ds = CocoDetectionDataset(tmp_path / "images", ann, allow_outside=True)
    assert ds.image_ids == [1, 2, 3] and ds[1][0].mean().item() == pytest.approx(250 / 255)  # the file it named
    assert validate_coco(ann).ok  # without an image folder no file is read: a name is only a name


def test_coco_data_key_and_cli(tmp_path):
    _dataset(tmp_path, ["a.png", "../secret.png"])
    with pytest.raises(DatasetError, match="outside the image folder"):
        CocoData(str(tmp_path)).prepare()
    allowed = CocoData(str(tmp_path), allow_outside=True)
    allowed.prepare()
    assert len(allowed.dataset("train")) == 2

    r = runner.invoke(app, ["data", "check", "data=coco", f"data.root={tmp_path}"])
    assert r.exit_code == 1 and "file_name leads outside the image folder, absolute or through '..' (allowed with " \
        "data.allow_outside=true) (image id: file 2: ../secret.png)" in " ".join(r.stderr.split())
    r = runner.invoke(app, ["data", "check", "data=coco", f"data.root={tmp_path}", "data.allow_outside=true"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "check", "data=coco", f"data.root={tmp_path}", "data.allow_outside=maybe"])
    assert r.exit_code == 2 and "data.allow_outside" in r.stderr and "Traceback" not in r.output
