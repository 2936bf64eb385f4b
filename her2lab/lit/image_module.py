"""Image classifier LightningModule: patch classifiers (encoder pretraining) and, later,
end-to-end models on slide thumbnails. Cross-entropy, torchmetrics per stage, ``_partial_``
optimiser and scheduler from the config."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn

from her2lab.metrics import classification_metrics


class ImageClassifierModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        class_weights: list[float] | None = None,
        monitor: str = "val/auroc",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.net = net
        self.num_classes = num_classes
        w = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=w)
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.best_val = -float("inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C) logits

    def _step(self, batch, metrics, stage: str) -> torch.Tensor:
        x, y = batch  # (B, 3, H, W), (B,)
        logits = self(x)
        loss = self.loss(logits, y)
        metrics.update(logits.softmax(-1), y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_metrics, "test")

    def _epoch_end(self, metrics) -> dict:
        values = metrics.compute()
        metrics.reset()
        self.log_dict(values)
        return values

    def on_train_epoch_end(self) -> None:
        self._epoch_end(self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self._epoch_end(self.val_metrics)
        if not self.trainer.sanity_checking:
            self.best_val = max(self.best_val, float(values[self.hparams.monitor]))
            self.log(f"{self.hparams.monitor}_best", self.best_val)

    def on_test_epoch_end(self) -> None:
        self._epoch_end(self.test_metrics)

    def configure_optimizers(self):
        opt = self.hparams.optimizer(params=[p for p in self.parameters() if p.requires_grad])
        if self.hparams.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.hparams.scheduler(optimizer=opt), "interval": "epoch"}}
