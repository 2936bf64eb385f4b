"""The classification metrics, one registered entry each, and everything derived from them.

Each entry names a metric once and says how it is computed both ways: as a torchmetrics object
(the ``stage/metric`` values that training logs) and as a scikit-learn/numpy function over
labels ``(N,)`` and class probabilities ``(N, C)`` (the bootstrap intervals of evaluation, the
pooled cross-validation and comparison tables). The sweep summary and the cross-validation
tables list the ``test/<name>`` of every entry with ``tables=True``, in registration order.

A new metric is one registered function::

    @register_metric("top2", torchmetric=lambda k: MulticlassAccuracy(k, top_k=2, average="micro"))
    def top2(y, probs):
        return float(top_k_accuracy_score(y, probs, k=2, labels=range(probs.shape[1])))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    roc_auc_score,
)
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCohenKappa,
    MulticlassF1Score,
)

from her2lab.errors import Her2labError
from her2lab.registry import Registry

ScoreFn = Callable[[np.ndarray, np.ndarray], float]


class UnknownMetricError(Her2labError):
    """A metric name that is not registered."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, its torchmetrics factory, its numpy function, where it is listed.

    Attributes:
        name: the ``metric`` of ``stage/metric`` and of ``metrics_ci.csv``.
        torchmetric: ``num_classes → Metric`` updated with (probabilities (B, C), labels (B,)).
        score: ``(labels (N,), probabilities (N, C)) → float`` (NaN where undefined).
        tables: listed in ``sweep_summary.csv`` and the cross-validation tables.
        title: how summaries name it (``AUROC``).
        summary: shown in the markdown summaries (cross-validation, comparisons).
    """

    name: str
    torchmetric: Callable[[int], Metric]
    score: ScoreFn
    tables: bool = True
    title: str = ""
    summary: bool = False


# Registration order is the column order of the tables, so the message lists them in it too.
_METRICS: Registry[MetricSpec] = Registry(
    "metric", error=UnknownMetricError, unknown="unknown metric {name!r}; known: {registered}"
)


def register_metric(
    name: str, *, torchmetric: Callable[[int], Metric], tables: bool = True, title: str | None = None,
    summary: bool = False,
) -> Callable[[ScoreFn], ScoreFn]:
    """Register the decorated ``score(labels, probs) -> float`` as metric ``name``.

    Args:
        name: metric name (``auroc`` → ``val/auroc``, ``test/auroc``, ``pooled auroc``).
        torchmetric: builds the torchmetrics object for ``num_classes`` classes.
        tables: whether ``test/<name>`` is a column of the sweep and cross-validation tables.
        title: its name in summaries (default: ``name``).
        summary: whether the markdown summaries (cross-validation, comparisons) show it.

    Raises:
        Her2labError: ``name`` is registered already (a metric is never silently replaced).
    """

    def add(fn: ScoreFn) -> ScoreFn:
        _METRICS.register(name, MetricSpec(name, torchmetric, fn, tables, title or name, summary))
        return fn

    return add


def unregister_metric(name: str) -> None:
    """Remove metric ``name`` (for metrics registered for a while, e.g. in a test)."""
    _METRICS.unregister(name)


def get_metric(name: str) -> MetricSpec:
    """The registered entry of ``name``; an unknown name lists the known ones."""
    return _METRICS.get(name)


def create_metric(name: str, num_classes: int) -> Metric:
    """The torchmetrics object of metric ``name`` for ``num_classes`` classes."""
    return get_metric(name).torchmetric(num_classes)


def list_metrics(tables_only: bool = False) -> list[str]:
    """Registered metric names, in registration order (the column order of every table)."""
    return [n for n, s in _METRICS.items() if s.tables or not tables_only]


def summary_metrics() -> list[tuple[str, str]]:
    """``(name, title)`` of the metrics the markdown summaries show, in registration order."""
    return [(n, s.title) for n, s in _METRICS.items() if s.summary]


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Every registered metric as one torchmetrics collection, named ``<prefix><name>``."""
    return MetricCollection({n: create_metric(n, num_classes) for n in list_metrics()}, prefix=prefix)


def score_all(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every registered metric over labels ``y`` (N,) and probabilities ``probs`` (N, C)."""
    with warnings.catch_warnings():  # bootstrap resamples often lack a class: expected, handled
        warnings.simplefilter("ignore", UserWarning)
        return {n: float(s.score(y, probs)) for n, s in _METRICS.items()}


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over the classes with both positives and negatives in ``y``."""
    vals = [roc_auc_score(y == c, probs[:, c]) for c in range(probs.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(vals)) if vals else float("nan")


# The built-in metrics; their order is the column order of the tables.
register_metric("auroc", torchmetric=lambda k: MulticlassAUROC(k, average="macro"), title="AUROC", summary=True)(macro_auroc)


def _class_counts(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives per class of the top predictions."""
    k = probs.shape[1]
    cm = np.bincount(np.asarray(y, dtype=int) * k + probs.argmax(1), minlength=k * k).reshape(k, k)
    tp = np.diag(cm)
    return tp, cm.sum(0) - tp, cm.sum(1) - tp


def _macro(score: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """Mean of per-class ``score`` over the classes that occur in labels or predictions.

    torchmetrics' macro average (``MulticlassF1Score``/``MulticlassAccuracy``, ``average="macro"``):
    a class with no true positive, false positive or false negative — absent from both the labels
    and the predictions — is left out; a class predicted but absent from the labels counts 0.
    """
    seen = (tp + fp + fn) > 0
    return float(score[seen].mean()) if seen.any() else float("nan")


@register_metric("f1", torchmetric=lambda k: MulticlassF1Score(k, average="macro"), title="F1", summary=True)
def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 of the top class over the classes in labels or predictions (torchmetrics' rule)."""
    tp, fp, fn = _class_counts(y, probs)
    denom = 2 * tp + fp + fn
    return _macro(np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0), tp, fp, fn)


@register_metric("acc", torchmetric=lambda k: MulticlassAccuracy(k, average="micro"), title="accuracy", summary=True)
def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Share of items whose top class is right."""
    return float(accuracy_score(y, probs.argmax(1)))


@register_metric("bacc", torchmetric=lambda k: MulticlassAccuracy(k, average="macro"), title="balanced accuracy")
def balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall over the classes in labels or predictions (torchmetrics' rule: a
    class predicted but absent from the labels counts 0)."""
    tp, fp, fn = _class_counts(y, probs)
    return _macro(np.divide(tp, tp + fn, out=np.zeros(len(tp)), where=(tp + fn) > 0), tp, fp, fn)


@register_metric("qwk", torchmetric=lambda k: MulticlassCohenKappa(k, weights="quadratic"), title="QWK")
def quadratic_kappa(y: np.ndarray, probs: np.ndarray) -> float:
    """Quadratic-weighted Cohen's kappa; NaN when labels and predictions hold one class only."""
    pred = probs.argmax(1)
    if len(np.unique(np.r_[y, pred])) < 2:
        return float("nan")
    return float(cohen_kappa_score(y, pred, labels=list(range(probs.shape[1])), weights="quadratic"))


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
