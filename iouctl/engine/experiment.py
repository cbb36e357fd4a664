"""An experiment from Python, as the CLI runs one: compose the command's config, open its run directory, call the
command's engine function.

    from iouctl.engine import evaluate, train
    from iouctl.engine.experiment import experiment

    with experiment("train", ["experiment=tiny", "model=iou_net"]) as ex:
        result = train.run(ex.cfg, ex.run)

`open_command_run` is the part the CLI shares (it composes and reports errors itself).
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional, Sequence

# A run folder is <YYYY-mm-dd_HH-MM-SS>_<name>[-N]; most file systems allow 255 bytes per name.
MAX_NAME_BYTES = 255 - len("2000-01-01_00-00-00_") - len("-999")


def check_run_name(name: str) -> None:
    from iouctl.errors import ConfigError

    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"name={name[:40]}... is {len(name.encode('utf-8'))} bytes; it names the run folder, "
                          f"which allows at most {MAX_NAME_BYTES}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An open experiment: its composed `cfg`, its open `run` (iouctl.runs.Run) and what it continues from
    (`found`, iouctl.engine.inputs.Found: the checkpoint, detections or run it restored)."""

    cfg: Any
    run: Any
    found: Any


@contextmanager
def experiment(command: str, overrides: Sequence[str] = (), console: Any = None) -> Iterator[Experiment]:
    """Find what `command` continues from (iouctl.engine.inputs.find: eval restores its train run's model, data and
    pool), compose its config with `overrides`, open its run (closed COMPLETED, or FAILED with the traceback in its
    log) and yield an :class:`Experiment`. Errors are raised, not printed: a user error is an IouctlError."""
    from iouctl.engine.compose import compose
    from iouctl.engine.inputs import find

    found = find(command, overrides)
    overrides = [*found.overrides, *overrides]
    choices: dict = {}
    cfg = compose(command, overrides, choices=choices)
    with open_command_run(command, cfg, overrides, choices, console) as run:
        yield Experiment(cfg, run, found)


@contextmanager
def open_command_run(command: str, cfg: Any, overrides: Sequence[str], choices: Optional[dict],
                     console: Any = None) -> Iterator[Any]:
    """Open the run directory of `command` for its composed `cfg` (recording `overrides` and the group `choices`),
    with the logger cfg.logger names, print its header (and which inference a model is evaluated with) and yield
    the Run. Under torchrun, ranks other than 0 get a scratch run that is removed afterwards."""
    from rich.markup import escape

    from iouctl import config
    from iouctl.engine.compose import inference_note
    from iouctl.engine.distributed import rank
    from iouctl.errors import IouctlError
    from iouctl.runs import open_run

    check_run_name(str(cfg.name))
    logger = config.instantiate(cfg.logger)
    runs_dir = str(cfg.paths.runs_dir)
    if rank() > 0:  # torchrun: rank 0 owns the run directory and the logger
        import tempfile

        from iouctl.loggers import NullLogger

        runs_dir, logger = tempfile.mkdtemp(prefix=f"iouctl-rank{rank()}-"), NullLogger()
    with ExitStack() as stack:
        try:
            run = stack.enter_context(open_run(command, str(cfg.name), runs_dir, config.to_yaml(cfg), list(overrides),
                                               config=config.to_dict(cfg), logger=logger, console=console,
                                               choices=choices))
        except OSError as e:  # a runs folder that is a file, read-only, full ...
            raise IouctlError(f"cannot create a run folder in paths.runs_dir={runs_dir}: {e.strerror}"
                              + (f" ({e.filename})" if e.filename else "")) from None
        run.console.print(f"[bold]iouctl {command}[/] -> {escape(str(run.dir))}")
        note = inference_note(cfg, list(overrides))
        if note:
            run.console.print(escape(note))
        yield run
    if runs_dir != str(cfg.paths.runs_dir):  # a non-zero rank's scratch run
        import shutil

        shutil.rmtree(runs_dir, ignore_errors=True)
