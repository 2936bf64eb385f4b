"""One log line per epoch and one for the test: the metrics of a run in its log file.

``python train.py`` adds :class:`EpochLog` to every trainer. Its lines go through Python
logging, so Hydra's file handler writes them to the run folder's ``train.log`` and they reach
a batch job's output, where Lightning's progress bar is off (see :mod:`her2lab.progress`)::

    epoch 15/39  train/loss=0.5121 val/loss=0.6969 val/auroc=0.9167 val/f1=0.4167 val/acc=0.5000 val/qwk=0.8333  (0.9 s)
    test  test/acc=0.7500 test/auroc=0.8875 … test/loss=0.7428  (best_epoch015.ckpt)

Epochs are counted as Lightning counts them, from 0 (``epoch e/last``), as in the checkpoints'
names and the CSV logs. An epoch's training metrics are computed in
``LightningModule.on_train_epoch_end``, which Lightning calls after the callbacks' hook of the
same name; so an epoch's line is written when the next epoch starts, or when training ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

#: What an epoch's line shows, when logged (others: ``EpochLog(keys=[…])``).
EPOCH_KEYS = ("train/loss", "val/loss", "val/auroc", "val/f1", "val/acc", "val/qwk")


class EpochLog(pl.Callback):
    """Logs ``epoch e/last  key=value …  (seconds)`` after every training epoch and, at the end of a
    test, every scalar ``test/*`` metric (on global rank 0 only)."""

    def __init__(self, keys: Sequence[str] = EPOCH_KEYS) -> None:
        self.keys = tuple(keys)
        self._epoch: int | None = None  # the epoch whose line is due
        self._start: float | None = None
        self._val: dict[str, float] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        self._epoch, self._start, self._val = trainer.current_epoch, time.monotonic(), {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # this epoch's values only: a metric left over from an earlier epoch is not shown
        if not trainer.sanity_checking:
            self._val = _scalars(trainer.callback_metrics, "val/")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = _scalars(trainer.callback_metrics, "test/")
        ckpt = getattr(trainer, "ckpt_path", None)
        where = f"  ({Path(ckpt).name})" if ckpt else ""
        log.info("test  %s%s", _text(values) or "(no metric)", where)

    def _flush(self, trainer: pl.Trainer) -> None:
        if self._epoch is None:
            return
        epoch, self._epoch = self._epoch, None
        if not trainer.is_global_zero:
            return
        values = {**_scalars(trainer.callback_metrics, "train/"), **self._val}
        shown = {k: values[k] for k in self.keys if k in values}
        last = f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        took = f"  ({time.monotonic() - self._start:.1f} s)" if self._start is not None else ""
        log.info("epoch %d%s  %s%s", epoch, last, _text(shown) or "(no metric)", took)


def _scalars(metrics: dict, prefix: str) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k.startswith(prefix):
            try:
                out[k] = float(v)
            except (TypeError, ValueError, RuntimeError):  # not a scalar
                continue
    return out


def _text(values: dict[str, float]) -> str:
    return " ".join(f"{k}={_num(v)}" for k, v in values.items())


def _num(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else str(v)
