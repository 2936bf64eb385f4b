"""Errors with one-line messages that name the file, the value and the fix.

:func:`one_line_errors` turns them into ``error: <message>`` for every command-line entry point;
it lives here, at the bottom, so that any layer's entry point can use it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class Her2labError(Exception):
    """Base class: the message is one line a user can act on."""


class SlideError(Her2labError):
    """A slide cannot be opened or used (missing, unreadable, no mpp, no tissue)."""


class ManifestError(Her2labError):
    """The cohort manifest is malformed."""


class StaleCacheError(Her2labError):
    """A cached file was made with other parameters than the ones asked for."""


class OutputError(Her2labError):
    """An output location cannot be written."""


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
    # Hydra is imported only here: the error classes above stay importable without it.
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
