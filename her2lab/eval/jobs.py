"""The job folders of a sweep as one table: what each job ran, how it ended, its main metrics.

A job with ``metrics.json`` is ``done``, one with a newer ``failed.txt`` is ``failed`` (with its
one-line error), anything else ``unfinished``. The metric columns are ``val/auroc_best``, the
``test/<name>`` of every registered metric listed in tables (see :mod:`her2lab.metrics`) and
``test/loss``. Both the sweep callback and the cross-validation summary read sweeps through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from her2lab.metrics import list_metrics


def fold_metric_columns() -> list[str]:
    """``test/<name>`` of every metric listed in tables, in registration order."""
    return [f"test/{m}" for m in list_metrics(tables_only=True)]


def sweep_metric_columns() -> list[str]:
    """The metric columns of ``sweep_summary.csv``."""
    return ["val/auroc_best", *fold_metric_columns(), "test/loss"]


def summarize_sweep(sweep_dir: Path) -> pd.DataFrame:
    """One row per job folder: job, overrides, status, error, the main metrics and the run folder."""
    metrics = sweep_metric_columns()
    rows = []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()), key=_job_key):
        ov = job / ".hydra" / "overrides.yaml"
        overrides = " ".join(OmegaConf.to_container(OmegaConf.load(ov))) if ov.exists() else ""
        row: dict[str, Any] = {"job": job.name, "overrides": overrides, "status": "unfinished", "error": "", "run_dir": str(job)}
        done, failed = job / "metrics.json", job / "failed.txt"
        if failed.exists() and (not done.exists() or failed.stat().st_mtime >= done.stat().st_mtime):
            row.update(status="failed", error=(failed.read_text().strip().splitlines() or ["?"])[0])
        elif done.exists():
            m = json.loads(done.read_text())
            row.update(status="done", **{k: m.get(k) for k in metrics})
        rows.append(row)
    return pd.DataFrame(rows, columns=["job", "overrides", "status", "error", *metrics, "run_dir"])


def _job_key(p: Path) -> tuple[int, str]:
    # numbered job folders in numeric order (2 before 10), anything else after them
    return (int(p.name), "") if p.name.isdigit() else (1 << 30, p.name)
