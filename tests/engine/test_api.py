"""The README's Python API: train and evaluate without the CLI, the snippet run as it is written."""
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet() -> str:
    """The python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


@pytest.mark.slow
def test_the_readme_snippet_trains_and_evaluates(tmp_path, capsys):
    scope: dict = {}
    exec(compile(_snippet(), str(README), "exec"), scope)  # runs land in $IOUCTL_RUNS_DIR (tests/conftest.py)
    trained, evaluated, train_dir = scope["trained"], scope["evaluated"], scope["ex"].run.dir
    assert train_dir.parent == tmp_path / "runs" / "train" and scope["ev"].run.dir.parent.name == "eval"
    for d in (train_dir, scope["ev"].run.dir):
        assert (d / "status").read_text().strip() == "COMPLETED"
    # the eval run restored the train run's model and data: the same weights on the same images, the same numbers
    assert evaluated["metrics"] == trained["eval"]["metrics"]
    assert evaluated["correlations"] == trained["eval"]["correlations"]
    # the detector's contract is recorded: refine reads capabilities from it, not from the config's _target_
    meta = json.loads((train_dir / "meta.json").read_text())
    assert meta["detector"]["box_differentiable_iou"] is True and meta["detector"]["score"] == "iou"
    from iouctl.data.detections import Detections

    dets = Detections.load(train_dir / "detections" / "val.npz")
    assert dets.meta["detector"] == meta["detector"]
    assert f"AP {trained['eval']['metrics']['AP']} in {train_dir}" in capsys.readouterr().out
