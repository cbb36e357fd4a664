"""A run's real state (a killed process is KILLED, not RUNNING forever), `iouctl runs`, and which run resume=true
picks."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from iouctl.cli import app
from iouctl.errors import IouctlError
from iouctl.runs import (
    config_differences, find_resume_run, list_runs, open_run, process_start, read_status, run_state,
)

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _fake_run(runs, command, stamp, name="x", status="COMPLETED", meta=None, config=None, files=()):
    """A run folder as open_run leaves it, written by hand: `stamp` orders it."""
    d = runs / command / f"{stamp}_{name}"
    d.mkdir(parents=True)
    (d / "status").write_text(status + "\n")
    (d / "meta.json").write_text(json.dumps({"command": command, "name": name, "host": socket.gethostname(),
                                             "started": f"{stamp[:10]}T{stamp[11:].replace('-', ':')}", **(meta or {})}))
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_bytes(b"x")
    return d


def _sleeper(runs_dir):
    """A process that opens a run and waits; returns (process, run dir)."""
    script = textwrap.dedent(f"""
        import time
        from iouctl.runs import open_run
        with open_run("train", "sleeper", {str(runs_dir)!r}, "x: 1\\n", []) as run:
            print(run.dir, flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO)
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.slow
def test_a_sigkilled_run_reads_killed(tmp_path):
    proc, d = _sleeper(tmp_path / "runs")
    try:
        meta = json.loads((d / "meta.json").read_text())
        assert meta["pid"] == proc.pid and meta["host"] == socket.gethostname()
        assert meta["pid_started"] == process_start(proc.pid) is not None
        assert run_state(d) == "RUNNING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_status(d) == "RUNNING"  # the file a killed process could not update
    assert run_state(d) == "KILLED"
    r = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert str(d) in r.stdout and "KILLED" in r.stdout and "RUNNING" not in r.stdout


def test_pid_reused_or_another_host(tmp_path):
    runs = tmp_path / "runs"
    me = {"pid": os.getpid(), "pid_started": process_start(os.getpid())}
    alive = _fake_run(runs, "train", "2024-01-01_00-00-01", status="RUNNING", meta=me)
    assert run_state(alive) == "RUNNING"
    reused = _fake_run(runs, "train", "2024-01-01_00-00-02", status="RUNNING",
                       meta={**me, "pid_started": me["pid_started"] + "0"})  # same pid, another process
    assert run_state(reused) == "KILLED"
    elsewhere = _fake_run(runs, "train", "2024-01-01_00-00-03", status="RUNNING", meta={**me, "host": "gpu-node-7"})
    assert run_state(elsewhere) == "RUNNING?"
    for status in ("COMPLETED", "FAILED", "INTERRUPTED"):  # an ended run says how it ended, whatever its pid
        assert run_state(_fake_run(runs, "eval", f"2024-01-02_00-00-0{len(status)}", status=status)) == status


