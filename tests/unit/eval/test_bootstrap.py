"""Patient-level bootstrap intervals."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from her2lab.eval.bootstrap import macro_auroc, patient_bootstrap


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
