"""Every command scores a run against the run's own dataset: a run on `data=coco` (a folder laid out as
`iouctl data import` writes it, found from data.root alone) through train, eval, nms-ablate and refine; detections of
another dataset are one line; `skip_bad` cleans what is trained and what is scored alike."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from iouctl.analysis import AP_KEYS, evaluate
from iouctl.cli import app
from iouctl.data import CocoData
from iouctl.data.detections import Detections
from iouctl.engine.prepare import ground_truth

runner = CliRunner()
# experiment=tiny sizes the built-in data; these are its schedule keys alone
TINY = ["schedule.max_iters=4", "schedule.warmup_iters=1", "schedule.lr_steps=[3]", "batch_size=2", "num_workers=0",
        "eval_every=4", "checkpoint_every=2", "model.min_size=64", "model.max_size=64", "optim.lr=0.005", "eval_backend=pycocotools"]
CLASSES = ["Tree", "Car"]


def make_dataset(root, n_train=6, n_val=3, size=64, seed=0):
    """Boxes drawn as filled rectangles on noise; images/ + annotations/{train,val}.json."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    ann_id = 0  # third-party files often count from 0
    for split, n in (("train", n_train), ("val", n_val)):
        images, anns = [], []
        for i in range(n):
            img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            name = f"{split}_{i}.jpg"
            for _ in range(int(rng.integers(2, 5))):
                w, h = (int(v) for v in rng.integers(10, 24, 2))
                x, y = (int(v) for v in rng.integers(0, size - 24, 2))
                c = int(rng.integers(1, 3))
                img[y:y + h, x:x + w] = (220, 60, 60) if c == 1 else (60, 220, 60)
                anns.append({"id": ann_id, "image_id": i + 1, "category_id": c, "bbox": [x, y, w, h]})
                ann_id += 1
            Image.fromarray(img).save(root / "images" / name, quality=95)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        coco = {"images": images, "annotations": anns,
                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return root


def _runs(root, command):
    return sorted((root / "runs" / command).iterdir())


def _invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


@pytest.mark.slow
def test_a_coco_run_is_scored_against_its_own_data_everywhere(tmp_path):
    env = tmp_path  # the session's cache: compiled kernels are reused, the datasets live here
    data_dir = make_dataset(env / "mine")
    runs = f"paths.runs_dir={env / 'runs'}"
    r = _invoke("train", "model=iou_net", "data=coco", f"data.root={data_dir}", *TINY, runs)
    assert r.exit_code == 0, r.output
    (t,) = _runs(env, "train")
    final = json.loads((t / "eval_val.json").read_text())
    dets = Detections.load(t / "detections" / "val.npz")
    assert dets.meta["data"]["ann_file"] == str(data_dir / "annotations" / "val.json")
    assert final["num_raw"] > 0

    # nms-ablate run=<the coco run>, no data override: the run's data is restored; its baseline arm (IoU-guided NMS
    # at 0.5, iou_net's own inference, as the train run's evaluation) reproduces the train run's final numbers exactly
    assert final["nms"] == "iou-guided@0.5"
    r = _invoke("nms-ablate", f"run={t}", "nms=iou_guided", "methods=[iou-guided]", "iou_thresholds=[0.5]",
                "eval_backend=pycocotools", runs)
    assert r.exit_code == 0, r.output
    (a,) = _runs(env, "nms-ablate")
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    base = next(x for x in rows if any(k.endswith("AP50") for k in x))
    ap50 = next(v for k, v in base.items() if k.endswith("AP50"))
    assert ap50 == pytest.approx(final["metrics"]["AP50"], abs=1e-12), (base, final["metrics"])

    # the same detections scored against another dataset (explicit data=shapes): one line, no table of zeros
    r = _invoke("nms-ablate", f"run={t}", "data=shapes", "data.num_train=4", "data.num_val=3", runs)
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "holds detections of" in line and str(data_dir) in r.stderr

    # eval: run= with the data overrides given again, and checkpoint= with them (both lost data.root before)
    r = _invoke("eval", f"run={t}", "data=coco", f"data.root={data_dir}", runs)
    assert r.exit_code == 0, r.output
    ckpt = t / "checkpoints" / "last.pt"
    r = _invoke("eval", f"checkpoint={ckpt}", "model=iou_net", "data=coco", f"data.root={data_dir}",
                "model.min_size=64", "model.max_size=64", "eval_backend=pycocotools", runs)
    assert r.exit_code == 0, r.output
    for e in _runs(env, "eval"):
        again = json.loads((e / "eval_val.json").read_text())
        # same weights, data and NMS; the backends agree to float rounding
        assert {k: again["metrics"][k] for k in AP_KEYS} == pytest.approx({k: final["metrics"][k] for k in AP_KEYS},
                                                                           abs=1e-9)

    # refine run=<the coco run> restores model and data the same way
    r = _invoke("refine", f"run={t}", "refiner.iterations=1", "eval_backend=pycocotools", runs)
    assert r.exit_code == 0, r.output
    (f,) = _runs(env, "refine")
    assert str(data_dir) in (f / "config.yaml").read_text()

    # the dataset moved: eval run=<t> data.root=<new place>, then refine run=<that eval> takes the eval's data
    moved = env / "moved"
    data_dir.rename(moved)
    r = _invoke("eval", f"run={t}", f"data.root={moved}", runs)
    assert r.exit_code == 0, r.output
    e = max(_runs(env, "eval"))
    r = _invoke("refine", f"run={e}", "refiner.iterations=1", runs)
    assert r.exit_code == 0, r.output
    assert str(moved) in (max(_runs(env, "refine")) / "config.yaml").read_text()


def test_skip_bad_cleans_what_is_trained_and_what_is_scored(tmp_path):
    """A val split with a NaN box, a box on an image whose file is gone and an annotation of an unknown image:
    with skip_bad the evaluation ground truth is the cleaned split, so the kept boxes detected perfectly score 100."""
    root = make_dataset(tmp_path / "ds")
    val = json.loads((root / "annotations" / "val.json").read_text())
    val["annotations"][0]["bbox"] = [1, 1, float("nan"), 3]
    (root / "images" / val["images"][-1]["file_name"]).unlink()
    val["annotations"].append({"id": 999, "image_id": 77, "category_id": 1, "bbox": [0, 0, 5, 5]})
    (root / "annotations" / "val.json").write_text(json.dumps(val))

    strict = CocoData(str(root))
    with pytest.raises(Exception, match="pass data.skip_bad=true"):
        strict.prepare()
    data = CocoData(str(root), skip_bad=True)
    data.prepare()
    rep = data.report("val")
    assert rep.counts == {"missing_file": 1, "nonfinite_box": 1, "unknown_image": 1} and rep.on_skipped_image > 0
    gt = ground_truth(data, "val")
    ds = data.dataset("val")
    assert sorted(gt.image_ids.tolist()) == sorted(ds.image_ids)  # scored on exactly the images predicted on
    kept = [a for a in rep.annotations if not a["iscrowd"]]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in kept]
    for backend in ("pycocotools", "faster-coco-eval"):
        assert evaluate(gt, perfect, backend=backend)["AP"] == pytest.approx(1.0)
    boxes = torch.cat([ds[i][1]["boxes"] for i in range(len(ds))])
    assert len(boxes) == len(kept) and torch.isfinite(boxes).all()


