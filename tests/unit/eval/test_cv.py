"""Bootstrap intervals and the cross-validation summary of a sweep folder."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from her2lab.eval.bootstrap import macro_auroc, patient_bootstrap
from her2lab.eval.cv import cv_summary


def _auroc_only(y, p):
    return {"auroc": macro_auroc(y, p)}


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


def _job(root, i, overrides, test_auroc=None, preds=None, failed=None):
    job = root / str(i)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if failed:
        (job / "failed.txt").write_text(failed + "\n")
        return
    preds.to_csv(job / "predictions.csv", index=False)
    preds.assign(patient_id=["P" + s for s in preds.slide_id], split="test")[["slide_id", "patient_id", "split"]].to_csv(
        job / "splits.csv", index=False)
    (job / "metrics.json").write_text(json.dumps({"test/auroc": test_auroc, "test/f1": 0.5, "test/acc": 0.5,
                                                  "test/bacc": 0.5, "test/qwk": 0.1, "val/auroc_best": 0.7}))


def test_cv_summary_matches_a_hand_computation(tmp_path):
    rng = np.random.default_rng(1)
    folds = []
    for k in range(3):
        y = np.array([0, 1, 0, 1, 0, 1])
        p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 6), 0.01, 0.99)
        folds.append(pd.DataFrame({"slide_id": [f"f{k}s{i}" for i in range(6)], "label_index": y,
                                   "p_neg": 1 - p1, "p_pos": p1}))
    aurocs = [roc_auc_score(f.label_index, f.p_pos) for f in folds]
    for k, f in enumerate(folds):
        _job(tmp_path, k, ["backbone=hne", f"fold={k}"], aurocs[k], f)
    _job(tmp_path, 3, ["backbone=hne", "fold=3"], failed="fold=3 is out of range: use 0..2")
    _job(tmp_path, 4, ["backbone=ihc", "fold=0"], aurocs[0], folds[0])
    table = cv_summary(tmp_path, n_boot=100).set_index("setting")
    hne = table.loc["backbone=hne"]
    assert hne["test/auroc mean"] == pytest.approx(np.mean(aurocs))
    assert hne["test/auroc sd"] == pytest.approx(np.std(aurocs, ddof=1))
    pooled = pd.concat(folds)
    assert hne["pooled auroc"] == pytest.approx(roc_auc_score(pooled.label_index, pooled.p_pos))
    assert hne["pooled auroc lo"] <= hne["pooled auroc"] <= hne["pooled auroc hi"]
    assert hne.folds_done == 3 and hne.folds_left_out == 1 and hne.left_out_jobs == "3"
    assert table.loc["backbone=ihc"].folds_done == 1
    md = (tmp_path / "cv_summary.md").read_text()
    assert "`backbone=hne` | 3 (+1 failed/unfinished: jobs 3)" in md
    assert (tmp_path / "cv_summary.csv").exists()


def _run(folder, y, p1, patients):
    folder.mkdir(parents=True)
    ids = [f"s{i}" for i in range(len(y))]
    pd.DataFrame({"slide_id": ids, "label_index": y, "p_neg": 1 - p1, "p_pos": p1}).to_csv(folder / "predictions.csv", index=False)
    pd.DataFrame({"slide_id": ids, "patient_id": patients, "split": "test"}).to_csv(folder / "splits.csv", index=False)
    return folder


def test_compare_finds_a_real_difference_and_none_between_twins(tmp_path):
    from her2lab.errors import Her2labError
    from her2lab.eval.compare import compare, markdown

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    patients = [f"P{i // 2}" for i in range(120)]
    weak = 1 / (1 + np.exp(-rng.normal(0.3 * y, 1.0)))
    strong = 1 / (1 + np.exp(-rng.normal(2.5 * y, 1.0)))
    a = _run(tmp_path / "a", y, weak, patients)
    b = _run(tmp_path / "b", y, strong, patients)
    twin = _run(tmp_path / "twin", y, weak, patients)
    t = compare([a, b, twin], n_boot=300)
    assert t.auroc[1] == pytest.approx(roc_auc_score(y, strong))
    assert t.auroc_diff[1] == pytest.approx(roc_auc_score(y, strong) - roc_auc_score(y, weak))
    assert t.diff_lo[1] > 0 and t.p_value[1] < 0.05  # the strong model is better, and it shows
    assert t.auroc_diff[2] == 0 and t.p_value[2] == 1.0  # a model against itself
    assert "(reference)" in markdown(t)
    other = _run(tmp_path / "other", y, weak, patients)
    for f in ("predictions.csv", "splits.csv"):
        pd.read_csv(other / f).assign(slide_id=lambda d: "x" + d.slide_id).to_csv(other / f, index=False)
    with pytest.raises(Her2labError, match="share no test slide"):
        compare([a, other], n_boot=10)
