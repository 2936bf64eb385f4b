"""The prepare task: tissue masks, tile grids, thumbnails and QC pictures for the configured cohort.

What it writes is described in :mod:`her2lab.slides.prepare`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from her2lab.data.cohort_config import resolve_cohort
from her2lab.errors import Her2labError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort


def run_prepare(cfg: DictConfig) -> pd.DataFrame:
    """Prepare the configured cohort; returns the per-slide report."""
    manifest = resolve_cohort(cfg.cohort, num_workers=cfg.num_workers)
    return prepare_cohort(manifest, PrepareSettings.from_config(cfg), num_workers=cfg.num_workers)


def prepare_task(cfg: DictConfig) -> None:
    """The prepare command: :func:`run_prepare`, an error when every slide failed."""
    report = run_prepare(cfg)
    if (report["status"] == "failed").all():
        raise Her2labError(f"every slide failed; see {Path(cfg.cohort.cache_dir) / 'failures.csv'}")
