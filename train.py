"""``python train.py [experiment=…] [overrides]``: train one model; ``-m`` for sweeps."""

import hydra
from omegaconf import DictConfig

from her2lab.errors import one_line_errors
from her2lab.run.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
