"""Shared LightningModule logic for classifiers: loss, metrics per stage, optimiser.

Subclasses say how a batch becomes logits (``logits_of``). Metrics are torchmetrics, named
``stage/metric``: every metric registered in :mod:`her2lab.metrics` (macro one-vs-rest AUROC,
macro F1, accuracy, balanced accuracy, quadratic-weighted kappa), per-class AUROC, confusion
matrix (test). With an ordinal net the loss is the
cumulative-logit BCE and the metrics see the implied class probabilities. A class absent from a split is reported and
left out of the macro AUROC (torchmetrics would count it as 0). Test predictions are kept, one
row per item, for ``predictions.csv``; an unlabelled test item (label ``-1``, a slide being scored)
is predicted but enters no metric and no loss.

Nothing is reported over non-finite numbers: a non-finite training loss stops the run at once
with an error naming the epoch, the step and the likely causes; items whose class probabilities
are non-finite at validation/test are kept out of the metrics and, at the end of the epoch, stop
the run with an error naming them (no metric, no ``predictions.csv`` is written from them).
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
        # The hyper-parameters go into every checkpoint: plain values only, so that checkpoints
        # load with torch.load(weights_only=True). The optimiser/scheduler factories (partials)
        # stay on the module; the checkpoint says what they were, as text.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.hparams.update({k: plain(v) for k, v in self.hparams.items()},
                            optimizer=describe(optimizer), scheduler=describe(scheduler))
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
        self.nonfinite: dict[str, list[int | None]] = {"val": [], "test": []}  # items with NaN/Inf probabilities

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
        probs = self.probs(logits.float())
        if stage != "train" and self.nonfinite_items(stage, probs, idx):
            return self.loss(logits, y.clamp(min=0))  # kept out of every metric; the epoch's end reports them
        if stage == "test" and idx is not None:  # every item, labelled or not (label -1), for predictions.csv
            for i, p, t in zip(idx.tolist(), probs.tolist(), y.tolist(), strict=True):
                self.test_outputs.append({"index": i, "label": t, "probs": p})
        known = y >= 0  # unlabelled slides (label -1) are scored, never measured
        if stage != "test" and not bool(known.all()):
            raise Her2labError(f"{stage}: {int((~known).sum())} item(s) without a label; only test items may be unlabelled")
        if not bool(known.any()):
            return logits.sum() * 0.0
        logits, y, probs = logits[known], y[known], probs[known]
        loss = self.loss(logits, y)
        self.metrics[f"{stage}_"].update(probs, y)
        if f"{stage}_" in self.per_class:
            self.per_class[f"{stage}_"].update(probs, y)
            self.support[f"{stage}_"].update(y)
        if stage == "test":
            self.confusion.update(probs, y)
        self.mean_loss[f"{stage}_"].update(loss.detach(), weight=len(y))
        return loss

    def nonfinite_items(self, stage: str, probs: torch.Tensor, idx: torch.Tensor | None) -> bool:
        """Note the items of ``probs`` (B, C) that hold NaN/Inf; True if there are any."""
        bad = ~torch.isfinite(probs).all(1)  # (B,)
        if not bad.any():
            return False
        self.nonfinite[stage] += idx[bad.to(idx.device)].tolist() if idx is not None else [None] * int(bad.sum())
        return True

    def _check_finite(self, stage: str) -> None:
        """Stop with an error, on every rank, when any item of the epoch had non-finite probabilities."""
        items = self.nonfinite.get(stage, [])
        n = torch.tensor(len(items), device=self.device)
        if self.trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        self.nonfinite[stage] = []
        if int(n) == 0:
            return
        names = self._item_names(stage, items)
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        raise Her2labError(
            f"{stage}: non-finite class probabilities for {'slide' if names else 'items'} {shown or '(other ranks)'} "
            f"({int(n)} item(s){f', epoch {self.current_epoch}' if stage == 'val' else ''}); no metric is reported over them. The model's weights "
            "or these slides' features hold NaN/Inf or huge values: check the features, or the checkpoint "
            "(a diverged run, too high a learning rate)"
        )

    def _item_names(self, stage: str, items: list[int | None]) -> list[str]:
        """Slide ids of dataset items where the loader's dataset has records, else ``item <i>``."""
        loaders = None
        if self.trainer is not None:
            loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        records = getattr(getattr(loader, "dataset", None), "records", None)
        names = []
        for i in sorted(items, key=lambda v: -1 if v is None else v):
            try:
                names.append(str(records[i].slide_id))
            except (TypeError, IndexError, AttributeError):
                names.append("item" if i is None else f"item {i}")
        return names

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):  # before any backward pass: the weights stay as they were
            opt = self.trainer.optimizers[0] if self.trainer is not None and self.trainer.optimizers else None
            lr = f"lr={opt.param_groups[0]['lr']:g}, " if opt is not None else ""
            raise Her2labError(
                f"training loss became non-finite ({float(loss)}) at epoch {self.current_epoch}, step {self.global_step}; "
                f"likely causes: NaN/Inf or huge values in the features, or too high a learning rate ({lr}model.optimizer.lr); "
                "the run stopped and reports no metrics"
            )
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _log_epoch(self, stage: str) -> dict:
        # Every collective (metric sync) happens here, in the same order on every rank.
        if stage in self.nonfinite:
            self._check_finite(stage)
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
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt), "interval": "epoch"}}


def plain(value):
    """A Hydra/OmegaConf container as plain lists and dicts; anything else as it is."""
    from omegaconf import Container, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


def describe(factory: Callable | None) -> str | None:
    """``torch.optim.adam.Adam(lr=0.001, weight_decay=1e-07)`` for an optimiser/scheduler factory."""
    if factory is None:
        return None
    func = getattr(factory, "func", factory)  # functools.partial (Hydra's _partial_), or a class
    args = [repr(a) for a in getattr(factory, "args", ())]
    args += [f"{k}={v!r}" for k, v in (getattr(factory, "keywords", None) or {}).items()]
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}({', '.join(args)})"
