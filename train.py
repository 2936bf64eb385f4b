"""``python train.py [experiment=…] [overrides]``: train one model; ``-m`` for sweeps.

The same as ``her2lab train …`` (see :mod:`her2lab.cli`).
"""

from her2lab.cli import run_task

if __name__ == "__main__":
    run_task("train")
