"""Shared glue for the Hydra entry points: one-line errors instead of tracebacks for bad input."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from her2lab.errors import Her2labError

log = logging.getLogger("her2lab")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`Her2labError` into ``error: <message>`` on stderr and exit status 1.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Her2labError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper
