"""The validation metrics of every epoch, so that a run reports those of the epoch it selected.

At the end of a fit, Lightning's ``callback_metrics`` hold the *last* validation's values, while
the model tested is the checkpoint callback's best one. :class:`ValidationHistory` records the
``val/*`` values of each validation (keyed by the global step it ran at, with its epoch); its
record travels in the checkpoints, so a resumed run still knows the epochs before the resume.
:func:`selected_validation` picks the record of the checkpoint that was selected.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from her2lab.checkpoint import data_only

log = logging.getLogger(__name__)


class ValidationHistory(pl.Callback):
    """``val/*`` of every validation run, one record per global step:
    ``{"epoch", "global_step", "metrics"}``.

    Its ``on_validation_end`` runs before any checkpoint callback's (Lightning runs those last),
    so a checkpoint saved at the end of a validation already holds that validation's record.
    """

    def __init__(self) -> None:
        self.records: dict[int, dict] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            step = int(trainer.global_step)
            self.records[step] = {"epoch": int(trainer.current_epoch), "global_step": step,
                                  "metrics": values}

    def state_dict(self) -> dict:
        # plain data, so that checkpoints still load weights-only
        return {"records": [self.records[s] for s in sorted(self.records)]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = {int(r["global_step"]): r for r in state_dict.get("records", [])}


def selected_validation(history: ValidationHistory, best_path: str | None, last_epoch: int) -> dict:
    """``val/*`` of the validation whose checkpoint is ``best_path``, plus ``selected_epoch``.

    Without a best checkpoint the last weights are tested: the last validation's record (with no
    record at all, ``selected_epoch`` is ``last_epoch``, the last epoch's 0-based index). A best
    checkpoint whose validation was not recorded (written by an earlier version, before a resume)
    gives ``selected_epoch`` alone, with a warning: no validation value is reported for it.
    """
    if not best_path:
        if not history.records:
            return {"selected_epoch": int(last_epoch)}
        rec = history.records[max(history.records)]
        return {**rec["metrics"], "selected_epoch": rec["epoch"]}
    with data_only():  # mmap: only the two counters are read, not the weights
        ckpt = torch.load(Path(best_path), map_location="cpu", weights_only=True, mmap=True)
    step, epoch = int(ckpt.get("global_step", -1)), int(ckpt.get("epoch", -1))
    rec = history.records.get(step)
    if rec is None:
        log.warning("%s: no validation metrics recorded for its epoch %d (step %d); "
                    "metrics.json reports none", best_path, epoch, step)
        return {"selected_epoch": epoch}
    return {**rec["metrics"], "selected_epoch": rec["epoch"]}
