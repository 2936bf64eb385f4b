"""Checks before a run is evaluated on a new cohort: the new cohort must be new, and its ids its own."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from omegaconf import OmegaConf

from her2lab.data.cohort import load_manifest
from her2lab.errors import Her2labError, ManifestError
from her2lab.eval.external import not_seen_in_training


def _manifest(path, rows):
    pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "her2_score"]).to_csv(path, index=False)
    return path


@pytest.fixture
def ran(tmp_path):
    """A run folder (splits.csv) of a 4-slide cohort: a0, a1 train, a2 val, a3 test."""
    manifest = _manifest(tmp_path / "ran.csv", [(f"a{i}", f"P{i}", f"slides/a{i}.tiff", "0") for i in range(4)])
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"slide_id": [f"a{i}" for i in range(4)], "patient_id": [f"P{i}" for i in range(4)],
                  "split": ["train", "train", "val", "test"]}).to_csv(run / "splits.csv", index=False)
    return run, {"manifest": str(manifest)}


def _check(tmp_path, ran, rows):
    run, ran_cohort = ran
    new = load_manifest(_manifest(tmp_path / "new.csv", rows))
    not_seen_in_training(run, ran_cohort, OmegaConf.create({"name": "site_b"}), new)


def test_a_new_cohort_whose_slide_ids_name_other_slides_is_refused(tmp_path, ran):
    with pytest.raises(ManifestError) as err:  # a3 is even a test slide: still another slide, same id
        _check(tmp_path, ran, [("b0", "Q0", "other/b0.tiff", "0"), ("a3", "Q1", "other/a3.tiff", "0"),
                               ("a1", "Q2", "other/a1.tiff", "0")])
    msg = str(err.value)
    assert "\n" not in msg and "cohort site_b names other slides with the run's cohort's slide ids (2: a1, a3)" in msg


def test_the_same_slide_files_are_refused_and_shared_patients_are_a_warning(tmp_path, ran, caplog):
    with pytest.raises(Her2labError, match=r"holds 1 slide\(s\) the run trained or validated on \(a0\)"):
        _check(tmp_path, ran, [("a0", "Q0", "slides/a0.tiff", "0")])
    caplog.set_level(logging.WARNING)
    _check(tmp_path, ran, [("b0", "P0", "other/b0.tiff", "0"), ("a3", "Q1", "slides/a3.tiff", "0")])
    assert "shares 1 patient id(s)" in caplog.text and "(P0)" in caplog.text
