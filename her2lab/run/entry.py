"""Shared glue for the tasks: explanation steps whose failure is logged, never fatal.

The one-line errors of the entry points are :func:`her2lab.errors.one_line_errors`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from her2lab.errors import her2lab_cause

log = logging.getLogger("her2lab")


@contextlib.contextmanager
def explanations_guard(what: str, written: Path) -> Iterator[None]:
    """Run an explanation step (heatmaps, Grad-CAM) whose failure is logged, never fatal: the
    metrics (``written``) are on disk before it starts, and the run or evaluation still succeeds.

    A :class:`Her2labError` is one warning line; anything else is logged with its traceback.
    """
    try:
        yield
    except Exception as exc:
        cause = her2lab_cause(exc)
        if cause is not None:
            log.warning("%s left out: %s (%s is written)", what, cause, written)
        else:
            log.exception("%s failed (%s is written); the rest of the run is unaffected", what, written)
