"""The run directory: the one place a command writes to, and the one module that finds runs again.

runs/<command>/<YYYY-mm-dd_HH-MM-SS>_<name>/
    config.yaml      the resolved config            overrides.yaml  the command-line overrides
    choices.yaml     the option chosen in each config group (Hydra's runtime.choices): what a later command restores
    meta.json        argv, git sha + dirty flag, versions, host, pid (+ its start), times, resumed_from; the device,
                     dtype and threads the run computed with, and each op's implementation
    log              everything printed, plus tracebacks
    status           RUNNING -> COMPLETED | FAILED | INTERRUPTED (run_state: a RUNNING whose process is gone: KILLED)
    metrics.jsonl    one JSON object per logged row (the source of truth; loggers mirror it)
    detections/<split>.npz  raw (pre-NMS) detections (DETECTIONS)   source.json  the checkpoint an eval/refine used
    <step>/          a step of a composite command (the demo's train, ...): a child run, found like any other run
"""
from __future__ import annotations

import dataclasses
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
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

from iouctl import __version__
from iouctl.fileio import atomic_write, atomic_write_json

STATUSES = ("RUNNING", "COMPLETED", "FAILED", "INTERRUPTED")
REPO_ROOT = Path(__file__).resolve().parent.parent
DETECTIONS = "detections/{split}.npz"  # a run's raw (pre-NMS) detections of a split: eval/train write, others read
SOURCE = "source.json"  # {"checkpoint": file}: the weights an eval or refine run used (write_source / read_source)
CHOICES = "choices.yaml"


def detections_file(split: str) -> str:
    """The raw detections of `split`, relative to a run folder."""
    return DETECTIONS.format(split=split)


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
        "pid_started": process_start(os.getpid()),
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
        self._ops_since = _op_sequence()  # meta.json's ops: those resolved while this run was open
        self._step: Run | None = None  # the child run (step) in progress
        self._steps = 0  # steps opened so far

    # files -----------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """A path inside the run directory, parent folders created."""
        p = self.dir.joinpath(*parts)
        if not p.resolve().is_relative_to(self.dir.resolve()):
            raise ValueError(f"path {p} escapes the run directory {self.dir}")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def detections_path(self, split: str) -> Path:
        """Where the run's raw detections of `split` go (DETECTIONS: where nms-ablate, refine and eval's run= find
        them), parent folder created."""
        return self.path(detections_file(split))

    def write_json(self, relpath: str, obj: Any) -> Path:
        return atomic_write_json(self.path(relpath), _json_safe(obj))

    def write_text(self, relpath: str, text: str) -> Path:
        return atomic_write(self.path(relpath), text)

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r}; valid: {STATUSES}")
        atomic_write(self.dir / "status", status + "\n")

    def update_meta(self, **fields: Any) -> None:
        """Add fields to meta.json (e.g. resumed_from); the closing status and times are added to them."""
        meta_path = self.dir / "meta.json"
        atomic_write_json(meta_path, {**json.loads(meta_path.read_text()), **_json_safe(fields)})

    def record_runtime(self, device: Any, dtype: str) -> None:
        """Add what the run computes with to meta.json: the resolved device ("cpu", "cuda:0"), the dtype of its
        forward passes ("float32"; "float16 autocast" when training with amp) and torch's intra-op thread count."""
        import torch

        self.update_meta(device=str(device), dtype=dtype, threads=torch.get_num_threads())

    def record_config(self, config_yaml: str, overrides: Sequence[str], choices: dict | None) -> None:
        """config.yaml, overrides.yaml and choices.yaml: what a later command restores this run from (a child run
        that trains, like the demo's train step, records them as open_run does)."""
        write_config(self.dir, config_yaml, overrides, choices)

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

    def child(self, name: str, command: str | None = None) -> "Run":
        """A step of a composite command (demo): its own folder, meta.json, status and metrics.jsonl inside this
        run, the same console, and metric names prefixed with `name/` in the logger mirror. `command`: what the step
        runs (default: `name` with "-" for "_", folder names being spelled nms_ablate for nms-ablate); the run
        finders see the step as a run of that command.

        Steps run one after another: opening a step closes the one before as COMPLETED (it returned), and closing
        this run closes the last with this run's status."""
        self._close_step("COMPLETED")
        d = self.path(name, "metrics.jsonl").parent
        me = os.getpid()
        self._steps += 1
        atomic_write_json(d / "meta.json", {
            "command": command or name.replace("_", "-"), "name": f"{self.name}/{name}", "parent": str(self.dir),
            "step": self._steps,
            "host": socket.gethostname(), "pid": me, "pid_started": process_start(me),
            "started": _dt.datetime.now().isoformat(timespec="seconds")})
        step = Run(d, self.command, f"{self.name}/{name}", self.console, _PrefixedLogger(self.logger, name),
                   owns_console=False)
        step.set_status("RUNNING")
        self._step = step
        return step

    def _close_step(self, status: str) -> None:
        step, self._step = self._step, None
        if step is not None:
            _close_meta(step, status)
            step.set_status(status)
            step.close()

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