def test_runs_lists_newest_first_with_state_duration_and_ap(tmp_path):
    runs = tmp_path / "runs"
    with open_run("eval", "[red]e", runs, "a: 1\n", []) as run:
        run.write_json("eval_val.json", {"metrics": {"AP": 0.4321}})
        newest = run.dir
    killed = _fake_run(runs, "train", "2024-01-01_00-00-00", "retina", status="RUNNING",
                       meta={"pid": 2 ** 22 + 17})  # above any pid_max: no such process
    (killed / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0}\n{"step": 2, "val/AP": 0.125}\n{"step": 3, "loss": 0.5}\n')
    for f, seconds in (("status", 0), ("metrics.jsonl", 90)):  # RUNNING written at the start, rows until killed
        t = time.mktime((2024, 1, 1, 0, 0, seconds, 0, 0, -1))
        os.utime(killed / f, (t, t))
    old = _fake_run(runs, "nms-ablate", "2023-12-31_00-00-00", "grid",
                    meta={"duration_s": 3725.0})

    found = list_runs(runs)
    assert [r["dir"] for r in found] == [newest, killed, old]
    assert [r["state"] for r in found] == ["COMPLETED", "KILLED", "COMPLETED"]
    assert found[0]["metric"] == ("val/AP", 0.4321) and found[1]["metric"] == ("val/AP", 0.125)
    assert found[2]["metric"] is None
    assert found[1]["duration_s"] == pytest.approx(90, abs=1)  # to its last write: when it was killed
    assert [r["dir"] for r in list_runs(runs, ["train"])] == [killed]
    assert [r["dir"] for r in list_runs(runs, limit=1)] == [newest]

    r = runner.invoke(app, ["runs", "--runs-dir", str(runs)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    rows = [next(i for i, line in enumerate(lines) if str(d) in line) for d in (newest, killed, old)]
    assert rows == sorted(rows)
    assert "[red]e" in lines[rows[0]] and "43.2" in lines[rows[0]]  # the name literally; AP in percent
    assert "KILLED" in lines[rows[1]] and "12.5" in lines[rows[1]] and "1m30s" in lines[rows[1]]
    assert "1h02m" in lines[rows[2]]
    r = runner.invoke(app, ["runs", "train", "--limit", "5", "--runs-dir", str(runs)])
    assert r.exit_code == 0 and str(killed) in r.stdout and str(newest) not in r.stdout
    r = runner.invoke(app, ["runs", "--runs-dir", str(runs), "-n", "1"])
    assert str(newest) in r.stdout and str(killed) not in r.stdout


def test_runs_bad_input_is_one_line(tmp_path):
    r = runner.invoke(app, ["runs", "trian", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: unknown command 'trian'; valid: train, eval, nms-ablate, refine, bench-pool, data, demo"]
    r = runner.invoke(app, ["runs", "--limit", "0", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--limit 0" in r.stderr
    r = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "none")])
    assert r.exit_code == 0 and r.stdout == "" and "no runs under" in r.stderr


def test_runs_default_folder_is_paths_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IOUCTL_RUNS_DIR", str(tmp_path / "elsewhere"))
    d = _fake_run(tmp_path / "elsewhere", "eval", "2024-01-01_00-00-00")
    r = runner.invoke(app, ["runs"])
    assert r.exit_code == 0 and str(d) in r.stdout


# resume ------------------------------------------------------------------------------------------------------------

KEYS = ("model", "data", "schedule", "seed")
CONF = {"model": {"_target_": "R", "min_size": 64, "anchor_sizes": [[8], [16]]}, "data": {"root": "/d", "workers": 2},
        "schedule": {"max_iters": 6, "lr_steps": [4]}, "seed": 0, "device": "cpu", "name": "retina"}


def _with(conf, **dotted):
    conf = json.loads(json.dumps(conf))
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = conf
        for p in parents:
            node = node[p]
        node[leaf] = value
    return conf


def test_config_differences():
    assert config_differences(CONF, CONF, KEYS) == []
    assert config_differences(CONF, _with(CONF, device="cuda", name="other"), KEYS) == []  # not compared
    assert config_differences(CONF, _with(CONF, schedule__max_iters=7, seed=1), KEYS) == ["schedule.max_iters", "seed"]
    assert config_differences(CONF, _with(CONF, data__workers=8), KEYS, ignore=["data.workers"]) == []
    assert config_differences(CONF, _with(CONF, data__workers=8), KEYS) == ["data.workers"]
    auto = _with(CONF, model__min_size="auto", model__anchor_sizes="auto")
    assert config_differences(auto, CONF, KEYS) == []  # `auto` matches what the run derived
    assert config_differences(CONF, auto, KEYS) == ["model.anchor_sizes", "model.min_size"]
    extra = _with(CONF, model__iou_head=True)
    assert config_differences(CONF, extra, KEYS) == ["model.iou_head"]  # a key only one side has differs


def test_resume_picks_the_newest_matching_run(tmp_path):
    runs = tmp_path / "runs"
    ckpt = "checkpoints/last.pt"
    match_old = _fake_run(runs, "train", "2024-01-01_00-00-00", status="RUNNING", config=CONF, files=[ckpt],
                          meta={"pid": 2 ** 22 + 17})
    match = _fake_run(runs, "train", "2024-01-02_00-00-00", status="FAILED", config=_with(CONF, device="cuda"),
                      files=[ckpt])
    _fake_run(runs, "train", "2024-01-03_00-00-00", config=CONF)  # no checkpoint
    other = _fake_run(runs, "train", "2024-01-04_00-00-00", config=_with(CONF, schedule__max_iters=9), files=[ckpt])
    assert find_resume_run(runs, "train", ckpt, CONF, KEYS) == match
    assert find_resume_run(runs, "train", ckpt, _with(CONF, schedule__max_iters=9), KEYS) == other
    with pytest.raises(IouctlError) as e:
        find_resume_run(runs, "train", ckpt, _with(CONF, seed=3), KEYS)
    msg = str(e.value)
    assert "\n" not in msg and "pass run=<dir>" in msg
    assert f"{other} (differs in schedule.max_iters, seed)" in msg and str(match_old) in msg
    assert msg.index(str(other)) < msg.index(str(match)) < msg.index(str(match_old))  # newest first
    with pytest.raises(IouctlError, match="no train run under .* has checkpoints/last.pt"):
        find_resume_run(tmp_path / "empty", "train", ckpt, CONF, KEYS)


@pytest.mark.slow
def test_resume_refuses_a_run_still_running(tmp_path):
    runs = tmp_path / "runs"
    me = {"pid": os.getpid(), "pid_started": process_start(os.getpid())}
    d = _fake_run(runs, "train", "2024-01-01_00-00-00", status="RUNNING", config=CONF, files=["checkpoints/last.pt"],
                  meta=me)
    with pytest.raises(IouctlError, match=f"run {d} is still running \\(pid {os.getpid()}\\)"):
        find_resume_run(runs, "train", "checkpoints/last.pt", CONF, KEYS)
    r = runner.invoke(app, ["train", "resume=true", f"run={d}", f"paths.runs_dir={runs}"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: run {d} is still running (pid {os.getpid()}); stop it before resuming it"]
    assert sorted(p.name for p in (runs / "train").iterdir()) == [d.name]  # no run folder for the refusal


TINY = ["model=retina", "experiment=tiny", "data.num_train=8", "data.num_val=4", "data.image_size=64",
        "data.max_size=24", "model.min_size=64", "model.max_size=64", "optim.lr=0.005", "schedule.max_iters=6",
        "checkpoint_every=1", "eval_every=100"]


@pytest.mark.slow
def test_cli_resume_without_run_matches_the_config(tmp_path):
    """A newer run of another schedule is passed over for the killed run of this one; no match is one line and no
    run folder; the resumed run ends COMPLETED and the killed one is listed as resumed by it."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "iouctl", "train", *TINY, f"paths.runs_dir={runs}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline, found = time.time() + 300, []
    while time.time() < deadline and not found and proc.poll() is None:
        found = list(runs.glob("train/*/checkpoints/last.pt"))
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed_ckpt,) = found
    killed = killed_ckpt.parent.parent
    assert run_state(killed) == "KILLED"
    # a newer run with another schedule, as a finished run of it would leave its folder
    recorded = yaml.safe_load((killed / "config.yaml").read_text())
    recorded["schedule"]["max_iters"] = 8
    newer = _fake_run(runs, "train", "2999-01-01_00-00-00", "retina", config=recorded,
                      files=["checkpoints/last.pt"])

    r = runner.invoke(app, ["train", *TINY, "seed=5", "resume=true", f"paths.runs_dir={runs}"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "differs in schedule.max_iters" in r.stderr and "differs in seed" in r.stderr and "run=<dir>" in r.stderr
    assert len(list((runs / "train").iterdir())) == 2  # nothing made

    r = runner.invoke(app, ["train", *TINY, "resume=true", "num_workers=0", f"paths.runs_dir={runs}"])
    assert r.exit_code == 0, r.output
    (resumed,) = set((runs / "train").iterdir()) - {killed, newer}
    assert read_status(resumed) == "COMPLETED"
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta["resumed_from"] == str(killed) and meta["resume_checkpoint"] == str(killed_ckpt)
    assert torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 6
    listed = {r["dir"]: r for r in list_runs(runs)}
    assert listed[killed]["state"] == "KILLED" and listed[killed]["resumed_by"] == [str(resumed)]
    r = runner.invoke(app, ["runs", "train", "--runs-dir", str(runs)])
    line = next(x for x in r.stdout.splitlines() if str(killed) in x)
    assert "KILLED, resumed in" in line
