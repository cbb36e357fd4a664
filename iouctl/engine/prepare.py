"""Getting a dataset ready (generated or validated) with a progress bar: generation takes seconds the first time."""
from __future__ import annotations

from typing import Any


def prepare_dataset(data: Any, progress: Any) -> None:
    """`data.prepare()` reporting into a rich Progress (`progress` is an open one, e.g. `run.progress(transient=True)`)."""
    task = progress.add_task("preparing dataset", total=None)
    data.prepare(progress=lambda done, total: progress.update(task, completed=done, total=total))
