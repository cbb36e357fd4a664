"""The run directory: the one place a command writes to.

runs/<command>/<YYYY-mm-dd_HH-MM-SS>_<name>/
    config.yaml      the resolved config            overrides.yaml  the command-line overrides
    meta.json        argv, git sha + dirty flag, versions, host, times
    log              everything printed, plus tracebacks
    status           RUNNING -> COMPLETED | FAILED | INTERRUPTED
    metrics.jsonl    one JSON object per logged row (the source of truth; loggers mirror it)
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

from iouctl import __version__
from iouctl.fileio import atomic_write, atomic_write_json

STATUSES = ("RUNNING", "COMPLETED", "FAILED", "INTERRUPTED")
REPO_ROOT = Path(__file__).resolve().parent.parent


class TeeConsole:
    """A rich console that also writes plain text (no colours) to the run's log file."""

    def __init__(self, terminal: Console, log_path: Path) -> None:
        self.terminal = terminal
        self._log_file = open(log_path, "a", encoding="utf-8", buffering=1)
        self.file_console = Console(file=self._log_file, width=120, no_color=True, force_terminal=False,
                                    log_path=False, highlight=False)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.terminal.print(*objects, **kwargs)
        self.file_console.print(*objects, **kwargs)

    def log(self, *objects: Any, **kwargs: Any) -> None:
        self.terminal.log(*objects, **kwargs)
        self.file_console.log(*objects, **kwargs)

    def rule(self, *args: Any, **kwargs: Any) -> None:
        self.terminal.rule(*args, **kwargs)
        self.file_console.rule(*args, **kwargs)

    def write_log(self, text: str) -> None:
        """Text for the log file only (tracebacks, debug detail)."""
        self._log_file.write(text if text.endswith("\n") else text + "\n")

    def __getattr__(self, name: str) -> Any:  # status(), width, is_terminal ...: the terminal's
        return getattr(self.terminal, name)

    def close(self) -> None:
        self._log_file.close()


def _git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(dirty) if dirty is not None else None}


