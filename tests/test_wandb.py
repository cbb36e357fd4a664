"""logger=wandb without credentials or network: offline, never blocking, files inside the run directory, and every
row of metrics.jsonl in the wandb run with the same values."""
import json
import math
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iouctl import config
from iouctl.cli import app
from iouctl.runs import open_run, read_status
from tests.wandb_records import config as wandb_config, history

pytest.importorskip("wandb")


@pytest.mark.slow
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
    with pytest.raises(ValueError, match="logger.mode.*sometimes.*auto, online, offline, disabled"):
        config.instantiate(config.compose("demo", ["logger=wandb", "logger.mode=sometimes"]).logger)


# What wandb records of its own in every history row (step, times), besides what the run logged.
WANDB_KEYS = ("_step", "_runtime", "_timestamp")


def _wandb_history(run_dir: Path) -> list[dict]:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"one wandb run file in {run_dir}"
    return history(files[0])


def _media(row: dict) -> set[str]:
    """Names of the images and tables in a history row (wandb nests them: name/_type, name/path, ...)."""
    return {k.removesuffix("/_type") for k in row if k.endswith("/_type")}


def _scalars(row: dict) -> dict:
    media = _media(row)
    return {k: v for k, v in row.items() if k not in WANDB_KEYS and not any(k.startswith(m + "/") for m in media)}


