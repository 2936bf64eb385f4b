"""Label schemes and patient-grouped, stratified folds."""

import numpy as np
import pandas as pd
import pytest

from her2lab.data.labels import label_scheme
from her2lab.data.splits import assign_folds, split_for_fold
from her2lab.errors import Her2labError, ManifestError


def _manifest(n_patients: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        score = ("0", "1+", "2+", "3+")[p % 4]
        for s in range(int(rng.integers(1, 4))):  # 1–3 slides per patient, same label
            rows.append({"slide_id": f"p{p}_s{s}", "patient_id": f"P{p}", "her2_score": score,
                         "ish": ("pos" if p % 8 == 2 else "neg") if score == "2+" else ""})
    return pd.DataFrame(rows)


def test_folds_group_patients_and_stratify_labels():
    m = _manifest()
    y = label_scheme("her2_4way").encode(m)
    folds = assign_folds(m, y, 5, seed=1)
    assert (m.assign(f=folds).groupby("patient_id").f.nunique() == 1).all()  # no patient in two folds
    for k in range(5):
        assert set(y[folds == k]) == {0, 1, 2, 3}  # every fold holds every class
    assert folds.equals(assign_folds(m, y, 5, seed=1))  # deterministic
    assert not folds.equals(assign_folds(m, y, 5, seed=2))


def test_fold_k_tests_and_the_next_validates():
    m = _manifest()
    y = label_scheme("her2_4way").encode(m)
    folds = assign_folds(m, y, 5, seed=0)
    for k in range(5):
        split = split_for_fold(m, y, k, 5, seed=0)
        assert (split[folds == k] == "test").all() and (split[folds == (k + 1) % 5] == "val").all()
        assert set(split[(folds != k) & (folds != (k + 1) % 5)]) == {"train"}


def test_fold_out_of_range_and_too_few_patients_are_errors():
    m = _manifest()
    y = label_scheme("her2_4way").encode(m)
    with pytest.raises(Her2labError, match=r"fold=5 is out of range: use 0..4"):
        split_for_fold(m, y, 5, 5, 0)
    with pytest.raises(Her2labError, match="class 0 has 5 patient"):
        assign_folds(m, y, 6, 0)


def test_manifest_split_column_is_used_as_given():
    m = _manifest(8).assign(split=lambda d: np.where(d.index % 3 == 0, "test", np.where(d.index % 3 == 1, "val", "Train")))
    y = label_scheme("her2_4way").encode(m)
    split = split_for_fold(m, y, 0, 5, 0)
    assert list(split) == [s.lower() for s in m.split]
    with pytest.raises(Her2labError, match=r"split column has \['holdout'\]"):
        split_for_fold(m.assign(split="holdout"), y, 0, 5, 0)


def test_label_schemes():
    m = _manifest(8)
    four = label_scheme("her2_4way").encode(m)
    three = label_scheme("her2_3way").encode(m)
    binary = label_scheme("binary").encode(m)
    for score, ish, f, t, b in zip(m.her2_score, m.ish, four, three, binary, strict=True):
        assert f == {"0": 0, "1+": 1, "2+": 2, "3+": 3}[score]
        assert t == {"0": 0, "1+": 1, "3+": 2}.get(score, 2 if ish == "pos" else 1)
        assert b == int(score in ("2+", "3+"))
    with pytest.raises(ManifestError, match="2\\+ slide\\(s\\) .* have no ISH result"):
        label_scheme("her2_3way").encode(m.assign(ish=""))
    with pytest.raises(ManifestError, match="labels.name='her2_5way'"):
        label_scheme("her2_5way")
