"""Progress bars for long loops (rich), quiet when not attached to a terminal."""

from __future__ import annotations

import contextlib
import sys
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


@contextlib.contextmanager
def progress_bar(
    description: str, total: int, unit: str | None = None, disable: bool | None = None
) -> Iterator[Callable[..., None]]:
    """Context manager yielding ``advance(n=1, **fields)``; shows count, rate and ETA.

    ``unit`` adds a throughput column (e.g. ``"patches"`` → ``123 patches/s``) driven by the
    ``done`` field passed to ``advance``.
    """
    if disable is None:
        disable = not sys.stderr.isatty()
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
    with Progress(*columns, disable=disable, transient=False) as prog:
        task = prog.add_task(description, total=total, rate="")

        def advance(n: int = 1, **fields: object) -> None:
            prog.update(task, advance=n, **fields)

        yield advance
