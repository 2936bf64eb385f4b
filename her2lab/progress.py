"""Progress of long loops: a rich bar on a terminal, periodic log lines otherwise.

Attached to a terminal, :func:`progress_bar` draws a rich bar (count, rate, ETA). In a batch job
(SLURM, ``nohup``, output piped to a file) a bar would only fill the log with control characters,
so progress becomes a log line every ``HER2LAB_PROGRESS_INTERVAL`` seconds (30 by default) with
the stage, done/total, rate, elapsed time and ETA. Both ways, the loop's end is logged as one line
(done/total, total time, mean rate), so the run folder's log file says how long every stage took.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Environment variable: seconds between progress lines when not on a terminal (0: final line only).
INTERVAL_ENV = "HER2LAB_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """True when both stdout and stderr are terminals (an interactive shell, not a batch job)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def progress_interval(default: float = DEFAULT_INTERVAL) -> float:
    """Seconds between progress log lines: ``HER2LAB_PROGRESS_INTERVAL``, else ``default``."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of seconds: using %g", INTERVAL_ENV, raw, default)
        return default
    return value if math.isfinite(value) and value >= 0 else default


@contextlib.contextmanager
def progress_bar(
    description: str,
    total: int,
    unit: str | None = None,
    disable: bool | None = None,
    interval: float | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``advance(n=1, **fields)``; shows count, rate and ETA.

    ``unit`` names what is counted (e.g. ``"patches"`` → ``123 patches/s``); on a terminal it
    adds a column with the ``rate`` field passed to ``advance``. ``disable=None`` picks the bar on
    a terminal and log lines otherwise (:func:`on_terminal`); ``True`` shows nothing at all,
    ``False`` forces the bar. ``interval`` (seconds between log lines) defaults to
    :func:`progress_interval`; ``logger`` defaults to this module's.
    """
    if disable:
        yield lambda n=1, **fields: None
        return
    logger = logger or log
    clock = _Clock(description, total, unit)
    if disable is None and not on_terminal():
        every = progress_interval() if interval is None else interval
        last = time.monotonic()

        def advance(n: int = 1, **fields: object) -> None:
            nonlocal last
            clock.done += n
            now = time.monotonic()
            if every > 0 and now - last >= every and clock.done < total:
                last = now
                logger.info("%s", clock.line(now))

        try:
            yield advance
        finally:
            logger.info("%s", clock.summary(time.monotonic()))
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if unit:
        columns.append(TextColumn("{task.fields[rate]}"))
    try:
        with Progress(*columns, transient=False) as prog:
            task = prog.add_task(description, total=total, rate="")

            def advance(n: int = 1, **fields: object) -> None:
                clock.done += n
                prog.update(task, advance=n, **fields)

            yield advance
    finally:  # into the run folder's log file too (the bar is on the terminal only)
        logger.info("%s", clock.summary(time.monotonic()))


class _Clock:
    """Counts a loop's items; its progress and end as text."""

    def __init__(self, description: str, total: int, unit: str | None) -> None:
        self.description, self.total, self.unit = description, int(total), unit or "items"
        self.done, self.start = 0, time.monotonic()

    def _rate(self, elapsed: float) -> str:
        return f"{self.done / elapsed if elapsed > 0 else 0.0:.3g} {self.unit}/s"

    def line(self, now: float) -> str:
        elapsed = now - self.start
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total > 0 else ""
        eta = "?"
        if 0 < self.done < self.total and elapsed > 0:
            eta = _hms(elapsed / self.done * (self.total - self.done))
        return (
            f"{self.description}: {self.done}/{self.total}{pct}, {self._rate(elapsed)}, "
            f"elapsed {_hms(elapsed)}, ETA {eta}"
        )

    def summary(self, now: float) -> str:
        elapsed = now - self.start
        verb = "done" if self.done >= self.total else "stopped at"
        took = f"{_hms(elapsed)} ({self._rate(elapsed)})"
        return f"{self.description}: {verb} {self.done}/{self.total} in {took}"


def _hms(seconds: float) -> str:
    """``0:02:05`` (hours:minutes:seconds), ``0:00:01.4`` under ten seconds."""
    if seconds < 10:
        return f"0:00:{seconds:04.1f}"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
