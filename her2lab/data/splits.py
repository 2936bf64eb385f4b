"""Patient-grouped, label-stratified k-fold splits (no patient in two folds), saved and reusable."""

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


def split_for_fold(manifest: pd.DataFrame, labels: pd.Series, fold: int, n_folds: int, seed: int) -> pd.Series:
    """``train``/``val``/``test`` per slide: fold ``fold`` tests, the next one validates.

    A manifest ``split`` column (train/val/test) is used as given instead.
    """
    if "split" in manifest.columns and manifest["split"].astype(str).str.len().gt(0).all():
        split = manifest["split"].str.lower()
        bad = sorted(set(split) - {"train", "val", "test"})
        if bad:
            raise Her2labError(f"manifest split column has {bad}; use train, val or test")
        return split
    if not 0 <= fold < n_folds:
        raise Her2labError(f"fold={fold} is out of range: use 0..{n_folds - 1} (data.n_folds={n_folds})")
    folds = assign_folds(manifest, labels, n_folds, seed)
    split = pd.Series("train", index=manifest.index)
    split[folds == fold] = "test"
    split[folds == (fold + 1) % n_folds] = "val"
    return split


def save_splits(path: Path, manifest: pd.DataFrame, labels: pd.Series, split: pd.Series) -> None:

    table = pd.DataFrame(
        {"slide_id": manifest.slide_id, "patient_id": manifest.patient_id, "label": labels, "split": split}
    )
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
