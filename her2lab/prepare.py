"""``python -m her2lab.prepare cohort=demo``: tissue masks, tile grids, thumbnails and QC for a cohort."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from her2lab import CONF_DIR
from her2lab.errors import one_line_errors
from her2lab.run.prepare import run_prepare

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prepare")
@one_line_errors
def main(cfg: DictConfig) -> None:
    report = run_prepare(cfg)
    if (report["status"] == "failed").all():
        raise SystemExit(
            f"error: every slide failed; see {Path(cfg.cohort.cache_dir) / 'failures.csv'}"
        )


if __name__ == "__main__":
    main()
