"""What every command shares: error handling at the CLI edge, config composition, the run directory.

Imports stay light (no torch, torchvision, wandb): `iouctl --help` must be instant.
"""
from __future__ import annotations

import errno
import re
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, List, Optional

import typer
from typer.core import TyperGroup

try:  # the click that typer runs on: vendored as typer._click by recent typer, click itself before
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors
from rich.console import Console
from rich.markup import escape

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


def compose(command: str, overrides: Optional[List[str]], allow_missing: bool = False,
            choices: Optional[dict] = None) -> Any:
    """The command's config; values the schema cannot type (model sizes: a number, a list or `auto`) are checked
    here too, so that a bad one is refused before a run directory or the data is touched. choices: filled with the
    option chosen in each config group (config.compose), which the run records."""
    from iouctl import config

    _check_override_keys(overrides or [])
    cfg = config.compose(command, overrides or [], allow_missing=allow_missing, choices=choices)
    inference = _model_inference(cfg, overrides or [])
    if inference:
        cfg = config.compose(command, [*inference, *(overrides or [])], allow_missing=allow_missing, choices=choices)
    if not allow_missing and "model" in cfg:
        from iouctl.engine.sizes import check_model_sizes

        check_model_sizes(cfg.model)
    if not allow_missing and "grid" in cfg:
        config.grid_arms(cfg)  # a bad arm is refused before a run directory is made
    return cfg


def _model_inference(cfg: Any, overrides: List[str]) -> List[str]:
    """The model's own post-processing (nms overrides such as [nms=greedy, nms.score=fused]) for a command that
    composes a model and an NMS, unless the user chose the NMS (nms=...): applied before the user's overrides, so
    nms.iou_threshold=0.6 still refines it."""
    if "model" not in cfg or "nms" not in cfg or any(o.split("=", 1)[0].lstrip("+~") == "nms" for o in overrides):
        return []
    return own_inference(cfg.model)


def own_inference(model_cfg: Any) -> List[str]:
    """`model.inference` when given, else (null) the paper's of its quality head (iouctl.models.contract): a RetinaNet
    with model.quality=qfl ranks by cls, with model.quality=iou by the fused score."""
    from omegaconf import OmegaConf

    if "inference" not in model_cfg or OmegaConf.is_missing(model_cfg, "inference"):
        return []
    if model_cfg.inference is None:
        if "quality" not in model_cfg:
            return []
        from iouctl.models.contract import QUALITY_HEADS

        return list(QUALITY_HEADS[model_cfg.quality].inference)
    from iouctl.errors import ConfigError

    inference = [str(o) for o in model_cfg.inference]
    bad = [o for o in inference if not o.startswith(("nms=", "nms."))]
    if bad:
        raise ConfigError(f"model.inference holds {bad[0]!r}; valid: nms overrides only, e.g. "
                          f"[nms=greedy, nms.score=fused] (options: {', '.join(_group_options('nms'))})")
    return inference


def _group_options(group: str) -> List[str]:
    from iouctl.config import group_options

    return group_options(group)


def inference_note(cfg: Any, overrides: List[str]) -> Optional[str]:
    """For a command that evaluates a model: which post-processing it uses and why (printed at the start)."""
    if "model" not in cfg or "nms" not in cfg or "inference" not in cfg.model:
        return None
    own = " ".join(own_inference(cfg.model))
    if _model_inference(cfg, overrides):
        return f"inference: {own} (the model's own: model.inference)"
    given = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] == "nms")
    return f"inference: {given} (given; the model's own: {own})"


def _check_override_keys(overrides: List[str]) -> None:
    """Keys Hydra cannot take: none at all (`=5`), or one too long for a file name (Hydra looks keys up as files)."""
    from iouctl.errors import ConfigError

    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~") if "=" in o else None
        if key == "":
            raise ConfigError(f"override {o!r} has no key: use key=value, group=option, +new_key=value or ~key")
        if key is not None and len(key) > 200:
            raise ConfigError(f"unknown config key {key[:40] + '...'!r} ({len(key)} characters)")


# A run folder is <YYYY-mm-dd_HH-MM-SS>_<name>[-N]; most file systems allow 255 bytes per name.
MAX_NAME_BYTES = 255 - len("2000-01-01_00-00-00_") - len("-999")


def check_run_name(name: str) -> None:
    from iouctl.errors import ConfigError

    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ConfigError(f"name={name[:40]}... is {len(name.encode('utf-8'))} bytes; it names the run folder, "
                          f"which allows at most {MAX_NAME_BYTES}")


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
        choices: dict = {}
        cfg = compose(command, overrides, allow_missing=print_cfg, choices=choices)
        if print_cfg:
            print_config(cfg)
            return None
        from iouctl import config
        from iouctl.engine.distributed import rank
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
                run = stack.enter_context(open_run(command, str(cfg.name), runs_dir, config.to_yaml(cfg), overrides,
                                                   config=config.to_dict(cfg), logger=logger, console=err_console,
                                                   choices=choices))
            except OSError as e:  # a runs folder that is a file, read-only, full ...
                raise IouctlError(f"cannot create a run folder in paths.runs_dir={runs_dir}: {e.strerror}"
                                  + (f" ({e.filename})" if e.filename else "")) from None
            current["dir"] = run.dir
            run.console.print(f"[bold]iouctl {command}[/] -> {escape(str(run.dir))}")
            note = inference_note(cfg, overrides)
            if note:
                run.console.print(escape(note))
            result = body(cfg, run)
        if runs_dir != str(cfg.paths.runs_dir):  # a non-zero rank's scratch run
            import shutil

            shutil.rmtree(runs_dir, ignore_errors=True)
            return result
        err_console.print(f"[green]done[/]: {escape(str(run.dir))}")
        return result