def _check(root, *extra):
    return _invoke("data", "check", "data=coco", f"data.root={root}", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("breakage, needle", [
    ("corrupt", "1 images that cannot be decoded"),
    ("truncated", "1 images that cannot be decoded"),
    ("wrong_size", "1 images whose size differs from their width/height"),
    ("categories", "have different categories"),
])
def test_data_check_opens_every_image_and_compares_splits(tmp_path, breakage, needle):
    root = make_dataset(tmp_path / "ds")
    val = json.loads((root / "annotations" / "val.json").read_text())
    target = root / "images" / val["images"][0]["file_name"]
    if breakage == "corrupt":
        target.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    elif breakage == "truncated":
        target.write_bytes(target.read_bytes()[:400])
    elif breakage == "wrong_size":
        Image.new("RGB", (40, 30)).save(target)
    else:
        val["categories"][1]["name"] = "Truck"
        (root / "annotations" / "val.json").write_text(json.dumps(val))
    r = _check(root)
    assert r.exit_code == 1 and needle in r.stderr and "Traceback" not in r.output
    if breakage != "categories":
        assert val["images"][0]["file_name"] in r.stderr  # names the file
        # training refuses it before the first iteration (val images are opened at start by default)
        r = _invoke("train", "model=retina", "data=coco", f"data.root={root}", *TINY,
                    f"paths.runs_dir={tmp_path / 'runs'}")
        assert r.exit_code == 2 and needle in r.stderr
        assert not (tmp_path / "runs" / "train").is_dir() or \
            not any((d / "checkpoints").is_dir() for d in (tmp_path / "runs" / "train").iterdir())


def test_third_party_files_pass_check_and_train(tmp_path):
    """Annotation ids from 0, no area, no iscrowd, images without width/height: accepted everywhere, sizes read
    from the files, areas computed, and said so."""
    root = make_dataset(tmp_path / "ds")
    for split in ("train", "val"):
        p = root / "annotations" / f"{split}.json"
        d = json.loads(p.read_text())
        for im in d["images"]:
            im.pop("width"), im.pop("height")
        p.write_text(json.dumps(d))
    r = _check(root)
    assert r.exit_code == 0, r.output
    assert "no problems" in r.stderr and "area computed as w*h" in r.stderr
    data = CocoData(str(root))
    data.prepare()
    assert all(im["width"] == 64 for im in data.report("train").images)
    assert min(a["id"] for a in data.report("train").annotations) == 0
