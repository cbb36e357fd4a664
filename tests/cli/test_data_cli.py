"""`iouctl data ...` through the Typer app, on a tiny built-in dataset."""
import json

import pytest
from typer.testing import CliRunner

from iouctl.cli import app

runner = CliRunner()
TINY = ["data.num_train=6", "data.num_val=4", "data.image_size=64", "data.max_size=24"]


def test_generate_then_check_and_preview(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(app, ["data", "generate", *TINY])
    assert r.exit_code == 0, r.output
    anns = list((tmp_path / "cache" / "datasets").glob("shapes-*/annotations/instances_val.json"))
    assert len(anns) == 1 and len(json.loads(anns[0].read_text())["images"]) == 4
    r = runner.invoke(app, ["data", "check", *TINY])
    assert r.exit_code == 0 and "no problems" in r.stderr
    r = runner.invoke(app, ["data", "preview", "-n", "2", *TINY, f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    png = list((tmp_path / "runs" / "data").glob("*_preview/preview_val.png"))
    assert len(png) == 1 and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_reports_bad_annotations(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (10, 10)).save(root / "img" / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, -3, 2], "area": 1, "iscrowd": 0}]}
    for split in ("train", "val"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps(ann))
    args = ["data=coco", f"data.root={root}", "data.train_ann=annotations/train.json",
            "data.val_ann=annotations/val.json", "data.train_images=img", "data.val_images=img"]
    r = runner.invoke(app, ["data", "check", *args])
    assert r.exit_code == 1 and "7" in r.stderr and "train.json" in r.stderr
    r = runner.invoke(app, ["data", "preview", *args, f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 2 and "skip_bad" in r.stderr and "Traceback" not in r.output


def test_convert_voc_never_overwrites(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("precious")
    r = runner.invoke(app, ["data", "convert-voc", str(tmp_path / "nosuch"), "--out", str(out)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert out.read_text() == "precious"


def test_export_coco_results(tmp_path):
    import torch

    from iouctl.data.detections import Detections

    dets = Detections(torch.tensor([1, 1]), torch.tensor([[0.0, 0, 10, 10], [5, 5, 7, 9]]), torch.tensor([3, 4]),
                      torch.tensor([0.9, 0.4]), torch.tensor([0.5, 1.0]), {})
    src = dets.save(tmp_path / "val.npz")
    out = tmp_path / "res.json"
    r = runner.invoke(app, ["data", "export-coco", str(src), "--out", str(out), "--score", "fused"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res[1]["bbox"] == [5, 5, 2, 4] and res[1]["category_id"] == 4
    assert res[0]["score"] == pytest.approx((0.9 * 0.5) ** 0.5, rel=1e-6)  # cls^0.5 * IoU^0.5
    r = runner.invoke(app, ["data", "export-coco", str(src), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = runner.invoke(app, ["data", "export-coco", str(out), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "not a detections .npz" in r.stderr
