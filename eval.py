"""``python eval.py run_dir=<run or sweep> [split=test|val] [cohort=<new cohort> | slides=<folder>] [ckpt_path=…]``:
test a trained model, or score new slides with it (a sweep's finished fold models as an ensemble).

The same as ``her2lab eval …`` (see :mod:`her2lab.cli`).
"""

from her2lab.cli import run_task

if __name__ == "__main__":
    run_task("eval")