def assert_mirrors_metrics(run_dir: Path, at_own_step: bool = True) -> list[dict]:
    """Every row of metrics.jsonl is one wandb history row (or part of one, rows of one step share it) with the same
    values, in order, at its step when it has one (`at_own_step`); wandb holds no other value. Returns the history."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hist = _wandb_history(run_dir)
    steps = [h["_step"] for h in hist]
    assert steps == sorted(set(steps)), f"wandb steps not increasing: {steps}"
    i, taken = 0, set()  # the wandb row matched last and the keys of it already matched
    for row in rows:
        want = {k: v for k, v in row.items() if k not in ("time", "step")}
        while i < len(hist) and (not want.keys() <= hist[i].keys() or want.keys() & taken):
            i, taken = i + 1, set()
        assert i < len(hist), f"{run_dir.name}: row {row} of metrics.jsonl is not in the wandb run"
        got = hist[i]
        for k, v in want.items():
            if v is None:  # metrics.jsonl writes NaN as null
                assert got[k] is None or math.isnan(got[k]), k
            else:
                assert got[k] == v, f"{k} at step {row.get('step')}: wandb {got[k]!r}, metrics.jsonl {v!r}"
        if "step" in row and at_own_step:
            assert got["_step"] == row["step"], f"{sorted(want)[0]}...: logged at step {row['step']}"
        taken |= want.keys()
    n_jsonl = sum(len(r) - ("time" in r) - ("step" in r) for r in rows)
    assert sum(len(_scalars(h)) for h in hist) == n_jsonl, "wandb holds values metrics.jsonl does not"
    return hist


def _row_with(hist: list[dict], key: str) -> dict:
    (row,) = [h for h in hist if key in h]
    return row


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """A tiny iou_net `train`, then `eval`, `nms-ablate` and `refine` of it, all with logger=wandb (offline)."""
    root = tmp_path_factory.mktemp("wandb_mirror")
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        mp.delenv(var, raising=False)
    mp.setenv("NETRC", str(root / "no-netrc"))
    mp.setenv("WANDB_CONFIG_DIR", str(root / "wandb-config"))
    runs = root / "runs"
    common = ["logger=wandb", f"paths.runs_dir={runs}"]
    tiny = ["experiment=tiny", "model=iou_net", "data.num_train=8", "data.num_val=4", "data.image_size=64",
            "data.max_size=24", "model.min_size=64", "model.max_size=64", "optim.lr=0.005",
            "model.box_score_thresh=0.0"]
    runner = CliRunner()
    r = runner.invoke(app, ["train", *tiny, *common])
    assert r.exit_code == 0, r.output
    (train_dir,) = (runs / "train").iterdir()
    for args in (["eval"], ["nms-ablate", "scores=[cls,iou]", "iou_thresholds=[0.5,0.7]",
                                                    "methods=[greedy,iou-guided,soft-linear,soft-gaussian]"], ["refine"]):
        r = runner.invoke(app, [*args, f"run={train_dir}", *common])
        assert r.exit_code == 0, r.output
    yield {c: next((runs / c).iterdir()) for c in ("train", "eval", "nms-ablate", "refine")}
    mp.undo()


@pytest.mark.slow
def test_train_mirror_has_the_final_evaluation(mirrored):
    hist = assert_mirrors_metrics(mirrored["train"])
    final = _row_with(hist, "val/AP")
    assert final["_step"] == 4 and "loss" in final  # experiment=tiny: 4 iterations, evaluated after the last
    assert {"val/AP90", "val/pearson_iou", "val/pearson_iou_iou>0.5"} <= final.keys()
    assert "plots/score_vs_true_iou_val" in _media(final)  # the plot at the step of its numbers
    assert [h["_step"] for h in hist if "loss" in h] == [1, 2, 3, 4]


@pytest.mark.slow
def test_eval_mirror(mirrored):
    hist = assert_mirrors_metrics(mirrored["eval"])
    row = _row_with(hist, "val/AP")
    assert row["_step"] == 4 and "plots/score_vs_true_iou_val" in _media(row)


@pytest.mark.slow
def test_nms_ablate_mirror(mirrored):
    hist = assert_mirrors_metrics(mirrored["nms-ablate"])
    arms = [h for h in hist if any(k.endswith("/dAP") for k in h)]
    assert len(arms) == 2 * 2 + 2 + 2 * 2 + 2  # greedy, iou-guided, soft-linear x thresholds; soft-gaussian
    media = set().union(*(_media(h) for h in hist))
    assert {"nms_ablation", "plots/ap_vs_iou_threshold", "plots/score_vs_true_iou", "plots/dap_heatmap",
            "plots/tide_errors", "plots/reliability"} <= media
    assert any(k.startswith("errors/") for h in hist for k in h) and any(k.startswith("calibration/") for h in hist
                                                                         for k in h)


@pytest.mark.slow
def test_refine_mirror(mirrored):
    hist = assert_mirrors_metrics(mirrored["refine"])
    row = _row_with(hist, "after/AP")
    assert {"refinement", "plots/true_iou_before_after"} <= _media(row) and "mean_true_iou_after" in row


@pytest.mark.slow
def test_rows_are_kept_whatever_the_order_of_steps(tmp_path):
    """Plots before their row, rows without a step among rows with one, a step repeated or going back, a 0-d tensor:
    wandb gets every value, at increasing steps."""
    import torch
    from PIL import Image

    png = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(png)
    logger = config.instantiate(config.compose("eval", ["logger=wandb", "logger.mode=offline"]).logger)
    with open_run("eval", "order", tmp_path, "{}\n", [], logger=logger) as run:
        run.log_image("plot", png)
        run.log({"a": 1.0})                        # no step, first: step 0 with the plot
        run.log({"a": 2.0})                        # no step again: a row of its own
        run.log({"loss": 0.5}, step=5)
        run.log_image("plot", png)
        run.log({"val/AP": 0.25}, step=5)          # same step, other keys: joins step 5 with its plot
        run.log({"loss": 0.4}, step=5)             # same step, same key: must not overwrite 0.5
        run.log({"loss": 0.3}, step=3)             # behind the current step: wandb would drop it
        run.log({"x": torch.tensor(0.125), "nan": float("nan")})
        run.log_table("table", ["k"], [["v"]])
    hist = assert_mirrors_metrics(run.dir, at_own_step=False)
    assert [h["_step"] for h in hist] == [0, 1, 5, 6, 7, 8]  # the repeated and the late step: the next free ones
    assert [(h["_step"], _media(h)) for h in hist if _media(h)] == [(0, {"plot"}), (5, {"plot"}), (8, {"table"})]
    assert [h["loss"] for h in hist if "loss" in h] == [0.5, 0.4, 0.3] and "val/AP" in hist[2]
