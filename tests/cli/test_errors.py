"""Errors at the CLI edge: a user's mistake is one line and exit code 2, a bug keeps its traceback (in the run's log
when there is a run) and exits 1, user text is printed literally, and nothing suggests an unsafe load."""
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from iouctl.cli import app
from iouctl.errors import IouctlError

runner = CliRunner()


def one_line(r, code=2):
    """The single non-empty stderr line of a CliRunner result that exited with `code`."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    return lines[0]


# ------------------------------------------------------------------------------------- usage errors: one line
@pytest.mark.parametrize("args, expected", [
    (["nms-ablate", "--foo"], "error: no such option: --foo"),
    (["nms-ablate", "--score", "bogus"],
     "error: invalid value for '--score': 'bogus' is not one of 'cls', 'iou', 'fused'; "
     "see 'iouctl nms-ablate --help'"),
    (["bench-pool", "--impl", "nope"], "error: invalid value for '--impl': 'nope' is not one of 'all'"),
    (["nosuch"], "error: no such command 'nosuch'; see 'iouctl --help'"),
    (["data", "convert-voc"], "error: missing argument"),
    (["data", "export-coco", "x.npz", "--out", "o.json", "--score", "bogus"],
     "error: invalid value for '--score': 'bogus' is not one of 'cls', 'iou', 'fused'"),
    (["data", "export-coco", "x.npz", "--out", "o.json", "--cls-weight", "5"],
     "error: invalid value for '--cls-weight'"),
])
def test_usage_errors_are_one_line(args, expected):
    assert one_line(runner.invoke(app, args)).startswith(expected)


def test_help_and_no_arguments_still_show_the_help():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "nms-ablate" in r.stdout and "Usage" in r.stdout
    r = runner.invoke(app, ["data"])  # a group without a command: its help, as before
    assert r.exit_code == 2 and "export-coco" in r.output and "error:" not in r.output


def test_usage_error_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "iouctl", "train", "--nope"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: no such option: --nope; see 'python -m iouctl train --help'"]


# ------------------------------------------------------------------------------ config and path mistakes
@pytest.mark.slow
def test_overrides_hydra_cannot_take(tmp_path):
    runs = tmp_path / "runs"
    assert one_line(runner.invoke(app, ["train", "=5", f"paths.runs_dir={runs}"])) == \
        "error: override '=5' has no key: use key=value, group=option, +new_key=value or ~key"
    line = one_line(runner.invoke(app, ["train", "optim." + "a" * 300 + "=1", f"paths.runs_dir={runs}"]))
    assert line.startswith("error: unknown config key 'optim.aaaa") and "(306 characters)" in line
    line = one_line(runner.invoke(app, ["train", "name=" + "b" * 300, f"paths.runs_dir={runs}"]))
    assert "name=bbbb" in line and "300 bytes" in line and "at most 231" in line
    assert not runs.exists()  # refused before a run folder is made


@pytest.mark.parametrize("override, shown", [("a=[1", "'a=[1'"), ("[bold]x", "'[bold]x'"),
                                             ("optim.lr=é\u202e", r"'optim.lr=é\u202e'")])
def test_unparsable_override_is_named_and_quoting_suggested(override, shown):
    line = one_line(runner.invoke(app, ["train", override]))
    assert line.startswith(f"error: cannot parse override {shown}: ") and "quote a value" in line


def test_experiment_for_another_dataset():
    line = one_line(runner.invoke(app, ["train", "experiment=tiny", "data=coco", "data.root=/nowhere"]))
    assert line == ("error: experiment=tiny sets data.num_train, which data=coco does not have; that experiment is "
                    "for data=shapes")


def test_runs_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line(runner.invoke(app, ["bench-pool", "--quick", f"paths.runs_dir={tmp_path / 'file'}"]))
    assert line == f"error: cannot create a run folder in paths.runs_dir={tmp_path / 'file'}: Not a directory " \
                   f"({tmp_path / 'file' / 'bench-pool'})"


def test_runs_dir_that_is_read_only(tmp_path, monkeypatch):
    import errno

    import iouctl.runs

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)

    def mkdir(self, *a, **k):  # what a read-only folder answers to a non-root user (root could write into it)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(iouctl.runs.Path, "mkdir", mkdir)
    line = one_line(runner.invoke(app, ["bench-pool", "--quick", f"paths.runs_dir={ro}"]))
    assert line == f"error: cannot create a run folder in paths.runs_dir={ro}: Permission denied ({ro / 'bench-pool'})"


def test_export_coco_out_is_a_folder(tmp_path):
    from iouctl.data.detections import Detections

    dets = tmp_path / "d.npz"
    Detections(torch.tensor([1]), torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([1]), torch.tensor([0.5])).save(dets)
    line = one_line(runner.invoke(app, ["data", "export-coco", str(dets), "--out", str(tmp_path)]))
    assert line == f"error: --out {tmp_path} is a folder; give the JSON file to write, e.g. --out " \
                   f"{tmp_path / 'results.json'}"
    line = one_line(runner.invoke(app, ["data", "export-coco", str(dets), "--out", str(tmp_path), "--overwrite"]))
    assert "is a folder" in line and sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


# ------------------------------------------------------------------------------ user text printed literally
def test_user_text_is_not_read_as_markup():
    line = one_line(runner.invoke(app, ["data", "check", "data=coco", 'data.root="/x/[bold]y"']))
    assert line == "error: COCO dataset root not found: /x/[bold]y"


def test_a_dataset_error_with_brackets_keeps_them(tmp_path):
    from iouctl.cli.common import user_errors
    from iouctl.data.coco import DatasetError

    with pytest.raises(Exception) as e, user_errors():
        raise DatasetError("a.json: annotation 3: bbox [1, 2, nan, 3] is not 4 finite numbers with w, h >= 0")
    assert e.value.exit_code == 2


# ----------------------------------------------------------------------------------- errors from the engine
def test_dataloader_worker_error_is_its_own_line(capsys):
    """A DatasetError raised in a DataLoader worker comes back with the worker's traceback as its message; the user
    sees the error's own line."""
    from iouctl.cli.common import user_errors
    from iouctl.data.coco import DatasetError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DatasetError("cannot read image /data/[x]/3.png: image file is truncated")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(DatasetError) as raw:
        next(iter(loader))
    assert "Original Traceback" in str(raw.value)  # what torch hands back: 18 lines
    with pytest.raises(Exception) as e, user_errors():
        raise raw.value
    assert e.value.exit_code == 2
    assert capsys.readouterr().err == "error: cannot read image /data/[x]/3.png: image file is truncated\n"


