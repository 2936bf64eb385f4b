"""Shared glue for the Hydra entry points: one-line errors instead of tracebacks for bad input."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from her2lab.errors import Her2labError

log = logging.getLogger("her2lab")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`Her2labError` into ``error: <message>`` on stderr and exit status 1.

    Also when the error was raised inside a constructor that Hydra's ``instantiate`` wrapped.
    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            cause = her2lab_cause(exc)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            if _in_multirun():
                raise cause from None  # Hydra marks this job failed and runs the others
            sys.exit(1)

    return wrapper


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def her2lab_cause(exc: BaseException) -> Her2labError | None:
    """The :class:`Her2labError` behind ``exc`` (itself, or its cause chain), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Her2labError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