def collect_meta(command: str, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "command": command,
        "name": name,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "iouctl_version": __version__,
        "git": _git_state(REPO_ROOT),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["cuda"] = {
            "build": torch.version.cuda,
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
        }
        meta["torch_threads"] = torch.get_num_threads()
    except ImportError:
        meta["torch"] = None
    return meta


def _json_safe(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; NaN/inf to null (JSON has neither)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class Run:
    """A run directory plus its console, metrics file and logger mirror. Create with :func:`open_run`."""

    def __init__(self, dir: Path, command: str, name: str, console: TeeConsole, logger: Any,
                 owns_console: bool = True) -> None:
        self.dir = dir
        self._owns_console = owns_console
        self.command = command
        self.name = name
        self.console = console
        self.logger = logger
        self._metrics = open(dir / "metrics.jsonl", "a", encoding="utf-8")
        self._t0 = time.time()

    # files -----------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """A path inside the run directory, parent folders created."""
        p = self.dir.joinpath(*parts)
        if not p.resolve().is_relative_to(self.dir.resolve()):
            raise ValueError(f"path {p} escapes the run directory {self.dir}")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, relpath: str, obj: Any) -> Path:
        return atomic_write_json(self.path(relpath), _json_safe(obj))

    def write_text(self, relpath: str, text: str) -> Path:
        return atomic_write(self.path(relpath), text)

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r}; valid: {STATUSES}")
        atomic_write(self.dir / "status", status + "\n")

    # metrics ---------------------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Append one row to metrics.jsonl (flushed at once) and mirror it to the logger."""
        row = {"time": round(time.time() - self._t0, 3)}
        if step is not None:
            row["step"] = int(step)
        row.update(_json_safe(metrics))
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        self.logger.log(metrics, step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.logger.log_table(name, columns, rows)

    def log_image(self, name: str, path: Path) -> None:
        self.logger.log_image(name, path)

    def progress(self, transient: bool = False) -> Progress:
        """A rich progress display on the terminal (bars, counts, elapsed and remaining time)."""
        return Progress(
            SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console.terminal, transient=transient,
        )

    def child(self, name: str) -> "Run":
        """A step of a composite command (demo): its own folder and metrics.jsonl inside this run, the same console,
        and metric names prefixed with `name/` in the logger mirror."""
        d = self.path(name, "metrics.jsonl").parent
        return Run(d, self.command, f"{self.name}/{name}", self.console, _PrefixedLogger(self.logger, name),
                   owns_console=False)

    def close(self) -> None:
        self._metrics.close()
        if self._owns_console:
            self.console.close()


class _PrefixedLogger:
    def __init__(self, logger: Any, prefix: str) -> None:
        self.logger, self.prefix = logger, prefix

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.logger.log({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.logger.log_table(f"{self.prefix}/{name}", columns, rows)

    def log_image(self, name: str, path: Path) -> None:
        self.logger.log_image(f"{self.prefix}/{name}", path)


def new_run_dir(runs_dir: Path, command: str, name: str) -> Path:
    """Create runs_dir/command/<timestamp>_<name>, never reusing an existing folder."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or command
    parent = Path(runs_dir).expanduser() / command
    parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for i in range(1000):
        d = parent / (f"{stamp}_{safe}" if i == 0 else f"{stamp}_{safe}-{i}")
        try:
            d.mkdir()  # atomic: two processes never get the same folder
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {parent}")


class _Terminated(BaseException):
    """SIGTERM turned into an exception so the run closes as INTERRUPTED."""


@contextmanager
def open_run(
    command: str,
    name: str,
    runs_dir: str | Path,
    config_yaml: str,
    overrides: Sequence[str],
    config: dict | None = None,
    logger: Any = None,
    console: Console | None = None,
) -> Iterator[Run]:
    """Create a run directory, yield a :class:`Run`, and close it with the right status whatever happens."""
    d = new_run_dir(Path(runs_dir), command, name)
    atomic_write(d / "config.yaml", config_yaml)
    atomic_write(d / "overrides.yaml", "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n")
    atomic_write_json(d / "meta.json", collect_meta(command, name))
    tee = TeeConsole(console or Console(stderr=True), d / "log")
    logger = logger if logger is not None else _null_logger()
    run = Run(d, command, name, tee, logger)
    run.set_status("RUNNING")
    tee.write_log(f"iouctl {command} -> {d}\nargv: {' '.join(sys.argv)}")

    def on_term(signum, frame):  # noqa: ARG001
        raise _Terminated()

    old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    status = "FAILED"
    try:
        logger.start(d, f"{command}/{d.name}", config or {})
        yield run
        status = "COMPLETED"
    except (KeyboardInterrupt, _Terminated):
        status = "INTERRUPTED"
        tee.write_log("interrupted by the user (Ctrl-C / SIGTERM)")
        raise
    except BaseException:
        tee.write_log(traceback.format_exc())
        raise
    finally:
        _finish(run, status, old_term)


def _finish(run: Run, status: str, old_term: Any) -> None:
    try:
        run.logger.finish(status)
    except Exception as exc:  # a mirror must not turn a finished run into a failed one
        run.console.write_log(f"logger.finish failed: {exc!r}")
    meta_path = run.dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(finished=_dt.datetime.now().isoformat(timespec="seconds"), status=status,
                duration_s=round(time.time() - run._t0, 3))
    atomic_write_json(meta_path, meta)
    run.set_status(status)
    run.console.write_log(f"status: {status}")
    run.close()
    if old_term is not None:
        signal.signal(signal.SIGTERM, old_term)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _null_logger():
    from iouctl.loggers import NullLogger

    return NullLogger()


def read_status(run_dir: Path) -> str:
    return (Path(run_dir) / "status").read_text().strip()


def latest_run(runs_dir: str | Path, commands: Sequence[str], status: str | None = "COMPLETED",
               has: str | None = None) -> Path | None:
    """The newest run (by folder name, i.e. start time) of any of `commands` with the given status (None: any), and
    holding the file `has` (a path relative to the run) when given."""
    found: list[Path] = []
    for c in commands:
        base = Path(runs_dir).expanduser() / c
        if base.is_dir():
            found += [d for d in base.iterdir() if (d / "status").is_file()
                      and (status is None or read_status(d) == status) and (has is None or (d / has).is_file())]
    return max(found, key=lambda d: (d.name, str(d))) if found else None


def find_run_file(run: str | None, runs_dir: str | Path, commands: Sequence[str], relpath: str,
                  status: str | None = "COMPLETED") -> Path:
    """`relpath` inside the run folder `run` (or `run` itself when it is a file), or inside the newest run of
    `commands` with `status` (None: any, e.g. a killed run to resume) that has it. One clear IouctlError if none."""
    from iouctl.errors import IouctlError

    if run is None:
        latest = latest_run(runs_dir, commands, status=status, has=relpath)
        if latest is None:
            what = "completed " if status == "COMPLETED" else ""
            raise IouctlError(f"no {what}{'/'.join(commands)} run under {runs_dir} has {relpath}; pass run=<dir>")
        return latest / relpath
    path = Path(run).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise IouctlError(f"run={run}: no such run folder or file")
    if not (path / relpath).is_file():
        raise IouctlError(f"run={run} has no {relpath}")
    return path / relpath
