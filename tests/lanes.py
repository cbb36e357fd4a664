"""The fast lane (`pytest -m "not slow"`) runs a sample of each exhaustive table of cases; the full suite runs all."""
from __future__ import annotations

from collections.abc import Sequence

import pytest


def sample(cases: Sequence, every: int, ids: Sequence[str] | None = None) -> list:
    """`cases` for pytest.mark.parametrize with every `every`-th case (the first, then each `every`-th after it) in the
    fast lane and the others marked slow. A case is a tuple of argument values, or one value for a single argument."""
    out = []
    for i, case in enumerate(cases):
        values = case if isinstance(case, tuple) else (case,)
        marks = () if i % every == 0 else (pytest.mark.slow,)
        out.append(pytest.param(*values, marks=marks, id=None if ids is None else ids[i]))
    return out
