"""The cross-validation summary of a sweep folder."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from her2lab.eval.cv import cv_summary


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


@pytest.mark.parametrize("overrides, want", [
    ("experiment=a fold=0 data.x=1", "experiment=a data.x=1"),
    ("fold=3 data.x=1", "data.x=1"),
    ("data.x=1 fold=4", "data.x=1"),
    ("fold=2", "(defaults)"),
    ("data.fold=2 fold=1", "data.fold=2"),  # only the fold override itself
    ("cohort.name=fold=x", "cohort.name=fold=x"),
])
def test_a_setting_is_its_overrides_without_the_fold(overrides, want):
    from her2lab.eval.cv import setting_of

    assert setting_of(overrides) == want