def write_config(run_dir: Path, config_yaml: str, overrides: Sequence[str], choices: dict | None) -> None:
    """The three files a run is restored from: the resolved config, the overrides as given, and the option chosen in
    each config group (None: not known, nothing written)."""
    atomic_write(run_dir / "config.yaml", config_yaml)
    atomic_write(run_dir / "overrides.yaml", "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n")
    if choices is not None:
        atomic_write(run_dir / CHOICES, "".join(f"{k}: {json.dumps(v)}\n" for k, v in sorted(choices.items()))
                     or "{}\n")


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


class Terminated(BaseException):
    """SIGTERM turned into an exception so the run closes as INTERRUPTED (the CLI prints one line for it)."""


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
    choices: dict | None = None,
) -> Iterator[Run]:
    """Create a run directory, yield a :class:`Run`, and close it with the right status whatever happens.
    choices: the option chosen in each config group (config.compose's), recorded for restoring the run."""
    d = new_run_dir(Path(runs_dir), command, name)
    write_config(d, config_yaml, overrides, choices)
    atomic_write_json(d / "meta.json", collect_meta(command, name))
    tee = TeeConsole(console or Console(stderr=True), d / "log")
    logger = logger if logger is not None else _null_logger()
    run = Run(d, command, name, tee, logger)
    run.set_status("RUNNING")
    tee.write_log(f"iouctl {command} -> {d}\nargv: {' '.join(sys.argv)}")

    def on_term(signum, frame):  # noqa: ARG001
        raise Terminated()

    old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    status = "FAILED"
    try:
        logger.start(d, f"{command}/{d.name}", config or {})
        yield run
        status = "COMPLETED"
    except (KeyboardInterrupt, Terminated):
        status = "INTERRUPTED"
        tee.write_log("interrupted by the user (Ctrl-C / SIGTERM)")
        raise
    except BaseException:
        tee.write_log(traceback.format_exc())
        raise
    finally:
        _finish(run, status, old_term)


def _finish(run: Run, status: str, old_term: Any) -> None:
    run._close_step(status)
    try:
        run.logger.finish(status)
    except Exception as exc:  # a mirror must not turn a finished run into a failed one
        run.console.write_log(f"logger.finish failed: {exc!r}")
    _close_meta(run, status)
    run.set_status(status)
    run.console.write_log(f"status: {status}")
    run.close()
    if old_term is not None:
        signal.signal(signal.SIGTERM, old_term)


def _close_meta(run: Run, status: str) -> None:
    """meta.json's closing fields: end time, status, duration, and which implementation each op used."""
    meta_path = run.dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(finished=_dt.datetime.now().isoformat(timespec="seconds"), status=status,
                duration_s=round(time.time() - run._t0, 3))
    ops = _op_implementations(run._ops_since)
    if ops:
        meta["ops"] = ops
    atomic_write_json(meta_path, _json_safe(meta))


def _op_sequence() -> int:
    """iouctl.ops' resolution count so far (0 before the module is loaded: it is only looked up, never imported
    here, as it imports torch)."""
    mark = getattr(sys.modules.get("iouctl.ops._extension"), "sequence", None)
    return int(mark()) if callable(mark) else 0


