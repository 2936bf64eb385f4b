"""``python -m her2lab.extract cohort=demo backbone=hne``: embed every tile with a frozen encoder."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from her2lab import CONF_DIR
from her2lab.errors import one_line_errors
from her2lab.run.extract import run_extract


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="extract")
@one_line_errors
def main(cfg: DictConfig) -> None:
    run_extract(cfg)


if __name__ == "__main__":
    main()
