"""`iouctl demo` end to end on a tiny dataset: every step's files, a report built from the runs it made."""
import json

from typer.testing import CliRunner

from iouctl.cli import app

runner = CliRunner()


def test_demo_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(app, ["demo", "data.num_train=4", "data.num_val=6", "data.image_size=64", "data.max_size=24",
                            f"paths.runs_dir={tmp_path / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = list((tmp_path / "runs" / "demo").iterdir())
    assert (d / "status").read_text().strip() == "COMPLETED"
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary["steps"]) == {"data", "nms-ablate", "bench-pool"}
    ablation = json.loads((d / "nms_ablate" / "results.json").read_text())
    assert ablation["arms"] == summary["steps"]["nms-ablate"]["arms"]
    report = (d / "report.md").read_text()
    baseline = ablation["arms"][0]
    assert f"| {baseline['arm']} | {100 * baseline['AP']:.1f} |" in report  # the report shows this run's numbers
    for link in ("nms_ablate/plots/ap_vs_iou_threshold.png", "bench_pool/plots/bench_pool.png"):
        assert link in report and (d / link).is_file()
    bench = json.loads((d / "bench_pool" / "bench_pool.json").read_text())
    assert bench and (d / "bench_pool" / "metrics.jsonl").is_file()


def test_demo_bad_step_override_fails_before_running(tmp_path):
    r = runner.invoke(app, ["demo", "data.seed=abc", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "'data.seed'" in r.stderr
    assert not any(tmp_path.iterdir())