def _op_implementations(since: int = 0) -> dict | None:
    """{op: implementation} as iouctl.ops resolved them in this process after the mark `since` (_op_sequence);
    None when no op was loaded."""
    ext = sys.modules.get("iouctl.ops._extension")
    report = getattr(ext, "implementations", None)
    if not callable(report):
        return None
    try:
        return report(since=since)
    except Exception as exc:  # noqa: BLE001 -- a report must not turn a finished run into a failed one
        return {"error": repr(exc)}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _null_logger():
    from iouctl.loggers import NullLogger

    return NullLogger()


def read_status(run_dir: Path) -> str:
    """The status file as written (a killed process leaves RUNNING there: see :func:`run_state`)."""
    return (Path(run_dir) / "status").read_text().strip()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), None when there is no such entry."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces and ')'


def process_start(pid: int) -> str | None:
    """When process `pid` started: boot id + start time in clock ticks since boot (Linux /proc), so that a reused
    pid, or the same pid after a reboot, is not taken for the run's process. None where /proc cannot tell."""
    fields = _proc_stat(pid)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{fields[19]}" if fields is not None else None  # stat field 22


def process_alive(pid: int, started: str | None) -> bool | None:
    """Whether process `pid`, started as `process_start` recorded (None: unrecorded), runs on this host; None when
    this system cannot tell."""
    fields = _proc_stat(pid)
    if fields is not None:
        return fields[0] != "Z" and (started is None or process_start(pid) == started)  # Z: exited, not yet reaped
    if Path("/proc/self/stat").is_file():  # /proc answers, and has no such process
        return False
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def read_meta(run_dir: str | Path) -> dict:
    """A run's meta.json ({} when it cannot be read): e.g. the contract of its detector (meta["detector"])."""
    return _read_meta(Path(run_dir))


