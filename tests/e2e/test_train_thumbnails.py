"""Training on thumbnails (ConvNeXt with Grad-CAM) and the patch-classifier baseline, each
evaluated on a new IHC cohort."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_task

pytestmark = pytest.mark.slow  # every test trains through train.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The data folder both runs share: the IHC cohort and the new cohort are generated once."""
    return tmp_path_factory.mktemp("data")


def _run(tmp: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return run_task("train.py", *args, cwd=tmp, data_dir=data, log_dir=tmp / "logs")


def _eval_on_new_ihc_cohort(run: Path, tmp: Path, data: Path) -> pd.DataFrame:
    """``eval.py`` of ``run`` on 4 new synthetic IHC slides (into ``tmp/ext``); their predictions."""
    res = run_task("eval.py", f"run_dir={run}", "cohort=demo_external", "cohort.stain=ihc", "cohort.synthetic.n_slides=4",
                   "n_boot=20", f"hydra.run.dir={tmp / 'ext'}", cwd=tmp, data_dir=data, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    labelled = pd.read_csv(tmp / "ext" / "predictions.csv")
    # the same slides as a folder, no labels: scored alike, with sets, referral and report pages
    res = run_task("eval.py", f"run_dir={run}", f"slides={data / 'demo_external' / 'slides'}", "stain=ihc",
                   f"hydra.run.dir={tmp / 'unlabelled'}", cwd=tmp, data_dir=data, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    scored = pd.read_csv(tmp / "unlabelled" / "predictions.csv", keep_default_na=False).set_index("slide_id")
    assert (scored.label == "").all() and {"set", "refer", "refer_reason"} <= set(scored.columns)
    probs = [c for c in labelled.columns if c.startswith("p_")]
    assert scored.loc[labelled.slide_id, probs].to_numpy() == pytest.approx(labelled[probs].to_numpy(), abs=1e-5)
    for sid in labelled.slide_id:
        page = (tmp / "unlabelled" / "reports" / f"{sid}.html").read_text()
        assert "data:image/png;base64," in page
    return labelled


SMALL_IHC = ["cohort=demo_ihc", "labels=her2_3way", "cohort.synthetic.n_slides=12", "cohort.synthetic.n_pairs=0", "data.n_folds=3"]


def test_convnext_on_thumbnails_runs_with_gradcam(tmp_path, data):
    res = _run(tmp_path, data, "experiment=paper_b_convnext", *SMALL_IHC, "data.module.input_px=64", "trainer.max_epochs=2",
               "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    splits = pd.read_csv(run / "splits.csv")
    assert set(preds.slide_id) == set(splits.slide_id[splits.split == "test"])
    assert {"p_0", "p_low", "p_high"} <= set(preds.columns) and 0 <= m["test/auroc"] <= 1
    overlays = sorted((run / "gradcam").glob("*.png"))
    assert len(overlays) == len(preds)
    assert cv2.imread(str(overlays[0])).shape == (64, 128, 3)  # input | overlay
    wb = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wb) == 1 and b"test/gradcam" in wb[0].read_bytes()  # the overlays are in the W&B run too
    assert len(list(run.glob("wandb/offline-run-*/files/media/images/test/gradcam*"))) == len(preds)
    # external validation: a new IHC cohort, thumbnails made at the run's resolution, Grad-CAM of each slide
    ext = _eval_on_new_ihc_cohort(run, tmp_path, data)
    assert len(ext) == 4 and ext.slide_id.str.startswith("ext_").all()
    assert len(list((tmp_path / "ext" / "gradcam").glob("*.png"))) == 4
    assert "external/auroc" in json.loads((tmp_path / "ext" / "metrics.json").read_text())


def test_patch_classifier_baseline_scores_slides(tmp_path, data):
    res = _run(tmp_path, data, "experiment=paper_b_patch", *SMALL_IHC, "backbone.input_px=64", "backbone.target_mpp=2.0",
               "trainer.max_epochs=1", "data.module.tiles_per_slide=8", "data.module.eval_tiles_per_slide=8",
               "model.aggregate=topk", "model.top_k=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    splits = pd.read_csv(run / "splits.csv")
    assert list(preds.slide_id) == sorted(splits.slide_id[splits.split == "test"]) or set(preds.slide_id) == set(
        splits.slide_id[splits.split == "test"])
    assert len(preds) == (splits.split == "test").sum()  # one row per slide, not per tile
    assert np.asarray(m["test/confusion_matrix"]).sum() == len(preds)
    assert {"test/auroc", "test/f1", "test/acc", "test/qwk", "val/auroc_best"} <= set(m)
    # external validation: the new cohort's slides tiled with the run's settings, one prediction per slide
    ext = _eval_on_new_ihc_cohort(run, tmp_path, data)
    assert sorted(ext.slide_id) == [f"ext_case{i:03d}_ihc" for i in range(4)]
