"""Which slides train, validate and test in fold ``k``: two cross-validation protocols (``data.cv_protocol``).

- ``patient_grouped`` (the default): patient-grouped, label-stratified k-fold; fold ``k`` tests,
  fold ``k+1`` validates, the rest trains. No patient is in two folds, and over the k runs every
  slide is tested exactly once, by a model that never saw its patient.
- ``study`` (the H&E-HER2 study's code: ``KFold(n_splits=5, shuffle=True)`` over slide ids, 4
  folds train, the 5th validates, and every fold's model is tested on one separate held-out
  test set): a held-out test set first — the manifest's ``split=test`` slides, or else a
  patient-grouped, label-stratified share ``test_fraction`` of the cohort — then plain KFold
  over the remaining *slides* (not patients, as the study did): fold ``k`` validates, the rest
  trains. All k models test the same slides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from her2lab.errors import Her2labError
from her2lab.io import atomic_path


def assign_folds(manifest: pd.DataFrame, labels: pd.Series, n_folds: int, seed: int) -> pd.Series:
    """Fold index per slide: stratified by label, grouped by patient, deterministic in ``seed``."""
    n_patients = manifest["patient_id"].nunique()
    if n_folds < 2 or n_folds > n_patients:
        raise Her2labError(f"n_folds={n_folds}: need 2 ≤ n_folds ≤ {n_patients} (patients in the cohort)")
    per_class = manifest.groupby(labels.values)["patient_id"].nunique()
    if per_class.min() < n_folds:
        c = per_class.idxmin()
        raise Her2labError(
            f"class {c} has {per_class.min()} patient(s), fewer than n_folds={n_folds}: some folds would "
            "miss it; use fewer folds (data.n_folds) or more slides"
        )
    skf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.empty(len(manifest), int)
    for k, (_, test) in enumerate(skf.split(np.zeros(len(manifest)), labels.values, manifest["patient_id"].values)):
        folds[test] = k
    return pd.Series(folds, index=manifest.index, name="fold")


#: ``data.cv_protocol`` values.
CV_PROTOCOLS = ("patient_grouped", "study")


def split_for_fold(manifest: pd.DataFrame, labels: pd.Series, fold: int, n_folds: int, seed: int,
                   protocol: str = "patient_grouped", test_fraction: float = 0.2) -> pd.Series:
    """``train``/``val``/``test`` per slide under ``protocol`` (see the module's docstring).

    ``patient_grouped``: fold ``fold`` tests, the next one validates; a manifest ``split`` column
    (train/val/test) is used as given instead. ``study``: the held-out test set (the manifest's
    ``split=test`` slides, else ``test_fraction`` of the patients), then KFold over the other
    slides, fold ``fold`` validating.
    """
    if protocol not in CV_PROTOCOLS:
        raise Her2labError(f"data.cv_protocol={protocol!r}: use {' or '.join(CV_PROTOCOLS)}")
    given = _given_split(manifest)
    if given is not None and protocol == "patient_grouped":
        return given
    if not 0 <= fold < n_folds:
        raise Her2labError(f"fold={fold} is out of range: use 0..{n_folds - 1} (data.n_folds={n_folds})")
    if protocol == "study":
        return study_split(manifest, labels, fold, n_folds, seed, test_fraction, given)
    folds = assign_folds(manifest, labels, n_folds, seed)
    split = pd.Series("train", index=manifest.index)
    split[folds == fold] = "test"
    split[folds == (fold + 1) % n_folds] = "val"
    return split


def _given_split(manifest: pd.DataFrame) -> pd.Series | None:
    """The manifest's ``split`` column (lower case) when every slide has one, else None."""
    if "split" not in manifest.columns or not manifest["split"].astype(str).str.len().gt(0).all():
        return None
    split = manifest["split"].str.lower()
    bad = sorted(set(split) - {"train", "val", "test"})
    if bad:
        raise Her2labError(f"manifest split column has {bad}; use train, val or test")
    return split


def held_out_test(manifest: pd.DataFrame, labels: pd.Series, seed: int, test_fraction: float) -> pd.Series:
    """True for the held-out test slides: a patient-grouped, label-stratified ``test_fraction`` of
    the cohort (one fold of ``round(1 / test_fraction)``), deterministic in ``seed``."""
    if not 0 < test_fraction < 1:
        raise Her2labError(f"data.test_fraction={test_fraction}: use a share between 0 and 1 (the study's test set: 0.2)")
    n = max(2, round(1 / test_fraction))
    try:
        folds = assign_folds(manifest, labels, n, seed)
    except Her2labError as exc:
        raise Her2labError(f"held-out test set of data.test_fraction={test_fraction}: {exc}") from None
    return pd.Series(folds.values == 0, index=manifest.index)


def study_split(manifest: pd.DataFrame, labels: pd.Series, fold: int, n_folds: int, seed: int,
                test_fraction: float = 0.2, given: pd.Series | None = None) -> pd.Series:
    """The study's protocol: a held-out test set, then ``KFold(n_folds, shuffle=True,
    random_state=seed)`` over the other slides' sorted ids (the study's ``np.unique(S)``); fold
    ``fold`` validates, the rest trains."""
    from sklearn.model_selection import KFold

    if given is not None:
        test = pd.Series((given == "test").values, index=manifest.index)
        if not test.any():
            raise Her2labError("data.cv_protocol=study: the manifest's split column names no test slide "
                               "(the held-out test set); mark some split=test, or drop the column")
    else:
        test = held_out_test(manifest, labels, seed, test_fraction)
    rest = np.unique(manifest.slide_id[~test.values].astype(str))  # sorted, as the study's np.unique(S)
    if len(rest) < n_folds:
        raise Her2labError(f"data.cv_protocol=study: {len(rest)} slide(s) outside the test set, fewer than "
                           f"data.n_folds={n_folds}")
    _, val_idx = list(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(rest))[fold]
    split = pd.Series("train", index=manifest.index)
    split[manifest.slide_id.astype(str).isin(set(rest[val_idx])).values] = "val"
    split[test.values] = "test"
    return split


def save_splits(path: Path, manifest: pd.DataFrame, labels: pd.Series, split: pd.Series) -> None:

    table = pd.DataFrame(
        {"slide_id": manifest.slide_id, "patient_id": manifest.patient_id, "label": labels, "split": split}
    )
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
