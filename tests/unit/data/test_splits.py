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


# --- the H&E-HER2 study's protocol (data.cv_protocol=study) -----------------------------------


def test_study_protocol_tests_every_fold_on_one_held_out_set_and_kfolds_the_other_slides():
    from sklearn.model_selection import KFold

    m = _manifest(25)
    y = label_scheme("her2_4way").encode(m)
    splits = [split_for_fold(m, y, k, 5, seed=0, protocol="study") for k in range(5)]
    test = splits[0] == "test"
    assert all(((s == "test") == test).all() for s in splits)  # the same held-out slides for all 5 models
    assert m.assign(t=test).groupby("patient_id").t.nunique().eq(1).all()  # held out by patient
    assert set(y[test]) == {0, 1, 2, 3} and 0.1 < test.mean() < 0.3  # stratified, about test_fraction
    vals = [set(m.slide_id[s == "val"]) for s in splits]
    rest = set(m.slide_id[~test])
    assert set().union(*vals) == rest and sum(map(len, vals)) == len(rest)  # KFold: each other slide validates once
    for s in splits:
        assert set(m.slide_id[s == "train"]) == rest - set(m.slide_id[s == "val"])  # the other 4 folds train
    # exactly sklearn's KFold(5, shuffle=True, random_state=seed) over the sorted slide ids, as the study's code
    ids = np.unique(m.slide_id[~test])
    assert [set(ids[v]) for _, v in KFold(5, shuffle=True, random_state=0).split(ids)] == vals
    # slides, not patients, are folded: some patient has slides in train and val (the study's leak)
    assert any(m.assign(s=s).groupby("patient_id").s.nunique().gt(1).any() for s in splits)


def test_study_protocol_takes_the_manifests_test_slides_as_the_held_out_set():
    m = _manifest(12)
    m["split"] = np.where(m.index % 4 == 0, "test", "train")
    y = label_scheme("her2_4way").encode(m)
    split = split_for_fold(m, y, 2, 5, seed=0, protocol="study")
    assert ((split == "test") == (m.split == "test")).all()
    assert set(split[m.split != "test"]) == {"train", "val"}  # the given train/val are folded again
    with pytest.raises(Her2labError, match="names no test slide"):
        split_for_fold(m.assign(split="train"), y, 0, 5, 0, protocol="study")


def test_study_protocol_errors_are_one_line():
    m = _manifest()
    y = label_scheme("her2_4way").encode(m)
    with pytest.raises(Her2labError, match="cv_protocol='kfold'"):
        split_for_fold(m, y, 0, 5, 0, protocol="kfold")
    with pytest.raises(Her2labError, match="test_fraction=1.5"):
        split_for_fold(m, y, 0, 5, 0, protocol="study", test_fraction=1.5)
    with pytest.raises(Her2labError, match="fold=5 is out of range"):
        split_for_fold(m, y, 5, 5, 0, protocol="study")
