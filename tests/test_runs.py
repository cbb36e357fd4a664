"""Run directories: contents, statuses, never overwritten, Ctrl-C leaves INTERRUPTED and a readable log."""
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from iouctl.runs import latest_run, new_run_dir, open_run, read_status

REPO = Path(__file__).resolve().parent.parent


def _open(tmp_path, **kw):
    return open_run("eval", "t", tmp_path / "runs", "a: 1\n", ["a=1"], config={"a": 1}, **kw)


def test_run_directory_contents(tmp_path):
    with _open(tmp_path) as run:
        run.log({"loss": 1.5, "nan": float("nan")}, step=3)
        run.write_json("sub/x.json", {"v": 2})
        run.console.print("hello from the run")
        assert read_status(run.dir) == "RUNNING"
        d = run.dir
    assert d.parent == tmp_path / "runs" / "eval" and d.name.endswith("_t")
    assert (d / "config.yaml").read_text() == "a: 1\n"
    assert "a=1" in (d / "overrides.yaml").read_text()
    meta = json.loads((d / "meta.json").read_text())
    assert meta["argv"] and meta["host"] and meta["torch"] and "available" in meta["cuda"]
    assert set(meta["git"]) == {"sha", "dirty"} and meta["status"] == "COMPLETED"
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[0]["loss"] == 1.5 and rows[0]["nan"] is None  # strict JSON
    assert json.loads((d / "sub" / "x.json").read_text()) == {"v": 2}
    assert "hello from the run" in (d / "log").read_text()
    assert read_status(d) == "COMPLETED"
    assert not list(d.rglob("*.tmp"))  # atomic writes leave no temp files


