"""One torchmetrics collection per task, named ``stage/metric`` (see ../shared/DESIGN.md)."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCohenKappa,
    MulticlassF1Score,
)


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Macro AUROC (one-vs-rest), macro F1, accuracy, balanced accuracy, quadratic-weighted kappa."""
    return MetricCollection(
        {
            "auroc": MulticlassAUROC(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "bacc": MulticlassAccuracy(num_classes, average="macro"),
            "qwk": MulticlassCohenKappa(num_classes, weights="quadratic"),
        },
        prefix=prefix,
    )


class ClassSupport(Metric):
    """Items per class, summed over batches and (under DDP) over ranks."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: torch.Tensor) -> None:
        self.counts += torch.bincount(target.long(), minlength=self.num_classes)

    def compute(self) -> torch.Tensor:
        return self.counts
