"""Before a run is evaluated on a new cohort: the cohort must be new, and its ids its own."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from omegaconf import OmegaConf

from her2lab.data.cohort import load_manifest
from her2lab.errors import Her2labError, ManifestError
from her2lab.eval.external import not_seen_in_training

COLUMNS = ["slide_id", "patient_id", "path", "her2_score"]


def _manifest(path, rows):
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture
def ran(tmp_path):
    """A run folder (splits.csv) of a 4-slide cohort: a0, a1 train, a2 val, a3 test."""
    rows = [(f"a{i}", f"P{i}", f"slides/a{i}.tiff", "0") for i in range(4)]
    manifest = _manifest(tmp_path / "ran.csv", rows)
    run = tmp_path / "run"
    run.mkdir()
    splits = pd.DataFrame(rows, columns=COLUMNS)[["slide_id", "patient_id"]]
    splits.assign(split=["train", "train", "val", "test"]).to_csv(run / "splits.csv", index=False)
    return run, {"manifest": str(manifest)}


def _check(tmp_path, ran, rows):
    run, ran_cohort = ran
    new = load_manifest(_manifest(tmp_path / "new.csv", rows))
    not_seen_in_training(run, ran_cohort, OmegaConf.create({"name": "site_b"}), new)


def test_a_new_cohort_whose_slide_ids_name_other_slides_is_refused(tmp_path, ran):
    # a3 is a test slide of the run: still another slide under the same id
    rows = [("b0", "Q0", "other/b0.tiff", "0"), ("a3", "Q1", "other/a3.tiff", "0"),
            ("a1", "Q2", "other/a1.tiff", "0")]
    with pytest.raises(ManifestError) as err:
        _check(tmp_path, ran, rows)
    msg = str(err.value)
    assert "\n" not in msg
    assert "cohort site_b names other slides with the run's cohort's slide ids (2: a1, a3)" in msg


def test_the_same_files_are_refused_and_shared_patients_are_a_warning(tmp_path, ran, caplog):
    with pytest.raises(Her2labError, match=r"holds 1 slide\(s\) the run trained or validated on"):
        _check(tmp_path, ran, [("a0", "Q0", "slides/a0.tiff", "0")])
    caplog.set_level(logging.WARNING)
    _check(tmp_path, ran, [("b0", "P0", "other/b0.tiff", "0"), ("a3", "Q1", "slides/a3.tiff", "0")])
    assert "shares 1 patient id(s)" in caplog.text and "(P0)" in caplog.text
