"""Patient-level bootstrap intervals."""

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from her2lab.eval.bootstrap import macro_auroc, patient_bootstrap
from her2lab.lit.classification import ClassificationModule
from her2lab.metrics import macro_f1


def _auroc_only(y, p):
    return {"auroc": macro_auroc(y, p)}


@pytest.mark.slow  # 60 bootstrap runs of 150 resamples each
def test_patient_bootstrap_covers_the_true_auroc_at_about_the_nominal_rate():
    # scores of positives ~ N(d, 1), negatives ~ N(0, 1): the true AUROC is Φ(d / √2)
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    hits, runs = 0, 60
    for _ in range(runs):
        y = rng.integers(0, 2, 120)
        s = rng.normal(d * y, 1.0)
        p = 1 / (1 + np.exp(-s))
        table = pd.DataFrame({"patient_id": np.arange(120) // 2, "label_index": y, "p_neg": 1 - p, "p_pos": p})
        ci = patient_bootstrap(table, _auroc_only, n=150, seed=int(rng.integers(1 << 30))).iloc[0]
        hits += ci.lo <= truth <= ci.hi
    assert 0.85 <= hits / runs <= 1.0  # nominal 0.95; 60 runs give about ± 0.03


def test_bootstrap_resamples_patients_not_slides():
    # two patients, each with 5 identical slides: a resample has 10 slides and 1–2 patients
    table = pd.DataFrame({"patient_id": ["a"] * 5 + ["b"] * 5, "label_index": [0] * 5 + [1] * 5,
                          "p_0": [0.8] * 5 + [0.3] * 5, "p_1": [0.2] * 5 + [0.7] * 5})
    ci = patient_bootstrap(table, n=200, seed=0).set_index("metric")
    assert ci.loc["auroc", "value"] == 1.0
    # half the resamples draw one patient twice: one class only, no AUROC → fewer valid draws
    assert 60 < ci.loc["auroc", "n_boot"] < 140


class _GivenProbs(ClassificationModule):
    """A classifier whose batches are (log-probabilities, labels, indices), output as they are."""

    def logits_of(self, batch):
        return batch


def _logged_test_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The ``test/*`` values training logs for predictions ``p`` (N, C) of labels ``y`` (N,)."""
    import pytorch_lightning as pl

    module = _GivenProbs(nn.Identity(), num_classes=p.shape[1],
                         optimizer=partial(torch.optim.SGD, lr=0.1))
    logp = torch.log(torch.as_tensor(p, dtype=torch.float32))
    data = TensorDataset(logp, torch.as_tensor(y), torch.arange(len(y)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, dataloaders=DataLoader(data, batch_size=7), verbose=False)
    return {k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items()}


def _prediction_sets():
    rng = np.random.default_rng(7)
    for n, k in [(30, 4), (17, 3), (40, 4)]:
        yield "random", rng.integers(0, k, n), rng.dirichlet(np.ones(k), n)
    # class 3 absent from the labels and never predicted; then absent from the labels only
    y = rng.integers(0, 3, 25)
    p = rng.dirichlet(np.ones(4), 25)
    p[:, 3] *= 0.01
    yield "class 3 neither labelled nor predicted", y, p / p.sum(1, keepdims=True)
    p = rng.dirichlet(np.ones(4), 25)
    p[:3, 3] = 5.0
    yield "class 3 predicted, never labelled", y, p / p.sum(1, keepdims=True)


def test_the_point_estimate_of_every_metric_is_the_value_training_logs():
    for what, y, p in _prediction_sets():
        table = pd.DataFrame({"patient_id": np.arange(len(y)) // 2, "label_index": y,
                              **{f"p_{c}": p[:, c] for c in range(p.shape[1])}})
        point = patient_bootstrap(table, n=5, seed=0).set_index("metric")["value"]
        logged = _logged_test_metrics(y, p)
        assert set(point.index) <= set(logged), what
        for m, v in point.items():
            assert v == pytest.approx(logged[m], abs=1e-5), f"{m} on {what}: {v} vs {logged[m]}"


def test_a_resample_without_a_class_does_not_score_it_zero():
    # perfect predictions: every resample is perfect too, even those that draw no patient of class 2
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[y] * 0.9 + 0.1 / 3
    table = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c", "c"], "label_index": y,
                          **{f"p_{c}": p[:, c] for c in range(3)}})
    ci = patient_bootstrap(table, n=100, seed=0).set_index("metric")
    for m in ("f1", "acc", "bacc"):
        assert (ci.loc[m, "lo"], ci.loc[m, "value"], ci.loc[m, "hi"]) == (1.0, 1.0, 1.0), m
    # a class predicted but never labelled is a wrong prediction and still counts
    assert macro_f1(np.array([0, 0, 1]), np.eye(3)[[0, 2, 1]]) == pytest.approx((2 / 3 + 1 + 0) / 3)
