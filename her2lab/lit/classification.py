"""Shared LightningModule logic for classifiers: loss, metrics per stage, optimiser.

Subclasses say how a batch becomes logits (``logits_of``). Metrics are torchmetrics, named
``stage/metric``: macro and per-class one-vs-rest AUROC, macro F1, accuracy, balanced accuracy,
quadratic-weighted kappa, confusion matrix (test). With an ordinal net the loss is the
cumulative-logit BCE and the metrics see the implied class probabilities. A class absent from a split is reported and
left out of the macro AUROC (torchmetrics would count it as 0). Test predictions are kept, one
row per item, for ``predictions.csv``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAUROC, MulticlassConfusionMatrix

from her2lab.errors import Her2labError
from her2lab.metrics import ClassSupport, classification_metrics
from her2lab.models.heads import ordinal_loss, ordinal_probs

log = logging.getLogger(__name__)


class ClassificationModule(pl.LightningModule):
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
        self.class_names = [str(c) for c in (class_names or range(num_classes))]
        if class_weights is not None and len(class_weights) != num_classes:
            raise Her2labError(f"model.class_weights has {len(class_weights)} values for {num_classes} classes")
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32) if class_weights else None)
        # An ordinal net (``net.ordinal``) outputs K-1 cumulative logits; see models/heads.py.
        self.ordinal = bool(getattr(net, "ordinal", False))
        # ModuleDict keys cannot be "train" (nn.Module.train): stages are keyed "train_", …
        self.metrics = nn.ModuleDict({f"{s}_": classification_metrics(num_classes, f"{s}/") for s in ("train", "val", "test")})
        self.per_class = nn.ModuleDict({f"{s}_": MulticlassAUROC(num_classes, average=None) for s in ("val", "test")})
        # per-item mean loss, weighted by batch size and synced over ranks (a plain self.log of
        # the batch loss would average rank 0's batches only under DDP)
        self.mean_loss = nn.ModuleDict({f"{s}_": MeanMetric() for s in ("train", "val", "test")})
        self.support = nn.ModuleDict({f"{s}_": ClassSupport(num_classes) for s in ("val", "test")})
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.best_val = -float("inf")
        self.test_outputs: list[dict] = []

    def logits_of(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits (B, C), labels (B,), item indices (B,) or None) of a batch."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.ordinal:
            return ordinal_loss(logits, y, self.class_weights)
        return F.cross_entropy(logits, y, weight=self.class_weights)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Net outputs → class probabilities (B, C)."""
        return ordinal_probs(logits) if self.ordinal else logits.softmax(-1)

    def _step(self, batch, stage: str) -> torch.Tensor:
        logits, y, idx = self.logits_of(batch)
        loss = self.loss(logits, y)
        probs = self.probs(logits.float())
        self.metrics[f"{stage}_"].update(probs, y)
        if f"{stage}_" in self.per_class:
            self.per_class[f"{stage}_"].update(probs, y)
            self.support[f"{stage}_"].update(y)
        if stage == "test":
            self.confusion.update(probs, y)
            if idx is not None:
                for i, p, t in zip(idx.tolist(), probs.tolist(), y.tolist(), strict=True):
                    self.test_outputs.append({"index": i, "label": t, "probs": p})
        self.mean_loss[f"{stage}_"].update(loss.detach(), weight=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _log_epoch(self, stage: str) -> dict:
        # Every collective (metric sync) happens here, in the same order on every rank.
        if self.mean_loss[f"{stage}_"].update_count == 0:  # nothing seen (e.g. an epoch resumed at its end)
            return {}
        values = self.metrics[f"{stage}_"].compute()
        self.metrics[f"{stage}_"].reset()
        loss = self.mean_loss[f"{stage}_"].compute()
        self.mean_loss[f"{stage}_"].reset()
        if f"{stage}_" in self.per_class:
            pc = self.per_class[f"{stage}_"]
            seen = self.support[f"{stage}_"].compute()  # synced over ranks, like the AUROC itself
            self.support[f"{stage}_"].reset()
            per = pc.compute()
            pc.reset()
            per = torch.where(seen > 0, per, torch.full_like(per, float("nan")))
            for name, v in zip(self.class_names, per, strict=True):
                values[f"{stage}/auroc_{name}"] = v
            if (seen == 0).any():
                missing = [n for n, c in zip(self.class_names, seen.tolist(), strict=True) if c == 0]
                log.warning("%s: no item of class(es) %s; macro AUROC is over the present classes", stage, missing)
                values[f"{stage}/auroc"] = per[seen > 0].mean()
        self.log_dict(values)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test")
        return values

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if values and not self.trainer.sanity_checking:
            self.best_val = max(self.best_val, float(values[self.hparams.monitor]))
            self.log(f"{self.hparams.monitor}_best", self.best_val)

    def on_test_epoch_start(self) -> None:
        self.test_outputs = []
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        if self.trainer.world_size > 1:  # every rank tested a share of the items: gather them all
            gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, self.test_outputs)
            self.test_outputs = [o for part in gathered for o in part]

    def configure_optimizers(self):
        opt = self.hparams.optimizer(params=[p for p in self.parameters() if p.requires_grad])
        if self.hparams.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.hparams.scheduler(optimizer=opt), "interval": "epoch"}}
