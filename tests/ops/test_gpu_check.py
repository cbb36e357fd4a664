"""benchmarks/gpu_check.py: without a GPU it reports every CUDA section as skipped; its kernel sections run on the
CPU in smoke mode; its worker records a process's peak GPU memory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _check(out: Path, *args: str) -> dict:
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                         "PYTHON": sys.executable})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [p.name for p in out.iterdir()] == ["gpu_check.json"]  # one report, nothing else
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs for real (minutes): run it by hand")
@pytest.mark.slow
def test_dry_run_without_gpu_skips_every_cuda_section(tmp_path):
    report = _check(tmp_path / "out")
    assert report["environment"]["device"] == "cpu" and "gpu" not in report["environment"]
    sections = report["sections"]
    assert list(sections) == ["build", "tests", "pool", "nms", "train", "torchrun", "refine"]
    assert all(v["status"] == "skipped: no GPU" for v in sections.values()), sections


@pytest.mark.slow
def test_smoke_run_on_cpu_exercises_the_kernel_sections(tmp_path):
    report = _check(tmp_path / "out", "--device", "cpu")
    s = report["sections"]
    assert report["smoke_cpu"] and s["build"]["status"] == "ok" and s["tests"]["status"].startswith("skipped")
    pool = s["pool"]
    assert pool["status"] == "ok" and pool["median_ms"]["prroi_forward_backward"] > 0
    agree = pool["agreement"]
    assert agree["float32"]["forward"] <= 1e-5 and agree["float64"]["forward"] <= 1e-10
    assert agree["float32"]["input_grad"] > 0  # direct vs cpp: two summations, not one tensor compared to itself
    assert all(agree[d]["box_grad_per_roi_max"] <= 1e-2 for d in ("float16", "bfloat16"))
    nms = s["nms"]
    assert nms["status"] == "ok" and all(v["equal_to_cpu_kernel"] for k, v in nms.items() if k.startswith("N="))


@pytest.mark.slow
def test_worker_records_the_peak_and_passes_the_exit_status(tmp_path):
    peak = tmp_path / "peak.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--worker", str(peak), "--", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout  # iouctl's own help
    facts = json.loads(peak.read_text())
    assert "peak_gpu_mib" in facts and (facts["peak_gpu_mib"] is None) == (not torch.cuda.is_available())
    r = subprocess.run([sys.executable, str(SCRIPT), "--worker", str(peak), "--", "train", "model=yolo"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown option 'yolo'" in r.stderr  # a failing command fails the section