@pytest.mark.slow
def test_a_bug_in_a_run_is_one_line_pointing_to_the_log(tmp_path, capsys):
    from iouctl.cli.common import run_experiment

    def body(cfg, run):
        return {}["missing"]

    with pytest.raises(Exception) as e:
        run_experiment("bench-pool", [f"paths.runs_dir={tmp_path}"], False, body)
    assert e.value.exit_code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    (run_dir,) = (tmp_path / "bench-pool").iterdir()
    assert err[-1] == f"error: KeyError: 'missing' (traceback in {run_dir}/log)" and "Traceback" not in "".join(err)
    log = (run_dir / "log").read_text()
    assert "Traceback (most recent call last)" in log and 'return {}["missing"]' in log
    assert (run_dir / "status").read_text() == "FAILED\n"


def test_a_bug_before_any_run_keeps_its_traceback():
    from iouctl.cli.common import user_errors

    with pytest.raises(ZeroDivisionError), user_errors():  # nowhere to keep it but the terminal, exit 1
        1 / 0


# ------------------------------------------------------------------------------------------ checkpoints
class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty or cut short"),
    ("truncated", "the file is cut short or corrupt"),
    ({"x": Evil()}, "it holds a pickled posix.system, and only tensors are read (nothing in it is run)"),
    (random.Random(0).randbytes(64), "not a file of tensors torch wrote"),  # seeded: one test id everywhere
])
def test_unreadable_checkpoint_is_one_line_without_unsafe_advice(tmp_path, content, reason):
    from iouctl.engine.train import load_checkpoint

    p = tmp_path / "last.pt"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content == "truncated":
        torch.save({"model": {"w": torch.ones(100)}}, p)
        p.write_bytes(p.read_bytes()[:200])
    else:
        torch.save(content, p)
    with pytest.raises(IouctlError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert msg.startswith(f"cannot read checkpoint {p}: {reason}") and "\n" not in msg
    assert "weights_only" not in msg and "False" not in msg


def test_pretrained_file_error_never_suggests_an_unsafe_load(tmp_path):
    from iouctl.models.backbones import backbone_body

    p = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, p)
    with pytest.raises(IouctlError) as e:
        backbone_body("resnet18", str(p))
    assert "it holds a pickled posix.system" in str(e.value) and "weights_only" not in str(e.value)


def test_resume_from_a_checkpoint_of_another_model_names_the_first_tensor(tmp_path):
    """torch lists every mismatched tensor over many lines; the user gets the first one and the config to use."""
    import yaml

    from iouctl.engine.train import load_model_state

    run = tmp_path / "runs" / "train" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "overrides.yaml").write_text('- "model=iou_retina"\n- "resume=true"\n')
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"_target_": "m", "iou_head": True, "depth": 3}}))
    theirs = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ours = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(IouctlError) as e:
        load_model_state(ours, {"model": theirs.state_dict()}, run / "checkpoints" / "last.pt", "m",
                         {"_target_": "m", "iou_head": False, "depth": 3})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {run / 'checkpoints' / 'last.pt'} does not fit model=m: "
                                              "3 tensors differ (first: 0.weight is [4, 3] there but [5, 3] here)")
    assert msg.endswith(f"its run had model.iou_head=True (see {run / 'config.yaml'}): use the same model config")
    load_model_state(ours, {"model": ours.state_dict()}, run / "checkpoints" / "last.pt", "m")  # a fit loads


@pytest.mark.slow
def test_sigterm_of_a_cli_run_is_one_line(tmp_path):
    """The real command line: SIGTERM while a command runs prints one line, exits 143, the run is INTERRUPTED."""
    script = textwrap.dedent("""
        import signal, sys, time
        from iouctl.cli import app
        from iouctl.cli import common

        signal.alarm(120)  # never outlive the test

        def slow(cfg, run):
            print(run.dir, flush=True)
            time.sleep(60)

        common_run = common.run_experiment
        sys.argv = ["iouctl", "bench-pool"]
        cli_app = sys.modules["iouctl.cli.app"]  # the module (iouctl.cli.app the attribute is the Typer app)
        cli_app.run_experiment = lambda command, overrides, cfg, body, extra_overrides=None: common_run(
            command, overrides, cfg, slow, extra_overrides)
        app()
    """)
    env = {**os.environ, "IOUCTL_RUNS_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    run_dir = proc.stdout.readline().strip()
    proc.terminate()
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert re.findall(r"^error: .*$", err, re.M) == [f"error: terminated (SIGTERM); run marked INTERRUPTED: {run_dir}"]
    assert open(os.path.join(run_dir, "status")).read() == "INTERRUPTED\n"
