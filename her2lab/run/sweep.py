"""What a sweep did, in one table: ``sweep_summary.csv`` in the sweep folder.

A Hydra callback (``hydra.callbacks.sweep_summary``) that reads the job folders when the
multirun ends, whatever launcher ran them (in-process, submitit, SLURM): a job with
``metrics.json`` is ``done``, one with ``failed.txt`` is ``failed`` (with its one-line error),
anything else ``unfinished`` (the table is :func:`her2lab.eval.jobs.summarize_sweep`). Failed
jobs are listed in the log; they do not stop the other jobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from her2lab.eval.cv import cv_summary
from her2lab.eval.jobs import summarize_sweep
from her2lab.io import atomic_path

__all__ = ["SweepSummary", "summarize_sweep", "write_summary"]

log = logging.getLogger(__name__)


def write_summary(sweep_dir: Path) -> pd.DataFrame:
    """Write ``sweep_summary.csv`` (see :func:`her2lab.eval.jobs.summarize_sweep`) when there are jobs."""
    table = summarize_sweep(sweep_dir)
    if not table.empty:
        with atomic_path(sweep_dir / "sweep_summary.csv") as tmp:
            table.to_csv(tmp, index=False)
    return table


class SweepSummary(Callback):
    """Rewrites the summary after every job (so it exists even when a failed job makes Hydra
    stop before ``on_multirun_end``) and once more, with a log line per failure, at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        write_summary(Path(config.hydra.runtime.output_dir).parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = write_summary(sweep_dir)
        if table.empty:
            return
        counts = table.status.value_counts().to_dict()
        log.info("sweep: %d done, %d failed, %d unfinished → %s", counts.get("done", 0), counts.get("failed", 0),
                 counts.get("unfinished", 0), sweep_dir / "sweep_summary.csv")
        for r in table[table.status == "failed"].itertuples():
            log.error("job %s (%s) failed: %s", r.job, r.overrides, r.error)
        if (table.status == "done").any() and table.overrides.str.contains(r"(?:^|\s)fold=").any():
            try:
                cv_summary(sweep_dir)
                log.info("cross-validation summary → %s", sweep_dir / "cv_summary.md")
            except Exception as exc:  # a summary problem must not turn a finished sweep into a failure
                log.error("cross-validation summary failed: %s", exc)
