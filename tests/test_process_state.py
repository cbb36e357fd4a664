"""Process-wide state a command changes is put back: the garbage collector after an evaluation, the WANDB_*
variables after a run (also when they fail); torchrun's RANK is read in one place."""
import contextlib
import gc
import os
import re
from pathlib import Path

import pytest

from iouctl.analysis import coco_eval
from iouctl.runs import open_run, read_status
from tests.analysis.conftest import write_gt

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gt(tmp_path):
    image = {"id": 1, "file_name": "1.png", "width": 64, "height": 64}
    box = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}
    return write_gt(tmp_path / "gt.json", [image], [box], [3])


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_for_an_evaluation_and_restored_also_on_error(gt, monkeypatch, enabled):
    seen = []
    run = coco_eval._run_faster
    monkeypatch.setattr(coco_eval, "_run_faster", lambda g, res: seen.append(gc.isenabled()) or run(g, res))
    good = [{"image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "score": 0.9}]
    try:
        gc.enable() if enabled else gc.disable()
        assert coco_eval.evaluate(gt, good)["AP"] == pytest.approx(1.0)
        assert seen == [False] and gc.isenabled() is enabled
        with pytest.raises(ValueError, match="result 0 is not a dict"):  # raised inside the paused section
            coco_eval.evaluate(gt, [{"image_id": 1}])
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def _wandb_variables():
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}


@pytest.mark.parametrize("fails", [False, True], ids=["run", "failed-start"])
def test_wandb_variables_are_restored_after_a_run(tmp_path, monkeypatch, fails):
    pytest.importorskip("wandb")
    from iouctl.loggers import WandbLogger

    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "users-cache"))  # the user's own: put back as it was
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)  # unset: unset again
    logger = WandbLogger(mode="disabled")
    if fails:
        def no_init(*args):
            assert os.environ["WANDB_DATA_DIR"].startswith(str(tmp_path / "runs"))  # set while it starts
            raise RuntimeError("wandb.init failed")

        monkeypatch.setattr(logger, "_init", no_init)
    before = _wandb_variables()
    with pytest.raises(RuntimeError, match="wandb.init failed") if fails else contextlib.nullcontext():
        with open_run("eval", "w", tmp_path / "runs", "a: 1\n", [], logger=logger) as run:
            assert os.environ["WANDB_CACHE_DIR"] == str(run.dir / "wandb" / "cache")
            assert os.environ["WANDB_DATA_DIR"] == str(run.dir / "wandb" / "data")
    (d,) = (tmp_path / "runs" / "eval").iterdir()
    assert read_status(d) == ("FAILED" if fails else "COMPLETED")
    after = _wandb_variables()
    after.pop("WANDB_SERVICE", None)  # wandb's own token for its service process, which wandb itself manages
    assert after == {k: v for k, v in before.items() if k != "WANDB_SERVICE"}


def test_rank_is_read_in_one_place():
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK are read by iouctl.engine.distributed only."""
    readers = sorted(str(p.relative_to(REPO)) for p in (REPO / "iouctl").rglob("*.py")
                     if re.search(r"""["'](RANK|WORLD_SIZE|LOCAL_RANK)["']""", p.read_text()))
    assert readers == ["iouctl/engine/distributed.py"]
