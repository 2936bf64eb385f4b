"""Slide-level metrics from predictions, with bootstrap confidence intervals resampled by patient.

Slides of one patient are not independent, so the bootstrap draws *patients* with replacement
and keeps all their slides (the cluster bootstrap). The interval is the percentile interval of
the resampled metric. Every metric follows the training metrics' (torchmetrics') convention, so the
point estimate is the value training logs on the same predictions: a resample that lacks a class
cannot give that class's AUROC, and macro AUROC averages the classes present; macro F1 and
balanced accuracy average the classes that occur in the labels or the predictions (a class
neither drawn nor predicted is left out, not scored 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from her2lab.metrics import macro_auroc, score_all

__all__ = ["macro_auroc", "patient_bootstrap", "patient_resamples", "slide_metrics"]


def slide_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every registered metric (see :mod:`her2lab.metrics`) over labels (N,) and probabilities (N, C)."""
    return score_all(y, probs)


def patient_resamples(patient_ids, n: int, seed: int = 0):
    """``n`` index arrays, each the rows of as many patients as there are, drawn with replacement."""
    members = list(pd.Series(np.asarray(patient_ids)).groupby(np.asarray(patient_ids)).indices.values())
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])


def patient_bootstrap(
    table: pd.DataFrame,
    metric: Callable[[np.ndarray, np.ndarray], dict[str, float]] = slide_metrics,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Point estimate and percentile CI per metric.

    ``table``: one row per slide with ``patient_id``, ``label_index`` and ``p_*`` columns (the
    layout of ``predictions.csv`` plus the patient). Returns rows ``metric, value, lo, hi, n_boot``.
    """
    probs_cols = [c for c in table.columns if c.startswith("p_")]
    y = table["label_index"].to_numpy()
    p = table[probs_cols].to_numpy(dtype=float)
    point = metric(y, p)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for idx in patient_resamples(table["patient_id"].to_numpy(), n, seed):
        for k, v in metric(y[idx], p[idx]).items():
            draws[k].append(v)
    rows = []
    for k, v in point.items():
        d = np.asarray(draws[k], dtype=float)
        d = d[np.isfinite(d)]
        lo, hi = (np.quantile(d, [alpha / 2, 1 - alpha / 2]) if len(d) else (np.nan, np.nan))
        rows.append({"metric": k, "value": v, "lo": float(lo), "hi": float(hi), "n_boot": len(d)})
    return pd.DataFrame(rows)
