"""``python eval.py run_dir=<run or sweep> [split=test|val] [cohort=<new cohort> | slides=<folder>] [ckpt_path=…]``:
test a trained model, or score new slides with it (a sweep's finished fold models as an ensemble)."""

import hydra
from omegaconf import DictConfig, OmegaConf

from her2lab.errors import one_line_errors
from her2lab.eval.run_folder import eval_dir
from her2lab.run.predict import score

OmegaConf.register_new_resolver("her2lab.eval_dir", eval_dir, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return score(cfg)


if __name__ == "__main__":
    main()
