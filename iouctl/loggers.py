"""Mirrors of a run's metrics. metrics.jsonl (written by iouctl.runs) is the source of truth; these only copy it.

Config group `logger/`: `none` (no mirror) and `wandb`. A logger is started by the run with the run directory and the
resolved config, then receives every metric row, table and image the run logs.
"""
from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"
_RUN_FOLDERS = (("WANDB_CACHE_DIR", "wandb/cache"), ("WANDB_DATA_DIR", "wandb/data"))  # variable, run subfolder


class NullLogger:
    """No mirror: the console and metrics.jsonl only."""

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class WandbLogger:
    """Mirror to Weights & Biases, never blocking on the network.

    mode: "auto" goes online only when credentials exist and the server answers within ~1.5 s, else offline
    (sync later with `wandb sync <run>/wandb/offline-run-*`); "online" tries for `init_timeout` seconds then falls back
    to offline; "offline" and "disabled" are wandb's own.
    """

    def __init__(
        self,
        project: str = "iouctl",
        entity: str | None = None,
        mode: str = "auto",
        tags: Sequence[str] = (),
        group: str | None = None,
        init_timeout: float = 20.0,
    ) -> None:
        valid = ("auto", "online", "offline", "disabled")
        if mode not in valid:
            from iouctl.errors import ConfigError

            raise ConfigError(f"logger.mode={mode!r} is not valid; choose one of {', '.join(valid)}")
        self.project, self.entity, self.mode = project, entity, mode
        self.tags, self.group, self.init_timeout = list(tags), group, float(init_timeout)
        self._run = None
        self.resolved_mode: str | None = None
        self._step: int | None = None  # the wandb step of the pending row, its keys, and whether it has metrics
        self._pending: set[str] = set()
        self._pending_row = False
        self._held: dict[str, Any] = {}  # plots and tables waiting for the next row
        self._saved_env: dict[str, str | None] | None = None  # WANDB_* as they were before start()

    def _resolve_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
            return os.environ["WANDB_MODE"]
        return "online" if _has_wandb_credentials() and _reachable(WANDB_HOST) else "offline"

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        import wandb

        run_dir = Path(run_dir)
        # wandb's cache and staging folders live inside the run directory, never in $HOME; wandb reads them from the
        # environment only, so they are set for the run and restored by finish() (or now, if the start fails)
        self._saved_env = {var: os.environ.get(var) for var, _ in _RUN_FOLDERS}
        try:
            for var, sub in _RUN_FOLDERS:
                (run_dir / sub).mkdir(parents=True, exist_ok=True)
                os.environ[var] = str(run_dir / sub)
            self._init(wandb, run_dir, name, config)
        except BaseException:
            self._restore_env()
            raise

    def _restore_env(self) -> None:
        saved, self._saved_env = self._saved_env, None
        for var, value in (saved or {}).items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value

    def _init(self, wandb: Any, run_dir: Path, name: str, config: dict) -> None:
        mode = self._resolve_mode()
        settings = wandb.Settings(
            silent=True, init_timeout=self.init_timeout, x_disable_stats=True, console="off"
        )
        kwargs = dict(
            project=self.project, entity=self.entity, name=name, dir=str(run_dir), config=config,
            tags=self.tags or None, group=self.group, settings=settings,
        )
        try:
            self._run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # network or auth trouble: keep the run going offline
            if mode != "online":
                raise
            log.warning("wandb online init failed (%s); logging offline instead", exc)
            mode = "offline"
            self._run = wandb.init(mode=mode, **kwargs)
        self.resolved_mode = mode
        self._step, self._pending, self._pending_row, self._held = None, set(), False, {}

    # wandb keeps one pending history row per step and drops any row whose step is below the current one; a row
    # logged without a step commits the pending row and moves on. So every call here names its step explicitly and
    # never commits: the row is written when a later step arrives or at finish, and nothing can land behind it.
    # Plots and tables are held until the next row and logged at its step: iouctl logs a plot just before the row of
    # numbers it belongs to (evaluation, refinement).
    def _step_for(self, keys: set[str], step: int | None, row: bool) -> int:
        """The wandb step for `keys`: the row's own step when it is ahead, else the pending step when nothing there
        would be overwritten, else the next step (a row without a step is a row of its own, as in wandb's default)."""
        if self._step is None:
            target = 0 if step is None else int(step)
        elif step is not None and int(step) > self._step:
            target = int(step)
        elif keys & self._pending or (step is None and row and self._pending_row):
            target = self._step + 1
        else:
            target = self._step
        if target != self._step:
            self._step, self._pending, self._pending_row = target, set(), False
        self._pending |= keys
        self._pending_row |= row
        return target

    def _send(self, data: dict[str, Any], step: int | None, row: bool) -> None:
        self._run.log(data, step=self._step_for(set(data), step, row), commit=False)

    def _release(self) -> None:
        """Log the held plots and tables on their own, at the pending step unless that would overwrite a key."""
        if self._held:
            self._send(self._held, None, row=False)
            self._held = {}

    def _hold(self, media: dict[str, Any]) -> None:
        if media.keys() & self._held.keys():  # a second plot of the same name: the first goes out alone
            self._release()
        self._held.update(media)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            # 0-d tensors and numpy scalars as Python numbers, as metrics.jsonl has them (NaN stays NaN here)
            row = {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v for k, v in metrics.items()}
            if row.keys() & self._held.keys():
                self._release()
            data, self._held = {**self._held, **row}, {}
            self._send(data, step, row=True)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self._run is not None:
            import wandb

            self._hold({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_image(self, name: str, path: Path) -> None:
        if self._run is not None:
            import wandb

            self._hold({name: wandb.Image(str(path))})

    def finish(self, status: str) -> None:
        try:
            if self._run is not None:
                self._release()
                self._run.finish(exit_code=0 if status == "COMPLETED" else 1)
                self._run = None
        finally:
            self._restore_env()
