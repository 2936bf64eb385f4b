"""Every epoch's metrics and the test's as log lines, from a real (tiny) Lightning fit."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tests.helpers import mil_nets, write_trident


def _tiny_fit(tmp_path, callbacks, max_epochs=2):
    from her2lab.data.bags import BagDataModule, BagRecord
    from her2lab.lit.mil_module import MILModule

    rng = np.random.default_rng(0)
    feats = [(rng.standard_normal((20, 24)) + i % 4).astype(np.float32) for i in range(8)]
    recs = [
        BagRecord(f"s{i}", str(write_trident(tmp_path / f"s{i}.h5", x)), i % 4)
        for i, x in enumerate(feats)
    ]
    dm = BagDataModule(
        {"train": recs, "val": recs, "test": recs}, embed_dim=24, bag_size=16, batch_size=4
    )
    module = MILModule(mil_nets()[0], 4, optimizer=torch.optim.Adam)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm


# the sanity check sees two slides: torchmetrics warns of the classes missing there
@pytest.mark.filterwarnings("ignore:No positive samples in targets:UserWarning")
def test_one_line_per_epoch_and_one_for_the_test(tmp_path, caplog):
    from her2lab.lit.epoch_log import EpochLog

    with caplog.at_level(logging.INFO, logger="her2lab.lit.epoch_log"):
        trainer, module, dm = _tiny_fit(tmp_path, [EpochLog()])
        last = {k: float(v) for k, v in trainer.callback_metrics.items()}
        trainer.test(module, datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.name == "her2lab.lit.epoch_log"]
    assert len(lines) == 3, lines  # the sanity check is no epoch
    num = r"-?\d+\.\d{4}"
    for e, line in enumerate(lines[:2]):  # counted from 0, as Lightning names checkpoints
        assert re.fullmatch(
            rf"epoch {e}/1  train/loss={num} val/loss={num} val/auroc={num} val/f1={num} "
            rf"val/acc={num} val/qwk={num}  \(\d+\.\d s\)",
            line,
        ), line
    # the last epoch's values are those Lightning holds at the end of the fit
    for key in ("train/loss", "val/loss", "val/auroc", "val/f1"):
        assert f"{key}={last[key]:.4f}" in lines[1]
    test = lines[2]
    assert test.startswith("test  test/")
    for key in ("test/loss", "test/auroc", "test/f1", "test/acc", "test/qwk"):
        assert f"{key}={float(trainer.callback_metrics[key]):.4f}" in test, key