def _read_meta(run_dir: Path) -> dict:
    try:
        meta = json.loads((Path(run_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_state(run_dir: str | Path, meta: dict | None = None) -> str:
    """The run's real state: its status file, except that a RUNNING run whose process is gone (SIGKILL, out of
    memory, a reboot) is KILLED, and one started on another host, or on a system that cannot tell, is RUNNING?.
    A folder without a status file is UNKNOWN."""
    try:
        status = read_status(Path(run_dir))
    except OSError:
        return "UNKNOWN"
    if status != "RUNNING":
        return status
    meta = _read_meta(Path(run_dir)) if meta is None else meta
    pid = meta.get("pid")
    if meta.get("host") != socket.gethostname() or not isinstance(pid, int):
        return "RUNNING?"
    alive = process_alive(pid, meta.get("pid_started"))
    return "RUNNING?" if alive is None else "RUNNING" if alive else "KILLED"


def refuse_if_running(run_dir: Path) -> None:
    """One line (IouctlError) when the run's process is still alive: two processes would train the same run."""
    from iouctl.errors import IouctlError

    if run_state(run_dir) == "RUNNING":
        raise IouctlError(f"run {run_dir} is still running (pid {_read_meta(run_dir).get('pid')}); stop it before "
                          "resuming it")


def _epoch(iso: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def headline_metric(run_dir: Path) -> tuple[str, float] | None:
    """("val/AP", value) of the run's final evaluation (eval_val.json), else of the last val/AP row in metrics.jsonl
    (a run killed after an evaluation); None when the run evaluated nothing."""
    try:
        ap = json.loads((run_dir / "eval_val.json").read_text())["metrics"]["AP"]
        if isinstance(ap, (int, float)):
            return "val/AP", float(ap)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    last = None
    try:
        with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
            for line in f:  # train logs every iteration: parse only the evaluation rows
                if '"val/AP"' in line:
                    last = line
        ap = json.loads(last)["val/AP"] if last else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ("val/AP", float(ap)) if isinstance(ap, (int, float)) else None


# --- finding runs again: every command looks runs up here ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A run found under a runs folder: its `dir`, the `command` it ran, its `meta` (meta.json, {} when unreadable)
    and, for a step of a composite command (the demo's train), the `parent` run."""

    dir: Path
    command: str
    meta: dict
    parent: Path | None = None

    @property
    def state(self) -> str:
        """:func:`run_state`; a step made before steps recorded a status has its parent's."""
        state = run_state(self.dir, self.meta)
        return run_state(self.parent) if state == "UNKNOWN" and self.parent is not None else state

    def _order(self) -> tuple:
        # run folder names start with their start time; a step starts after its parent, in the order of its steps
        if self.parent is None:
            return self.dir.name, 0, 0, self.command
        step = self.meta.get("step")
        return self.parent.name, 1, step if isinstance(step, int) else 0, self.dir.name


def _is_run(d: Path) -> bool:
    return (d / "meta.json").is_file() or (d / "status").is_file()  # run folders, not whatever else is there


def _steps(parent: Path) -> Iterator[RunFolder]:
    """The step runs inside a run folder: the subfolders Run.child made (each has its metrics.jsonl)."""
    for d in sorted(parent.iterdir()):
        if d.is_dir() and (d / "metrics.jsonl").is_file():
            meta = _read_meta(d)
            yield RunFolder(d, str(meta.get("command") or d.name.replace("_", "-")), meta, parent)


def find_runs(runs_dir: str | Path, commands: Sequence[str] | None = None, state: str | None = None,
              has: str | None = None) -> list[RunFolder]:
    """The runs under `runs_dir`, newest first: every command's runs (runs/<command>/<stamp>_<name>) and the steps of
    composite runs (runs/demo/<stamp>_demo/train), a step counting as a run of the command it ran.

    commands: only the runs of these (None: all); state: only the runs in this :func:`run_state` (e.g. "COMPLETED";
    None: any); has: only the runs holding this file (a path relative to the run folder)."""
    base = Path(runs_dir).expanduser()
    found: list[RunFolder] = []
    for cdir in sorted(base.iterdir()) if base.is_dir() else []:
        if not cdir.is_dir():
            continue
        for d in sorted(cdir.iterdir()):
            if not d.is_dir() or not _is_run(d):
                continue
            found.append(RunFolder(d, cdir.name, _read_meta(d)))
            found += _steps(d)
    found = [r for r in found if (commands is None or r.command in commands)
             and (has is None or (r.dir / has).is_file()) and (state is None or r.state == state)]
    return sorted(found, key=RunFolder._order, reverse=True)


def list_runs(runs_dir: str | Path, commands: Sequence[str] | None = None, limit: int | None = None) -> list[dict]:
    """The runs under `runs_dir` (of `commands`, default every command; steps of composite runs included, see
    :func:`find_runs`), newest first, at most `limit`. Each:
    {"dir", "command", "name", "state" (:func:`run_state`), "started" (ISO time), "duration_s" (to its end; to its
    last write when killed; to now while running), "metric" ((name, value) or None), "resumed_from", "resumed_by"
    (the runs that continued it)}."""
    runs = find_runs(runs_dir, commands)
    resumed_by: dict[str, list[str]] = {}
    for r in runs:
        if r.meta.get("resumed_from"):
            resumed_by.setdefault(str(Path(r.meta["resumed_from"]).resolve()), []).append(str(r.dir))
    out = []
    for r in runs[:limit]:
        d, meta = r.dir, r.meta
        state = r.state
        started = _epoch(meta.get("started"))
        duration = meta.get("duration_s")
        if duration is None and started is not None:
            if state.startswith("RUNNING"):
                duration = time.time() - started
            elif state == "KILLED":
                ends = [p.stat().st_mtime for p in (d / "log", d / "metrics.jsonl", d / "status") if p.is_file()]
                duration = max(ends) - started if ends else None
        out.append({"dir": d, "command": r.command, "name": meta.get("name", ""),
                    "state": state, "started": meta.get("started"), "duration_s": duration,
                    "metric": headline_metric(d), "resumed_from": meta.get("resumed_from"),
                    "resumed_by": resumed_by.get(str(d.resolve()), [])})
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def runs_table(runs: Sequence[dict]) -> Any:
    """A rich Table of :func:`list_runs` records (user text shown literally, never as markup)."""
    from rich.table import Table
    from rich.text import Text

    styles = {"COMPLETED": "green", "FAILED": "red", "KILLED": "red", "INTERRUPTED": "yellow", "RUNNING": "cyan"}
    table = Table(show_edge=False, pad_edge=False)
    for col in ("run", "command", "name", "state", "started", "duration", "AP"):
        table.add_column(col, justify="right" if col in ("duration", "AP") else "left",
                         overflow="fold" if col == "run" else "ellipsis")
    for r in runs:
        state = r["state"] + "".join(f", resumed in {Path(x).name}" for x in r["resumed_by"])
        metric = "-" if r["metric"] is None or r["metric"][1] < 0 else f"{100 * r['metric'][1]:.1f}"  # -1: no GT
        table.add_row(Text(str(r["dir"])), Text(str(r["command"])), Text(str(r["name"])),
                      Text(state, style=styles.get(r["state"], "")), Text(str(r["started"] or "-").replace("T", " ")),
                      _duration(r["duration_s"]), metric)
    return table


def config_differences(wanted: dict, recorded: dict, keys: Sequence[str], ignore: Sequence[str] = ()) -> list[str]:
    """The dotted keys under `keys` where a run's recorded config differs from `wanted`; `ignore`d keys (and those
    under them) are not compared, and `auto` in `wanted` matches the value the run derived from it."""
    from iouctl.config import leaves

    want = {k: v for key in keys for k, v in leaves(wanted.get(key), key).items()}
    have = {k: v for key in keys for k, v in leaves(recorded.get(key), key).items()}
    absent = object()
    out = []
    for k in sorted(set(want) | set(have)):
        if any(k == i or k.startswith(i + ".") for i in ignore):
            continue
        w, h = want.get(k, absent), have.get(k, absent)
        if w != h and not (w == "auto" and h is not absent):
            out.append(k)
    return out


def find_resume_run(runs_dir: str | Path, command: str, relpath: str, wanted: dict, keys: Sequence[str],
                    ignore: Sequence[str] = ()) -> Path:
    """The newest run of `command` holding `relpath` whose config.yaml matches `wanted` at `keys`
    (:func:`config_differences`). One line (IouctlError) naming the nearest candidates and what differs when none
    matches, or when the match is still running."""
    import yaml

    from iouctl.errors import IouctlError

    found = [r.dir for r in find_runs(runs_dir, [command], has=relpath)]
    if not found:
        raise IouctlError(f"resume=true: no {command} run under {runs_dir} has {relpath}; pass run=<dir>")
    misses = []
    for d in found:
        try:
            recorded = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            misses.append((d, ["config.yaml unreadable"]))
            continue
        diff = config_differences(wanted, recorded if isinstance(recorded, dict) else {}, keys, ignore)
        if not diff:
            refuse_if_running(d)
            return d
        misses.append((d, diff))
    shown = "; ".join(f"{d} (differs in {', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})"
                      for d, diff in misses[:5])
    more = f"; and {len(misses) - 5} more" if len(misses) > 5 else ""
    raise IouctlError(f"resume=true: no {command} run under {runs_dir} has this run's {', '.join(keys)}; pass "
                      f"run=<dir> to resume one of: {shown}{more}")


def latest_run(runs_dir: str | Path, commands: Sequence[str], status: str | None = "COMPLETED",
               has: str | None = None) -> Path | None:
    """The newest run (steps of composite runs included) of any of `commands` in the state `status` (None: any),
    holding the file `has` (a path relative to the run) when given."""
    found = find_runs(runs_dir, commands, state=status, has=has)
    return found[0].dir if found else None


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


# --- what a run recorded, for the commands that continue from it ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a run recorded about its configuration: `config` (config.yaml, resolved), `overrides` (as given) and
    `choices` (the option chosen in each config group; None for a run made before they were recorded)."""

    config: dict
    overrides: list[str]
    choices: dict | None


def read_recorded(run_dir: str | Path) -> Recorded:
    """A run's :class:`Recorded` configuration; one line (IouctlError) when its config.yaml cannot be read."""
    import yaml

    from iouctl.errors import IouctlError

    d = Path(run_dir)

    def load(name: str, kind: type) -> Any:
        try:
            value = yaml.safe_load((d / name).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise IouctlError(f"{d / name}: cannot be read ({' '.join(str(e).split())[:160]})") from None
        if value is not None and not isinstance(value, kind):
            raise IouctlError(f"{d / name}: holds a {type(value).__name__}, not a {kind.__name__}")
        return value

    config = load("config.yaml", dict) or {}
    overrides = [str(o) for o in load("overrides.yaml", list) or []] if (d / "overrides.yaml").is_file() else []
    choices = load(CHOICES, dict) if (d / CHOICES).is_file() else None
    return Recorded(config, overrides, {str(k): v for k, v in (choices or {}).items()} if choices is not None else None)


def write_source(run: Run, checkpoint: str | Path) -> None:
    """Record in `run` the checkpoint whose weights it used (source.json; :func:`read_source` reads it)."""
    run.write_json(SOURCE, {"checkpoint": str(checkpoint)})


def read_source(run_dir: str | Path) -> Path | None:
    """The checkpoint a run's source.json names; None when the run has none; one line (IouctlError) when the file
    cannot be read as one."""
    from iouctl.errors import IouctlError

    path = Path(run_dir) / SOURCE
    if not path.is_file():
        return None
    try:
        checkpoint = json.loads(path.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IouctlError(f"{path}: cannot be read as {{\"checkpoint\": <file>}} ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, str) or not checkpoint:
        raise IouctlError(f"{path}: 'checkpoint' is {checkpoint!r}, not a file name")
    return Path(checkpoint)


@dataclasses.dataclass(frozen=True)
class Source:
    """A trained model reached through a run: the train or eval `run` given or found, the `train_run` whose weights
    it holds or used, that run's `checkpoint`, and `run`'s cached raw detections of the split (None: it has none)."""

    run: Path
    train_run: Path
    checkpoint: Path
    detections: Path | None


def train_run_of(run_dir: str | Path, checkpoint: str) -> Path:
    """The train run behind a train run (it holds `checkpoint`, a path relative to the run) or an eval run (its
    source.json names such a checkpoint). One line (IouctlError) when there is none."""
    from iouctl.errors import IouctlError

    run_dir = Path(run_dir)
    if (run_dir / checkpoint).is_file():
        return run_dir
    ckpt = read_source(run_dir)
    if ckpt is None:
        raise IouctlError(f"run={run_dir} is neither a train run (no {checkpoint}) nor an eval run of one")
    if not ckpt.is_file():
        raise IouctlError(f"run={run_dir}: its checkpoint {ckpt} no longer exists")
    depth = len(Path(checkpoint).parts)
    train = ckpt.parents[depth - 1] if len(ckpt.parts) > depth else None
    if train is None or train / checkpoint != ckpt or not (train / "config.yaml").is_file():
        raise IouctlError(f"run={run_dir} evaluated {ckpt}, which is not inside a train run (no config.yaml to "
                          f"rebuild its model from); pass run=<the train run>")
    return train


def find_model_run(run: str | None, runs_dir: str | Path, checkpoint: str, split: str,
                   usable: Callable[[dict, dict], bool] = lambda config, meta: True, wanted: str = "",
                   hint: str = "pass run=<dir>") -> Source:
    """The :class:`Source` of `run` (a train or eval run folder) or, with run=None, of the newest completed train or
    eval run (steps of composite runs included) whose config.yaml and meta.json `usable(config, meta)` accepts and
    whose train run is there.
    `wanted` and `hint` complete the one line (IouctlError) said when there is none: "no completed train/eval run
    {wanted} under {runs_dir}; {hint}"."""
    import yaml

    from iouctl.errors import IouctlError

    def source(d: Path, train: Path) -> Source:
        dets = d / detections_file(split)
        return Source(d, train, train / checkpoint, dets if dets.is_file() else None)

    if run is not None:
        run_dir = Path(run).expanduser()
        if not (run_dir / "config.yaml").is_file():
            raise IouctlError(f"run={run}: no such run folder (a train or eval run directory)")
        return source(run_dir, train_run_of(run_dir, checkpoint))
    for r in find_runs(runs_dir, ["train", "eval"], state="COMPLETED", has="config.yaml"):
        try:
            config = yaml.safe_load((r.dir / "config.yaml").read_text())
            if isinstance(config, dict) and usable(config, r.meta):
                return source(r.dir, train_run_of(r.dir, checkpoint))
        except (OSError, yaml.YAMLError, IouctlError):
            continue  # an unreadable run, or an eval run whose train run is gone: the next one
    raise IouctlError(f"no completed train/eval run{' ' + wanted if wanted else ''} under {runs_dir}; {hint}")
