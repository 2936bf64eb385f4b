"""Progress in a batch job: periodic log lines with done/total, rate, elapsed and ETA."""

from __future__ import annotations

import logging
import re
import time

import pytest

from her2lab import progress
from her2lab.progress import INTERVAL_ENV, progress_bar, progress_interval


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "her2lab.progress"]


def test_off_a_terminal_progress_is_periodic_log_lines_and_a_final_one(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="her2lab.progress"):
        with progress_bar("embedding 40 tiles", 40, unit="patches", interval=0.01) as advance:
            for _ in range(4):
                time.sleep(0.02)
                advance(10)
    lines = _lines(caplog)
    periodic, final = lines[:-1], lines[-1]
    assert len(periodic) == 3  # after 10, 20 and 30 of 40; not at the end (the final line says it)
    pattern = (
        r"embedding 40 tiles: (\d+)/40 \((\d+) %\), [\d.]+ patches/s, "
        r"elapsed 0:00:\d\d\.\d, ETA 0:00:\d\d\.\d"
    )
    for line, done in zip(periodic, (10, 20, 30), strict=True):
        m = re.fullmatch(pattern, line)
        assert m, line
        assert int(m.group(1)) == done and int(m.group(2)) == round(100 * done / 40)
    assert re.fullmatch(
        r"embedding 40 tiles: done 40/40 in 0:00:\d\d\.\d \([\d.]+ patches/s\)", final
    ), final


def test_the_interval_comes_from_the_environment(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setenv(INTERVAL_ENV, "0")  # the final line only
    with caplog.at_level(logging.INFO, logger="her2lab.progress"):
        with progress_bar("preparing 3 slides", 3) as advance:
            for _ in range(3):
                advance()
    assert (
        len(_lines(caplog)) == 1
        and "done 3/3" in _lines(caplog)[0]
        and "items/s" in _lines(caplog)[0]
    )
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert progress_interval() == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    assert progress_interval() == progress.DEFAULT_INTERVAL
    monkeypatch.delenv(INTERVAL_ENV)
    assert progress_interval() == progress.DEFAULT_INTERVAL


def test_a_loop_stopped_early_says_where(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="her2lab.progress"), pytest.raises(RuntimeError):
        with progress_bar("generating 5 slides", 5, interval=0) as advance:
            advance(2)
            raise RuntimeError("boom")
    assert _lines(caplog)[-1].startswith("generating 5 slides: stopped at 2/5 in ")


def test_disabled_progress_says_nothing(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="her2lab.progress"):
        with progress_bar("quiet", 2, disable=True, interval=0) as advance:
            advance(2)
    assert _lines(caplog) == []


def test_on_a_terminal_the_bar_is_drawn_and_the_end_is_logged(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="her2lab.progress"):
        with progress_bar("embedding 8 tiles", 8, unit="patches", interval=0) as advance:
            advance(8, rate="8 patches/s")
    assert len(_lines(caplog)) == 1 and _lines(caplog)[0].startswith(
        "embedding 8 tiles: done 8/8 in "
    )