def test_failure_is_recorded_with_traceback(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with _open(tmp_path) as run:
            d = run.dir
            1 / 0
    assert read_status(d) == "FAILED"
    assert "ZeroDivisionError" in (d / "log").read_text()


def test_keyboard_interrupt_marks_interrupted(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with _open(tmp_path) as run:
            d = run.dir
            raise KeyboardInterrupt
    assert read_status(d) == "INTERRUPTED"


def test_files_get_the_users_umask_like_the_log(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        with _open(tmp_path) as run:
            run.write_json("x.json", {"v": 1})
            run.write_text("kept.md", "a")
            (run.dir / "kept.md").chmod(0o600)
            run.write_text("kept.md", "b")  # a replaced file keeps the mode it has, as editors do
            d = run.dir
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir() if p.is_file()}
    assert mode["log"] == 0o640  # open() under umask 027
    for name in ("config.yaml", "overrides.yaml", "meta.json", "status", "metrics.jsonl", "x.json"):
        assert mode[name] == 0o640, (name, oct(mode[name]))  # atomic writes (mkstemp makes 0600) included
    assert mode["kept.md"] == 0o600 and (d / "kept.md").read_text() == "b"


def test_runs_are_never_overwritten(tmp_path):
    dirs = {new_run_dir(tmp_path, "train", "same") for _ in range(5)}  # same second, same name
    assert len(dirs) == 5 and all(d.is_dir() for d in dirs)


def test_path_cannot_escape_the_run(tmp_path):
    with _open(tmp_path) as run:
        with pytest.raises(ValueError, match="escapes"):
            run.path("..", "elsewhere.txt")


def test_latest_run(tmp_path):
    with _open(tmp_path) as run:
        first = run.dir
    with _open(tmp_path) as run:  # in the same second, it is named <stamp>_t-1: still the newer by its name
        second = run.dir
    assert latest_run(tmp_path / "runs", ["eval"]) == second != first
    assert latest_run(tmp_path / "runs", ["train"]) is None


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_a_real_process(tmp_path, sig):
    # as the CLI runs a command: inside user_errors, which turns the interruption into one line and an exit code
    script = textwrap.dedent(f"""
        import sys, time
        import typer
        from iouctl.cli.common import user_errors
        from iouctl.runs import open_run
        current = {{}}
        try:
            with user_errors(lambda: current.get("dir")):
                with open_run("train", "sig", {str(tmp_path)!r}, "x: 1\\n", []) as run:
                    current["dir"] = run.dir
                    run.console.print("started")
                    print(run.dir, flush=True)
                    for i in range(600):
                        run.log({{"i": i}}, step=i)
                        time.sleep(0.05)
        except typer.Exit as e:
            sys.exit(e.exit_code)
    """)
    # A shell's background job inherits SIGINT ignored (and Python keeps it so): give the child the default, as a
    # terminal's Ctrl-C meets it.
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = Path(proc.stdout.readline().strip())
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143)  # as a shell reports a death by the signal
    stderr = proc.stderr.read()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and lines[0] == "started" and len(lines) == 2, stderr
    assert lines[1] == f"error: {'interrupted' if sig == signal.SIGINT else 'terminated (SIGTERM)'}; run marked " \
                       f"INTERRUPTED: {run_dir}"
    assert read_status(run_dir) == "INTERRUPTED"
    log = (run_dir / "log").read_text()
    assert "started" in log and "interrupted" in log and "status: INTERRUPTED" in log
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert rows and all(json.loads(r)["i"] == k for k, r in enumerate(rows))  # every line whole


def test_child_run_for_composite_commands(tmp_path):
    with _open(tmp_path) as run:
        child = run.child("step")
        child.log({"x": 1.0})
        child.write_text("out.md", "# hi\n")
        child.console.print("from the step")
        child.close()
        run.log({"y": 2.0})
    assert (run.dir / "step" / "out.md").read_text() == "# hi\n"
    assert json.loads((run.dir / "step" / "metrics.jsonl").read_text())["x"] == 1.0
    assert json.loads((run.dir / "metrics.jsonl").read_text())["y"] == 2.0
    assert "from the step" in (run.dir / "log").read_text()


def test_find_run_file(tmp_path):
    from iouctl.errors import IouctlError
    from iouctl.runs import find_run_file

    with _open(tmp_path) as run:
        run.write_text("detections/val.txt", "x")
        with_file = run.dir
    with _open(tmp_path) as run:  # newer, but without the file: not chosen
        pass
    runs = tmp_path / "runs"
    assert find_run_file(None, runs, ["eval", "train"], "detections/val.txt") == with_file / "detections/val.txt"
    assert find_run_file(str(with_file), runs, ["eval"], "detections/val.txt").is_file()
    with pytest.raises(IouctlError, match="has no detections/val.txt"):
        find_run_file(str(run.dir), runs, ["eval"], "detections/val.txt")
    with pytest.raises(IouctlError, match="no such run folder"):
        find_run_file(str(tmp_path / "nope"), runs, ["eval"], "detections/val.txt")
    with pytest.raises(IouctlError, match="no completed train run"):
        find_run_file(None, runs, ["train"], "detections/val.txt")


def test_steps_of_a_composite_run_are_runs_of_their_command(tmp_path):
    """The demo's steps (child runs) have their own meta.json and status and are found like any other run."""
    from iouctl.runs import find_run_file, list_runs, run_state

    with open_run("demo", "d", tmp_path / "runs", "a: 1\n", []) as run:
        train = run.child("train")
        train.write_text("detections/val.npz", "x")
        assert run_state(train.dir) == "RUNNING"
        ablate = run.child("nms_ablate")  # the train step returned: it is COMPLETED
        assert read_status(train.dir) == "COMPLETED" and read_status(ablate.dir) == "RUNNING"
    assert read_status(ablate.dir) == "COMPLETED"
    meta = json.loads((train.dir / "meta.json").read_text())
    assert meta["command"] == "train" and meta["parent"] == str(run.dir) and meta["status"] == "COMPLETED"
    assert json.loads((ablate.dir / "meta.json").read_text())["command"] == "nms-ablate"
    runs = tmp_path / "runs"
    assert latest_run(runs, ["train"]) == train.dir
    assert find_run_file(None, runs, ["eval", "train"], "detections/val.npz") == train.dir / "detections/val.npz"
    listed = list_runs(runs)
    assert [(r["dir"], r["command"], r["state"]) for r in listed] == [
        (ablate.dir, "nms-ablate", "COMPLETED"), (train.dir, "train", "COMPLETED"), (run.dir, "demo", "COMPLETED")]
    with _open(tmp_path) as later:  # a newer run of another command sorts first (<stamp>_t after <stamp>_d)
        pass
    assert list_runs(runs)[0]["dir"] == later.dir and latest_run(runs, ["train"]) == train.dir


def test_a_failed_composite_run_fails_its_open_step(tmp_path):
    from iouctl.runs import find_runs

    with pytest.raises(ZeroDivisionError):
        with open_run("demo", "d", tmp_path / "runs", "a: 1\n", []) as run:
            train = run.child("train")
            train.write_text("detections/val.npz", "x")
            refine = run.child("refine")
            1 / 0
    assert read_status(train.dir) == "COMPLETED" and read_status(refine.dir) == "FAILED"
    assert latest_run(tmp_path / "runs", ["refine"]) is None  # only COMPLETED runs, by default
    assert [r.dir for r in find_runs(tmp_path / "runs", ["refine"], state="FAILED")] == [refine.dir]


def test_a_step_from_before_steps_had_a_status_takes_its_parents(tmp_path):
    from iouctl.runs import find_runs

    with open_run("demo", "d", tmp_path / "runs", "a: 1\n", []) as run:
        run.child("train").write_text("checkpoints/last.pt", "x")
    for name in ("meta.json", "status"):  # as an older demo left its steps: metrics.jsonl and the step's files
        (run.dir / "train" / name).unlink()
    (found,) = find_runs(tmp_path / "runs", ["train"], has="checkpoints/last.pt")
    assert found.dir == run.dir / "train" and found.state == "COMPLETED" and found.parent == run.dir


def test_source_contract(tmp_path):
    from iouctl.errors import IouctlError
    from iouctl.runs import read_source, train_run_of, write_source

    with _open(tmp_path) as train:
        train.write_text("checkpoints/last.pt", "x")
    with _open(tmp_path) as ev:
        write_source(ev, train.dir / "checkpoints/last.pt")
    assert read_source(ev.dir) == train.dir / "checkpoints/last.pt" and read_source(train.dir) is None
    assert train_run_of(ev.dir, "checkpoints/last.pt") == train_run_of(train.dir, "checkpoints/last.pt") == train.dir
    (ev.dir / "source.json").write_text('{"weights": "x"}')
    with pytest.raises(IouctlError, match="source.json: cannot be read as"):
        train_run_of(ev.dir, "checkpoints/last.pt")
    (ev.dir / "source.json").write_text(json.dumps({"checkpoint": str(tmp_path / "elsewhere.pt")}))
    with pytest.raises(IouctlError, match="no longer exists"):
        train_run_of(ev.dir, "checkpoints/last.pt")


def test_meta_records_the_runtime_and_the_ops_implementations(tmp_path, monkeypatch):
    import types

    import torch

    report = {"prroi_pool": {"impl": "cpp"}, "nms": {"impl": "reference"}}
    monkeypatch.setitem(sys.modules, "iouctl.ops._extension",
                        types.SimpleNamespace(implementations=lambda since: report, sequence=lambda: 0))
    with _open(tmp_path) as run:
        run.record_runtime(torch.device("cpu"), "float32")
    meta = json.loads((run.dir / "meta.json").read_text())
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["threads"] == torch.get_num_threads()
    assert meta["ops"] == report
    monkeypatch.delitem(sys.modules, "iouctl.ops._extension")  # no op loaded: nothing said
    with _open(tmp_path) as run:
        pass
    assert "ops" not in json.loads((run.dir / "meta.json").read_text())


def test_a_run_reports_the_ops_it_used_not_the_whole_process(tmp_path):
    """Two runs in one process (the demo's steps, a Python user): each meta.json names only the ops resolved while it
    was open; the parent run, open throughout, names both."""
    from iouctl.ops import _extension

    with _open(tmp_path) as parent:
        first = parent.child("first")
        _extension.record_impl("lib_a", "op_a_for_this_test", "cpu", "reference")
        second = parent.child("second")  # closes the first step
        _extension.record_impl("lib_b", "op_b_for_this_test", "cpu", "reference")
    ops = {d: json.loads((d / "meta.json").read_text()).get("ops", {}) for d in (first.dir, second.dir, parent.dir)}
    assert "op_a_for_this_test" in ops[first.dir] and "op_b_for_this_test" not in ops[first.dir]
    assert "op_b_for_this_test" in ops[second.dir] and "op_a_for_this_test" not in ops[second.dir]
    assert {"op_a_for_this_test", "op_b_for_this_test"} <= set(ops[parent.dir])
