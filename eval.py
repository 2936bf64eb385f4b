"""``python eval.py run_dir=<run> [split=test] [ckpt_path=…]``: re-test a trained model."""

import hydra
from omegaconf import DictConfig

from her2lab.run.entry import one_line_errors
from her2lab.run.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg)


if __name__ == "__main__":
    main()
