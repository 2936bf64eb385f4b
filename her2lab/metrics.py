"""One torchmetrics collection per task, named ``stage/metric`` (see ../shared/DESIGN.md)."""

from __future__ import annotations

from torchmetrics import MetricCollection
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
