"""logger=wandb without credentials or network: offline, never blocking, files inside the run directory."""
import time

import pytest

from iouctl import config
from iouctl.runs import open_run, read_status
from tests.wandb_records import config as wandb_config, history

pytest.importorskip("wandb")


def test_wandb_offline_mirror(tmp_path):
    cfg = config.compose("bench_pool".replace("_", "-"), ["logger=wandb", f"paths.runs_dir={tmp_path}"])
    logger = config.instantiate(cfg.logger)
    png = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
    t0 = time.time()
    with open_run("bench-pool", "wb", tmp_path, config.to_yaml(cfg), ["logger=wandb"], config=config.to_dict(cfg),
                  logger=logger) as run:
        for step in range(3):
            run.log({"loss": 1.0 / (step + 1), "ap": 0.25 * step}, step=step)
        run.log_table("table", ["arm", "AP"], [["greedy", 0.5], ["iou-guided", 0.6]])
        run.log_image("plot", png)
    assert time.time() - t0 < 60  # never waits on the network (online init would block ~90 s here)
    assert logger.resolved_mode == "offline" and read_status(run.dir) == "COMPLETED"

    files = list((run.dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "the wandb run lives inside the run directory"
    rows = [r for r in history(files[0]) if "loss" in r]
    assert [r["loss"] for r in rows] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [r["ap"] for r in rows] == [0.0, 0.25, 0.5]
    logged = {k.split("/")[0] for r in history(files[0]) for k in r}  # media are nested: table/_type, ...
    assert {"table", "plot"} <= logged
    cfg_logged = wandb_config(files[0])
    assert cfg_logged["impls"] == list(cfg.impls) and cfg_logged["name"] == cfg.name
    assert (run.dir / "wandb" / "cache").is_dir()  # WANDB_CACHE_DIR inside the run


def test_bad_mode_is_one_line():
    with pytest.raises(ValueError, match="choose one of auto, online, offline, disabled"):
        config.instantiate(config.compose("demo", ["logger=wandb", "logger.mode=sometimes"]).logger)
