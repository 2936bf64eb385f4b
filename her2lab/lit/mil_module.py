"""MIL LightningModule: bags of embeddings → slide-level logits; one prediction per slide.

Owns the loss, the metrics (macro and per-class AUROC, macro F1, accuracy, balanced accuracy,
quadratic-weighted kappa, confusion matrix) and the optimiser. Test predictions (one row per
slide, per-class probabilities) are kept for ``predictions.csv``; attention for heatmaps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAUROC, MulticlassConfusionMatrix

from her2lab.metrics import classification_metrics

log = logging.getLogger(__name__)


class MILModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        class_weights: list[float] | None = None,
        class_names: list[str] | None = None,
        monitor: str = "val/auroc",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.net = net
        self.class_names = list(class_names or range(num_classes))
        w = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=w)
        # ModuleDict keys cannot be "train" (nn.Module.train): stages are keyed "train_", …
        self.metrics = nn.ModuleDict({f"{s}_": classification_metrics(num_classes, f"{s}/") for s in ("train", "val", "test")})
        self.per_class = nn.ModuleDict({f"{s}_": MulticlassAUROC(num_classes, average=None) for s in ("val", "test")})
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.best_val = -float("inf")
        self.test_outputs: list[dict] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x, mask)  # (B, C), (B, N)

    def _step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask, y, _ = batch  # (B, N, D), (B, N), (B,), (B,)
        logits, _ = self(x, mask)
        loss = self.loss(logits, y)
        probs = logits.softmax(-1)
        self.metrics[f"{stage}_"].update(probs, y)
        if f"{stage}_" in self.per_class:
            self.per_class[f"{stage}_"].update(probs, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=len(y))
        return loss, probs

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")[0]

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        _, probs = self._step(batch, "test")
        self.confusion.update(probs, batch[2])
        for i, p, y in zip(batch[3].tolist(), probs.tolist(), batch[2].tolist(), strict=True):
            self.test_outputs.append({"index": i, "label": y, "probs": p})

    def _log_epoch(self, stage: str) -> dict:
        values = self.metrics[f"{stage}_"].compute()
        self.metrics[f"{stage}_"].reset()
        if f"{stage}_" in self.per_class:
            pc = self.per_class[f"{stage}_"]
            seen = torch.bincount(torch.cat(pc.target), minlength=self.hparams.num_classes)
            per = pc.compute()
            pc.reset()
            per = torch.where(seen > 0, per, torch.full_like(per, float("nan")))
            for name, v in zip(self.class_names, per, strict=True):
                values[f"{stage}/auroc_{name}"] = v
            if (seen == 0).any():
                # torchmetrics would count an absent class as AUROC 0: average the present ones.
                missing = [n for n, c in zip(self.class_names, seen.tolist(), strict=True) if c == 0]
                log.warning("%s: no slide of class(es) %s; macro AUROC is over the present classes", stage, missing)
                values[f"{stage}/auroc"] = per[seen > 0].mean()
        self.log_dict(values)
        return values

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.best_val = max(self.best_val, float(values[self.hparams.monitor]))
            self.log(f"{self.hparams.monitor}_best", self.best_val)

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        opt = self.hparams.optimizer(params=[p for p in self.parameters() if p.requires_grad])
        if self.hparams.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.hparams.scheduler(optimizer=opt), "interval": "epoch"}}
