"""What every command shares: error handling at the CLI edge, config composition, the run directory.

Imports stay light (no torch, torchvision, wandb): `iouctl --help` must be instant.
"""
from __future__ import annotations

import errno
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

import typer
from typer.core import TyperGroup

try:  # the click that typer runs on: vendored as typer._click by recent typer, click itself before
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors
from rich.console import Console
from rich.markup import escape

from iouctl.engine import experiment as engine_experiment
from iouctl.engine.compose import compose
from iouctl.errors import IouctlError

# Piped or captured output gets 120 columns rather than rich's 80, so result tables stay readable in logs.
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)

Overrides = typer.Argument(
    None, metavar="[OVERRIDES]...",
    help="Hydra overrides: key=value, group=option, +new_key=value (e.g. model=iou_retina optim.lr=0.02).",
    show_default=False,
)
PrintCfg = typer.Option(False, "--cfg", help="Print the composed config and exit.")


def fail(message: str, code: int = 2) -> None:
    """Print `message` (user text, printed literally: no rich markup) as one error line and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
    """The root command: usage errors (an unknown option, a bad choice, a value out of range) print one line, like
    every other user error, instead of click's usage block in a box. Help output is unchanged."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # an Exit's code, or the command's None
        except click_errors.NoArgsIsHelpError:  # the help is printed already
            sys.exit(2)
        except click_errors.ClickException as e:
            sys.exit(_print_usage_error(e))
        except click_errors.Abort:
            err_console.print("[bold red]error:[/] aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _print_usage_error(e: Any) -> int:
    msg = e.format_message().strip().replace("Value error, ", "").rstrip(".")
    msg = " ".join(msg.split())
    msg = msg[:1].lower() + msg[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        msg += f"; see '{ctx.command_path} --help'"
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    return e.exit_code


# OSErrors that are about the user's files or folders (permissions, a full disk, a path that is not what it must be):
# one line naming the path, like any other user error.
_USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                          errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ELOOP, errno.ENOTEMPTY})


def _user_message(exc: BaseException) -> Optional[str]:
    """The one line for an exception that is the user's to fix, None for a bug."""
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {exc.filename or exc}"
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, (IouctlError, FileExistsError)):  # every layer's user errors derive from IouctlError
        return _worker_message(str(exc))
    return None


def _worker_message(text: str) -> str:
    """A DataLoader worker re-raises its error in the main process with the worker's traceback as the message
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): keep the error's own line."""
    if "\nOriginal Traceback (most recent call last):" not in text:
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


@contextmanager
def user_errors(run_dir: Any = None) -> Iterator[None]:
    """One line on stderr and a non-zero exit for user errors; the traceback goes to the run's log, not the screen."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        where = f"; run marked INTERRUPTED: {run_dir()}" if run_dir and run_dir() else ""
        fail(f"interrupted{where}", 130)
    except Exception as exc:
        msg = _user_message(exc)
        if msg is not None:
            fail(msg, getattr(exc, "exit_code", 2))
        # A bug: its traceback is in the run's log. Before a run folder exists there is nowhere else to keep it, so
        # it goes to the terminal (as pip and Python itself do), exit code 1.
        where = f" (traceback in {run_dir()}/log)" if run_dir and run_dir() else ""
        if where:
            fail(f"{type(exc).__name__}: {' '.join(str(exc).split())}{where}", 1)
        raise
    except BaseException as exc:
        from iouctl.runs import Terminated

        if isinstance(exc, Terminated):  # SIGTERM: the run is closed as INTERRUPTED; 128 + 15 as a shell reports it
            where = f"; run marked INTERRUPTED: {run_dir()}" if run_dir and run_dir() else ""
            fail(f"terminated (SIGTERM){where}", 143)
        raise


def print_config(cfg: Any) -> None:
    from iouctl import config

    try:
        text = config.to_yaml(cfg, resolve=True)
    except Exception:  # e.g. a ??? value still to be given: show it unresolved
        text = config.to_yaml(cfg, resolve=False)
    typer.echo(text, nl=False)


def run_experiment(command: str, overrides: Optional[List[str]], print_cfg: bool,
                   body: Callable[[Any, Any], Any], extra_overrides: Optional[List[str]] = None) -> Any:
    """Compose `command`'s config, open its run directory, call `body(cfg, run)` (one engine function); errors
    become one line."""
    overrides = list(extra_overrides or []) + list(overrides or [])
    current: dict[str, Any] = {}
    with user_errors(lambda: current.get("dir")):
        choices: dict = {}
        cfg = compose(command, overrides, allow_missing=print_cfg, choices=choices)
        if print_cfg:
            print_config(cfg)
            return None
        from iouctl.engine.distributed import rank

        with engine_experiment.open_command_run(command, cfg, overrides, choices, err_console) as run:
            current["dir"] = run.dir
            result = body(cfg, run)
        if rank() > 0:  # a non-zero rank's scratch run, removed
            return result
        err_console.print(f"[green]done[/]: {escape(str(run.dir))}")
        return result
