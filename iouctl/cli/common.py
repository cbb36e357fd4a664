"""What every command shares: error handling at the CLI edge, config composition, the run directory.

Imports stay light (no torch, torchvision, wandb): `iouctl --help` must be instant.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console

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
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


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
        if isinstance(exc, (IouctlError, FileNotFoundError, FileExistsError)):  # every layer's derive from IouctlError
            msg = f"no such file or folder: {exc.filename or exc}" if isinstance(exc, FileNotFoundError) else str(exc)
            fail(msg, getattr(exc, "exit_code", 2))
        where = f" (traceback in {run_dir()}/log)" if run_dir and run_dir() else ""
        if where:
            fail(f"{type(exc).__name__}: {exc}{where}", 1)
        raise


def compose(command: str, overrides: Optional[List[str]], allow_missing: bool = False) -> Any:
    """The command's config; values the schema cannot type (model sizes: a number, a list or `auto`) are checked
    here too, so that a bad one is refused before a run directory or the data is touched."""
    from iouctl import config

    cfg = config.compose(command, overrides or [], allow_missing=allow_missing)
    if not allow_missing and "model" in cfg:
        from iouctl.engine.sizes import check_model_sizes

        check_model_sizes(cfg.model)
    return cfg


def print_config(cfg: Any) -> None:
    from iouctl import config

    try:
        text = config.to_yaml(cfg, resolve=True)
    except Exception:  # e.g. a ??? value still to be given: show it unresolved
        text = config.to_yaml(cfg, resolve=False)
    typer.echo(text, nl=False)


def run_experiment(command: str, overrides: Optional[List[str]], print_cfg: bool,
                   body: Callable[[Any, Any], Any], extra_overrides: Optional[List[str]] = None) -> Any:
    """Compose `command`'s config, open its run directory, call `body(cfg, run)`; errors become one line."""
    overrides = list(extra_overrides or []) + list(overrides or [])
    current: dict[str, Any] = {}
    with user_errors(lambda: current.get("dir")):
        cfg = compose(command, overrides, allow_missing=print_cfg)
        if print_cfg:
            print_config(cfg)
            return None
        from iouctl import config
        from iouctl.runs import open_run

        logger = config.instantiate(cfg.logger)
        runs_dir = str(cfg.paths.runs_dir)
        if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 owns the run directory and the logger
            import tempfile

            from iouctl.loggers import NullLogger

            runs_dir, logger = tempfile.mkdtemp(prefix=f"iouctl-rank{os.environ['RANK']}-"), NullLogger()
        with open_run(command, str(cfg.name), runs_dir, config.to_yaml(cfg), overrides,
                      config=config.to_dict(cfg), logger=logger, console=err_console) as run:
            current["dir"] = run.dir
            run.console.print(f"[bold]iouctl {command}[/] -> {run.dir}")
            result = body(cfg, run)
        if runs_dir != str(cfg.paths.runs_dir):  # a non-zero rank's scratch run
            import shutil

            shutil.rmtree(runs_dir, ignore_errors=True)
            return result
        err_console.print(f"[green]done[/]: {run.dir}")
        return result
