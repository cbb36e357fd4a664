"""`iouctl nms-ablate` end to end on a tiny built-in dataset, cross-checked against independent references."""
import json

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from iouctl.analysis import evaluate, synthesize_detections
from iouctl.cli import app
from iouctl.data import ShapesData
from iouctl.postprocess.suppression import GreedyNMS, IoUGuidedNMS
from tests.lanes import sample

runner = CliRunner()
TINY = ["data.num_train=4", "data.num_val=12", "data.image_size=96", "data.max_size=32"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _tiny_gt(tmp_path):
    data = ShapesData(str(tmp_path / "cache" / "datasets"), num_train=4, num_val=12, image_size=96, max_size=32)
    data.prepare()
    return data.ann_file("val")


def _only_run(root):
    runs = list((root / "nms-ablate").iterdir())
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_a_large_split_names_the_cost_of_the_analyses(cache, monkeypatch):
    from iouctl.engine import nms_ablate

    monkeypatch.setattr(nms_ablate, "LARGE_SPLIT", 10)  # the tiny split's few hundred raw boxes count as large
    base = ["nms-ablate", "--synthetic", "methods=[greedy]", "iou_thresholds=[0.5]", "scores=[cls]", *TINY]
    hint = "cost about twice the grid itself at this size; analyses=[] runs the grid alone"
    r = runner.invoke(app, [*base, "analyses=[errors]", f"paths.runs_dir={cache / 'a'}"])
    assert r.exit_code == 0, r.output
    assert f"analyses=['errors'] {hint}" in " ".join(r.stderr.split())
    r = runner.invoke(app, [*base, "analyses=[]", f"paths.runs_dir={cache / 'b'}"])
    assert r.exit_code == 0 and hint not in " ".join(r.stderr.split()), r.output


@pytest.mark.slow
def test_default_grid_synthetic(cache):
    r = runner.invoke(app, ["nms-ablate", "--synthetic", *TINY, f"paths.runs_dir={cache / 'runs'}",
                            "eval_backend=pycocotools"])
    assert r.exit_code == 0, r.output
    d = _only_run(cache / "runs")
    res = json.loads((d / "results.json").read_text())
    names = [a["arm"] for a in res["arms"]]
    # baseline first; greedy 3x3, iou-guided 3, soft-linear 3x3, soft-gaussian 3 minus the baseline's duplicate (24),
    # diou 2x2, matrix 2x2, cluster 3 variants, box voting 2, wbf 2x2 (17)
    assert names[0] == "greedy[cls]@0.5" and len(names) == 41 and len(set(names)) == 41
    assert res["arms"][0]["dAP"] == 0 and all(a["AP"] >= 0 for a in res["arms"])
    for f in ("results.csv", "results.md", "plots/ap_vs_iou_threshold.png", "plots/score_vs_true_iou.png",
              "detections/val.npz"):
        assert (d / f).is_file(), f
    assert set(res["correlation_before_nms"]) == {"cls", "iou", "fused"}

    # Independent check of two arms: greedy NMS per image and class with torchvision, IoU-guided by a plain loop.
    gt = _tiny_gt(cache)
    dets = synthesize_detections(gt, seed=0)
    tv = _torchvision_greedy(dets, 0.5)
    ref = evaluate(gt, dets.select(tv), backend="pycocotools")
    assert res["arms"][0]["AP"] == pytest.approx(ref["AP"], abs=1e-12)
    loop_idx, loop_scores = _loop_iou_guided(dets, 0.6)
    got = next(a for a in res["arms"] if a["arm"] == "iou-guided@0.6")
    sel = dets.select(loop_idx)
    sel.scores = loop_scores
    assert got["AP90"] == pytest.approx(evaluate(gt, sel, backend="pycocotools")["AP90"], abs=1e-12)


def _torchvision_greedy(dets, thr, k=100):
    keep = []
    for rows in dets.image_index().values():
        kk = torchvision.ops.batched_nms(dets.boxes[rows].double(), dets.scores[rows].double(), dets.labels[rows], thr)
        keep.append(rows[kk[:k]])
    return torch.cat(keep)


def _loop_iou_guided(dets, thr, k=100):
    """IoU-Net Alg. 1 as written, per image and class, in plain Python."""
    idx, out_scores = [], []
    for rows in dets.image_index().values():
        kept = []
        for c in dets.labels[rows].unique().tolist():
            cand = [int(i) for i in rows[dets.labels[rows] == c]]
            while cand:
                m = max(cand, key=lambda i: (float(dets.ious[i]), -i))
                s = float(dets.scores[m])
                rest = []
                for j in cand:
                    if j == m:
                        continue
                    iou = torchvision.ops.box_iou(dets.boxes[m:m + 1].double(), dets.boxes[j:j + 1].double()).item()
                    if iou > thr:
                        s = max(s, float(dets.scores[j]))
                    else:
                        rest.append(j)
                kept.append((s, m))
                cand = rest
        kept.sort(key=lambda t: -t[0])
        idx += [m for _, m in kept[:k]]
        out_scores += [s for s, _ in kept[:k]]
    return torch.tensor(idx), torch.tensor(out_scores)


@pytest.mark.slow
def test_score_iou_runs_iou_guided_against_the_baseline(cache):
    r = runner.invoke(app, ["nms-ablate", "--synthetic", "--score", "iou", *TINY, f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 0, r.output
    res = json.loads((_only_run(cache / "runs") / "results.json").read_text())
    assert [a["arm"] for a in res["arms"]] == ["greedy[cls]@0.5", "iou-guided@0.5", "iou-guided@0.6", "iou-guided@0.7"]


@pytest.mark.slow
def test_detections_without_iou_head(cache):
    gt = _tiny_gt(cache)
    dets = synthesize_detections(gt, seed=1)
    dets.ious = None
    dets.meta["model"] = "retina"
    path = dets.save(cache / "retina_val.npz")
    base = [*TINY, f"paths.runs_dir={cache / 'runs'}", f"run={path}"]
    r = runner.invoke(app, ["nms-ablate", "--score", "iou", *base])
    assert r.exit_code == 2 and "without an IoU head" in r.stderr and "Traceback" not in r.output
    # only the baseline's own twin is a cls arm: nothing to compare, said as such
    r = runner.invoke(app, ["nms-ablate", "methods=[greedy]", "iou_thresholds=[0.5]", *base])
    assert r.exit_code == 2 and "no arm left to compare with the baseline greedy[cls]@0.5" in r.stderr
    r = runner.invoke(app, ["nms-ablate", *base])
    assert r.exit_code == 0, r.output
    assert "need predicted IoUs" in r.stderr
    d = sorted((cache / "runs" / "nms-ablate").iterdir())[-1]
    arms = [a["arm"] for a in json.loads((d / "results.json").read_text())["arms"]]
    assert arms and all("[cls]" in a for a in arms)


@pytest.mark.slow
def test_no_detections_anywhere_is_one_line(cache):
    r = runner.invoke(app, ["nms-ablate", *TINY, f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 2 and "--synthetic" in r.stderr


def test_greedy_arm_equals_torchvision(cache):
    gt = _tiny_gt(cache)
    dets = synthesize_detections(gt, seed=3)
    for thr in (0.3, 0.5, 0.7):
        kept = GreedyNMS(thr).keep(dets)
        assert torch.equal(kept.index, _torchvision_greedy(dets, thr))
        assert torch.equal(kept.scores, dets.scores[kept.index])


@pytest.mark.slow
def test_iou_guided_arm_equals_the_algorithm(cache):
    gt = _tiny_gt(cache)
    dets = synthesize_detections(gt, seed=4)
    kept = IoUGuidedNMS(0.5).keep(dets)
    idx, scores = _loop_iou_guided(dets, 0.5)
    assert torch.equal(kept.index, idx) and torch.equal(kept.scores, scores.to(kept.scores.dtype))


@pytest.mark.slow
def test_wandb_gets_table_plots_and_correlations(cache):
    from tests.wandb_records import history

    r = runner.invoke(app, ["nms-ablate", "--synthetic", "--score", "fused", *TINY, "logger=wandb",
                            f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 0, r.output
    d = _only_run(cache / "runs")
    (wb,) = list((d / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = history(wb)
    keys = {k for r in rows for k in r}  # media are logged as nested keys (name/_type, name/path, ...)
    for media in ("nms_ablation/", "plots/ap_vs_iou_threshold/", "plots/score_vs_true_iou/"):
        assert any(k.startswith(media) for k in keys), media
    res = json.loads((d / "results.json").read_text())
    logged = {k: v for r in rows for k, v in r.items()}
    assert logged["corr_before/iou/pearson"] == pytest.approx(res["correlation_before_nms"]["iou"]["pearson"])
    fused = res["arms"][1]
    assert fused["arm"] == "greedy[fused]@0.5" and logged["greedy[fused]@0.5/AP90"] == pytest.approx(fused["AP90"])


@pytest.mark.slow
def test_soft_nms_baseline_on_detections_without_iou(cache):
    gt = _tiny_gt(cache)
    dets = synthesize_detections(gt, seed=2)
    dets.ious = None
    path = dets.save(cache / "noiou.npz")
    r = runner.invoke(app, ["nms-ablate", "nms=soft_linear", "--nms", "greedy", *TINY, f"run={path}",
                            f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 0, r.output
    arms = [a["arm"] for a in json.loads((_only_run(cache / "runs") / "results.json").read_text())["arms"]]
    assert arms == ["soft-linear[cls]@0.3", "greedy[cls]@0.5", "greedy[cls]@0.6", "greedy[cls]@0.7"]


@pytest.mark.slow
def test_baseline_with_other_settings_runs_beside_its_twin(cache):
    r = runner.invoke(app, ["nms-ablate", "--synthetic", "--nms", "greedy", "--score", "cls", "nms.max_per_image=5",
                            *TINY, f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 0, r.output
    arms = json.loads((_only_run(cache / "runs") / "results.json").read_text())["arms"]
    assert [a["arm"] for a in arms][:2] == ["greedy[cls]@0.5", "greedy[cls]@0.5 (max_per_image=100)"]
    assert arms[0]["kept"] < arms[1]["kept"]  # 5 per image against the grid's 100


@pytest.mark.slow
def test_the_grid_is_options_times_sweeps(cache):
    grid = ["grid.greedy.iou_threshold=[0.55]", "+grid.soft_gaussian.sigma=[0.3,0.7]", "methods=[greedy,soft-gaussian]",
            "scores=[cls]"]
    r = runner.invoke(app, ["nms-ablate", "--synthetic", *grid, *TINY, f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 0, r.output
    arms = [a["arm"] for a in json.loads((_only_run(cache / "runs") / "results.json").read_text())["arms"]]
    assert arms == ["greedy[cls]@0.5", "greedy[cls]@0.55", "soft-gaussian[cls]", "soft-gaussian[cls] (sigma=0.7)"]


@pytest.mark.parametrize("override,message", sample([
    ("+grid.greedy.sigma=[0.1]", "grid.greedy.sigma: nms option greedy has no key sigma"),
    ("grid.greedy.iou_threshold=[1.5]", "grid.greedy.iou_threshold=1.5 is not valid; valid: a finite number in [0, 1]"),
    ("+grid.nope={}", "nms option 'nope' is not in conf/nms/"),
], 2))
def test_a_bad_grid_is_one_line_before_a_run_folder(cache, override, message):
    r = runner.invoke(app, ["nms-ablate", "--synthetic", override, *TINY, f"paths.runs_dir={cache / 'runs'}"])
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output, r.output
    assert not (cache / "runs" / "nms-ablate").exists()


@pytest.mark.slow
def test_fused_weight_is_the_models_unless_overridden(cache):
    gt = _tiny_gt(cache)
    dets = synthesize_detections(gt, seed=1)
    dets.meta["cls_weight"] = 0.2
    path = dets.save(cache / "val.npz")
    base = ["--score", "fused", "--nms", "greedy", *TINY, f"paths.runs_dir={cache / 'runs'}", f"run={path}"]
    got = {}
    for extra in ([], ["cls_weight=0.2"], ["cls_weight=0.9"]):
        r = runner.invoke(app, ["nms-ablate", *base, *extra])
        assert r.exit_code == 0, r.output
        d = sorted((cache / "runs" / "nms-ablate").iterdir())[-1]
        got[tuple(extra)] = json.loads((d / "results.json").read_text())["arms"][1]["AP"]
    assert got[()] == got[("cls_weight=0.2",)] != got[("cls_weight=0.9",)]


@pytest.mark.slow
def test_arms_in_worker_processes_equal_the_serial_run(tmp_path):
    """workers=2 forks the arms out; every result (APs, errors, calibration, oracle rows, files) must be the serial
    run's, bit for bit. Uses the session's kernel cache (no `cache` fixture: a fresh one recompiles)."""
    base = ["nms-ablate", "--synthetic", *TINY, "methods=[greedy,iou-guided,wbf,cluster,matrix]"]
    got = {}
    for w in (1, 2):
        r = runner.invoke(app, [*base, f"workers={w}", f"paths.runs_dir={tmp_path / str(w)}"])
        assert r.exit_code == 0, r.output
        d = _only_run(tmp_path / str(w))
        got[w] = (json.loads((d / "results.json").read_text()), (d / "analyses.md").read_text())
    (one, md1), (two, md2) = got[1], got[2]
    assert one["workers"] == 1 and two["workers"] == 2
    assert len(one["arms"]) == 23 and one["oracle"] is not None and one["errors"] is not None
    for res in (one, two):
        for arm in res["arms"]:
            del arm["seconds"]
    for key in ("arms", "errors", "calibration", "oracle", "ap_per_threshold", "correlation_before_nms"):
        assert one[key] == two[key], key
    assert md1 == md2
    phases = two["phases"]
    assert list(phases) == ["load", "true_iou", "shared", "arms", "outputs"]
    assert set(phases["arms"]["per_arm_phase"]) == {"nms", "evaluate", "analyses", "oracle"}



def test_worker_count_follows_cores_arms_and_free_memory(monkeypatch):
    """workers=0: one per core, no more than the arms, and no more than half the free memory holds."""
    from types import SimpleNamespace

    from iouctl.engine import nms_ablate as engine

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    per_worker = engine.WORKER_BYTES_FIXED + engine.WORKER_BYTES_PER_DET * 5_000_000  # COCO: 5000 images x 1000
    monkeypatch.setattr(engine, "_available_memory", lambda: 8 * per_worker)
    auto = SimpleNamespace(workers=0)
    assert engine._workers(auto, 41, 5_000_000) == 4
    assert engine._workers(auto, 41, 1_000) == 16 and engine._workers(auto, 3, 1_000) == 3
    monkeypatch.setattr(engine, "_available_memory", lambda: 0)
    assert engine._workers(auto, 41, 5_000_000) == 1
    assert engine._workers(SimpleNamespace(workers=6), 41, 5_000_000) == 6  # an explicit count is the user's
    monkeypatch.setattr(engine, "_available_memory", lambda: None)
    assert engine._workers(auto, 41, 5_000_000) == 16
