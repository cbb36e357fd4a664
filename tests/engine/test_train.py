"""`iouctl train` / `iouctl eval` at tiny scale: run contents, exact resume after SIGKILL, NaN stop, eval of a run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from iouctl.cli import app
from iouctl.engine.train import IterationSampler, lr_factor

runner = CliRunner()
TINY = ["experiment=tiny", "data.num_train=8", "data.num_val=4", "data.image_size=64", "data.max_size=24",
        "model.min_size=64", "model.max_size=64", "optim.lr=0.005"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _runs(root, command):
    return sorted((root / "runs" / command).iterdir())


@pytest.mark.slow
def test_train_iou_retina_then_eval_the_run(env):
    r = runner.invoke(app, ["train", "model=iou_retina", *TINY, f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (d,) = _runs(env, "train")
    assert (d / "status").read_text().strip() == "COMPLETED"
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in rows if "loss" in x]
    assert steps == [1, 2, 3, 4] and all({"loss_cls", "loss_box", "loss_iou", "lr"} <= set(x) for x in rows if "loss" in x)
    state = torch.load(d / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 4
    final = json.loads((d / "eval_val.json").read_text())
    assert set(final["correlations"]) == {"cls", "iou", "fused"} and (d / "detections" / "val.npz").is_file()
    assert set(final["correlations_iou>0.5"]) == {"cls", "iou", "fused"}

    r = runner.invoke(app, ["eval", f"run={d}", f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 0, r.output
    (e,) = _runs(env, "eval")
    again = json.loads((e / "eval_val.json").read_text())
    assert again["metrics"] == final["metrics"] and again["num_raw"] == final["num_raw"]  # same weights, same numbers
    assert json.loads((e / "source.json").read_text())["checkpoint"] == str(d / "checkpoints" / "last.pt")

    r = runner.invoke(app, ["eval", f"run={d}", "model=faster_rcnn", f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 2 and "does not fit" in r.stderr and "Traceback" not in r.output


def _train_cmd(runs, *extra):
    return [sys.executable, "-m", "iouctl", "train", "model=retina", *TINY, "schedule.max_iters=6",
            "checkpoint_every=1", "eval_every=100", f"paths.runs_dir={runs}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("augment", [[], ["augment=standard"]], ids=["flip", "standard"])
def test_sigkill_and_resume_reach_the_same_weights(env, augment):
    full = env / "full"
    # standard: the uninterrupted run loads with 2 workers, the killed and resumed one in the main process
    workers = ["num_workers=2"] if augment else []
    subprocess.run(_train_cmd(full, *augment, *workers), check=True, capture_output=True, env=os.environ)
    killed = env / "killed"
    proc = subprocess.Popen(_train_cmd(killed, *augment), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline and ckpt is None:
        found = list(killed.glob("train/*/checkpoints/last.pt"))
        ckpt = found[0] if found else None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt is not None
    at = torch.load(ckpt, weights_only=True)["iteration"]
    subprocess.run(_train_cmd(killed, *augment, "resume=true"), check=True, capture_output=True, env=os.environ)
    a = torch.load(next(full.glob("train/*/checkpoints/last.pt")), weights_only=True)
    resumed = sorted(killed.glob("train/*/checkpoints/last.pt"))[-1]
    b = torch.load(resumed, weights_only=True)
    assert b["iteration"] == 6 and 1 <= at <= 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_nan_loss_stops_with_the_iteration_and_term(env):
    r = runner.invoke(app, ["train", "model=retina", *TINY, "optim.lr=1e30", "clip_grad_norm=null",
                            "checkpoint_every=1", f"paths.runs_dir={env / 'runs'}"])
    assert r.exit_code == 2, r.output
    last = r.stderr.strip().splitlines()[-1]  # after the run's own lines: the error, on one line
    assert last.startswith("error: iteration") and "loss term" in last and "last good checkpoint" in last
    (d,) = _runs(env, "train")
    assert (d / "status").read_text().strip() == "FAILED"
    assert torch.load(d / "checkpoints" / "last.pt", weights_only=True)["iteration"] >= 1  # the last good one


def test_iteration_sampler_is_a_function_of_the_iteration():
    whole = list(IterationSampler(10, 3, 0, 9, seed=1))
    assert list(IterationSampler(10, 3, 4, 9, seed=1)) == whole[4:]  # resuming at 4 replays the same batches
    for e in range(2):  # every epoch is a permutation
        stream = [i for b in whole for i, _ in b][e * 10:(e + 1) * 10]
        assert sorted(stream) == list(range(10))
    seeds = [s for b in whole for _, s in b]
    assert len(set(seeds)) == len(seeds)  # every sample its own augmentation seed, even the same image twice
    assert seeds != [s for b in IterationSampler(10, 3, 0, 9, seed=2) for _, s in b]  # and another run seed, others
    r0, r1 = list(IterationSampler(12, 2, 0, 6, 1, 0, 2)), list(IterationSampler(12, 2, 0, 6, 1, 1, 2))
    assert all(not {i for i, _ in a} & {i for i, _ in b} for a, b in zip(r0, r1))  # ranks share no image per global batch
    assert sorted(i for b in r0[:3] + r1[:3] for i, _ in b) == list(range(12))  # and cover the epoch together
    # the global stream, seeds included, does not depend on how many ranks share it
    assert [p for b in IterationSampler(12, 4, 0, 6, 1) for p in b] == [p for a, b in zip(r0, r1) for p in a + b]


def test_lr_schedule():
    assert lr_factor(0, 10, 0.1, [20, 30], 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 10, 0.1, [20, 30], 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 10, 0.1, [20, 30], 0.1) == 1.0
    assert lr_factor(25, 10, 0.1, [20, 30], 0.1) == pytest.approx(0.1)
    assert lr_factor(30, 10, 0.1, [20, 30], 0.1) == pytest.approx(0.01)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(env):
    """DistributedDataParallel over gloo with 2 processes: one run directory (rank 0), training completes."""
    runs = env / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", "-m", "iouctl",
           "train", "model=retina", *TINY, "schedule.max_iters=2", "device=cpu", f"paths.runs_dir={runs}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (d,) = list((runs / "train").iterdir())
    assert (d / "status").read_text().strip() == "COMPLETED"
    assert torch.load(d / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in rows] == [1, 2]
