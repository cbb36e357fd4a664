"""The command line: light --help, one-line errors with exit code 2, --cfg, python -m iouctl."""
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from iouctl.cli import app
from tests.lanes import sample

runner = CliRunner()
COMMANDS = ["train", "eval", "nms-ablate", "refine", "bench-pool", "demo", "data"]


def test_help_does_not_import_heavy_packages():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from iouctl.cli import app\n"
        f"for args in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'wandb') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "iouctl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "nms-ablate" in out.stdout and "bench-pool" in out.stdout


@pytest.mark.parametrize("command", sample(["train", "eval", "nms-ablate", "refine", "bench-pool", "demo"], 2))
def test_cfg_prints_the_composed_config(command):
    r = runner.invoke(app, [command, "--cfg", "seed=7"])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.stdout)
    assert cfg["seed"] == 7 and "paths" in cfg


@pytest.mark.parametrize("args,needle", sample([
    (["train", "optim.lr=abc"], "could not be converted to Float"),
    (["train", "model=nosuch"], "valid: faster_rcnn, iou_net, iou_retina, retina"),
    (["eval", "nms.nosuch=1"], "unknown config key 'nms.nosuch'"),
    (["nms-ablate", "data=coco"], "missing required value(s) data.root"),
    (["bench-pool", "repeats=many"], "'repeats'"),
    (["data", "generate", "data.seed=x"], "'data.seed'"),
], 2))
def test_bad_input_is_one_line_exit_2(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output


def test_bad_flag_value_lists_choices():
    r = runner.invoke(app, ["nms-ablate", "--score", "area"])
    assert r.exit_code == 2 and all(f"'{c}'" in r.output for c in ("cls", "iou", "fused"))
    assert len(r.output.strip().splitlines()) == 1 and "╭" not in r.output  # one line, not click's boxed usage


def test_refine_without_a_trained_run_fails_clearly_and_leaves_no_run(tmp_path):
    r = runner.invoke(app, ["refine", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2
    assert "box-differentiable IoU head" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_eval_without_a_train_run_is_one_line(tmp_path):
    r = runner.invoke(app, ["eval", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "no completed train run" in r.stderr and not any(tmp_path.iterdir())
    r = runner.invoke(app, ["eval", f"checkpoint={tmp_path / 'nope.pt'}", f"paths.runs_dir={tmp_path}"])
    assert r.exit_code == 2 and "no such file" in r.stderr
