"""torchrun with gloo, 2 CPU processes: while rank 0 evaluates inside training, the other rank waits at a barrier
(not inside the next gradient all-reduce), and every rank leaves training together."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EVAL_SECONDS = 2.0  # rank 0's evaluation is held this long: a rank that does not wait runs on meanwhile

# Each rank runs `iouctl train` in-process and records, with wall-clock times, what it did: its DDP forward passes,
# its barriers, and (rank 0) its evaluations.
PROBE = textwrap.dedent("""
    import json, sys, time

    import torch

    from iouctl.engine import distributed, evaluate

    events = []
    log = lambda what: events.append([what, time.time()])
    evaluate_detections = evaluate.evaluate_detections

    def slow_evaluation(*args, **kwargs):
        log("eval start")
        result = evaluate_detections(*args, **kwargs)
        time.sleep(float(sys.argv[2]))
        log("eval end")
        return result

    barrier = distributed.barrier

    def logged_barrier():
        log("barrier in")
        barrier()
        log("barrier out")

    ddp_forward = torch.nn.parallel.DistributedDataParallel.forward

    def logged_forward(self, *args, **kwargs):
        log("forward")
        return ddp_forward(self, *args, **kwargs)

    evaluate.evaluate_detections = slow_evaluation
    distributed.barrier = logged_barrier
    torch.nn.parallel.DistributedDataParallel.forward = logged_forward
    from iouctl.cli import app

    try:
        app(sys.argv[3:], standalone_mode=False)
    finally:
        with open(f"{sys.argv[1]}/rank{distributed.rank()}.json", "w") as f:
            json.dump(events, f)
""")


def _times(events, what):
    return [t for w, t in events if w == what]


@pytest.mark.slow
def test_every_rank_waits_while_rank_0_evaluates(tmp_path):
    from iouctl import config

    train = ["train", "experiment=tiny", "eval_every=2", "device=cpu", f"paths.runs_dir={tmp_path / 'runs'}"]
    cfg = config.compose("train", train[1:])
    config.instantiate(cfg.data).prepare()  # generated once here, not by two ranks at once
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "probe.py"), str(tmp_path), str(EVAL_SECONDS), *train],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    evals = list(zip(_times(rank0, "eval start"), _times(rank0, "eval end")))
    assert len(evals) == 2 and not _times(rank1, "eval start")  # at iteration 2 and the final one, rank 0 only
    for events in (rank0, rank1):
        assert len(_times(events, "forward")) == 4 and len(_times(events, "barrier out")) == 2
    (mid_start, mid_end), (final_start, final_end) = evals
    waited = list(zip(_times(rank1, "barrier in"), _times(rank1, "barrier out")))
    # rank 1 reached each barrier while rank 0 evaluated, and left it only when that evaluation was over
    assert waited[0][0] < mid_end <= waited[0][1] and waited[1][0] < final_end <= waited[1][1]
    assert waited[0][1] - waited[0][0] > EVAL_SECONDS / 2
    third_forward = _times(rank1, "forward")[2]  # iteration 3: after the evaluation at iteration 2, not during it
    assert third_forward >= mid_end

    (run,) = (tmp_path / "runs" / "train").iterdir()  # rank 0's run only; rank 1's scratch folder is gone
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "COMPLETED" and meta["device"] == "cpu" and meta["dtype"] == "float32"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/AP" in r] == [2, 4]


def test_one_process_under_torchrun_trains_in_ddp(monkeypatch):
    """torchrun --nproc_per_node=1 takes the same path as K processes (process group, DDP), so a one-GPU check
    exercises nccl and DDP; without torchrun's variables the model is left as it is."""
    import torch

    from iouctl.engine import distributed

    model = torch.nn.Linear(2, 1)
    assert distributed.wrap(model, torch.device("cpu")) is model
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(k, v)
    try:
        net = distributed.wrap(model, torch.device("cpu"))
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel) and net.module is model
        assert torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() == 1
    finally:
        distributed.shutdown()
    assert not torch.distributed.is_initialized()
