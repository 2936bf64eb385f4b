"""One registered metric reaches every place metrics are reported, with the same value."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from her2lab.errors import Her2labError
from her2lab.eval.bootstrap import patient_bootstrap
from her2lab.eval.cv import cv_summary
from her2lab.eval.jobs import summarize_sweep
from her2lab.lit.classification import ClassificationModule
from her2lab.metrics import (
    UnknownMetricError,
    classification_metrics,
    create_metric,
    list_metrics,
    register_metric,
    unregister_metric,
)

BUILT_IN = ["auroc", "f1", "acc", "bacc", "qwk"]


def _top2(y: np.ndarray, probs: np.ndarray) -> float:
    return float(top_k_accuracy_score(y, probs, k=2, labels=list(range(probs.shape[1]))))


@pytest.fixture
def top2():
    register_metric("top2", torchmetric=lambda k: MulticlassAccuracy(k, top_k=2, average="micro"))(_top2)
    yield "top2"
    unregister_metric("top2")


def _predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    p = rng.dirichlet([1, 1, 1], n)  # (n, 3)
    return y, p


def test_built_in_metrics_in_table_order():
    assert list_metrics() == BUILT_IN  # also: nothing registered by another test is left over
    assert list_metrics(tables_only=True) == BUILT_IN


def test_unknown_and_duplicate_names_are_one_line_errors():
    with pytest.raises(UnknownMetricError, match="unknown metric 'nope'; known: auroc, f1, acc, bacc, qwk"):
        create_metric("nope", 3)
    with pytest.raises(Her2labError, match="'auroc' is registered twice"):
        register_metric("auroc", torchmetric=lambda k: MulticlassAccuracy(k))(_top2)


def test_a_registered_metric_is_logged_by_the_classifier(top2):
    y, p = _predictions(30, 0)
    module = ClassificationModule(nn.Linear(4, 3), num_classes=3, optimizer=partial(torch.optim.SGD, lr=0.1))
    metrics = module.metrics["test_"]
    metrics.update(torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(y))
    values = metrics.compute()
    assert float(values["test/top2"]) == pytest.approx(_top2(y, p), abs=1e-6)
    # the collection holds the built-ins as well, named as before
    assert {f"test/{m}" for m in BUILT_IN} <= set(values)
    assert "val/top2" in classification_metrics(3, "val/").keys()


def test_a_registered_metric_is_in_the_bootstrap_table(top2):
    y, p = _predictions(40, 1)
    table = pd.DataFrame({"patient_id": np.arange(40) // 2, "label_index": y, "p_0": p[:, 0], "p_1": p[:, 1], "p_2": p[:, 2]})
    ci = patient_bootstrap(table, n=30, seed=0).set_index("metric")
    assert list(ci.index) == [*BUILT_IN, "top2"]
    assert ci.loc["top2", "value"] == pytest.approx(_top2(y, p))
    assert ci.loc["top2", "lo"] <= ci.loc["top2", "value"] <= ci.loc["top2", "hi"]


def _job(root, i: int, fold: int, y: np.ndarray, p: np.ndarray, metrics: dict) -> None:
    job = root / str(i)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- fold={fold}\n")
    ids = [f"f{fold}s{j}" for j in range(len(y))]
    pd.DataFrame({"slide_id": ids, "label_index": y, **{f"p_{c}": p[:, c] for c in range(3)}}).to_csv(
        job / "predictions.csv", index=False)
    pd.DataFrame({"slide_id": ids, "patient_id": ["P" + s for s in ids], "split": "test"}).to_csv(
        job / "splits.csv", index=False)
    (job / "metrics.json").write_text(json.dumps(metrics))


def test_a_registered_metric_is_in_the_sweep_and_cv_summaries(tmp_path, top2):
    folds = [_predictions(12, 10 + k) for k in range(2)]
    for k, (y, p) in enumerate(folds):
        _job(tmp_path, k, k, y, p, {"test/auroc": 0.5, "test/top2": _top2(y, p), "val/auroc_best": 0.6})
    jobs = summarize_sweep(tmp_path)
    assert list(jobs.columns) == ["job", "overrides", "status", "error", "val/auroc_best",
                                  *(f"test/{m}" for m in BUILT_IN), "test/top2", "test/loss", "run_dir"]
    table = cv_summary(tmp_path, n_boot=20).iloc[0]
    assert table["test/top2 mean"] == pytest.approx(np.mean([_top2(y, p) for y, p in folds]))
    y_all = np.concatenate([y for y, _ in folds])
    p_all = np.concatenate([p for _, p in folds])
    assert table["pooled top2"] == pytest.approx(_top2(y_all, p_all))


def test_a_metric_kept_out_of_tables_is_only_in_the_bootstrap(tmp_path):
    register_metric("top2_quiet", torchmetric=lambda k: MulticlassAccuracy(k, top_k=2), tables=False)(_top2)
    try:
        assert "top2_quiet" in list_metrics() and "top2_quiet" not in list_metrics(tables_only=True)
        y, p = _predictions(12, 3)
        _job(tmp_path, 0, 0, y, p, {"test/auroc": 0.5})
        assert "test/top2_quiet" not in summarize_sweep(tmp_path).columns
    finally:
        unregister_metric("top2_quiet")
