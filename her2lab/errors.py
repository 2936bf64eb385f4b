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

    Also when the error was raised inside a constructor that Hydra's ``instantiate`` wrapped, and
    for a mandatory config value left out (``???``), which becomes ``error: cohort.manifest is
    required …``. Anything else is a bug and keeps its traceback. A single run that fails
    before writing anything leaves no run folder behind (see :func:`drop_empty_run_dir`).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            cause = her2lab_cause(exc) or _missing_value(exc)
            if not _in_multirun():
                drop_empty_run_dir()
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            if _in_multirun():
                raise cause from None  # Hydra marks this job failed and runs the others
            sys.exit(1)

    return wrapper


def _missing_value(exc: BaseException) -> Her2labError | None:
    """A config value marked ``???`` that the command needs, as a one-line error."""
    from omegaconf.errors import MissingMandatoryValue

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MissingMandatoryValue):
            key = getattr(exc, "full_key", None) or "a config value"
            return Her2labError(f"{key} is required: add {key}=<value> to the command")
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def drop_empty_run_dir() -> None:
    """Remove this Hydra run's folder when it holds nothing but Hydra's own files (``.hydra/``
    and the log), and the folders above it that this leaves empty (up to the launch folder)."""
    import os
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    if not out.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in out.iterdir()):
        return
    if any(p.is_dir() for p in out.iterdir() if p.name != ".hydra"):
        return
    shutil.rmtree(out, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = out.resolve().parent
    for _ in range(3):  # e.g. logs/prepare/runs, logs/prepare, logs
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        os.rmdir(parent)
        parent = parent.parent


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
