"""Scoring new slides end to end: a fold sweep as an ensemble on a folder of unlabelled slides
(with a broken file among them), a manifest with some scores missing, failed and unfinished jobs."""

import json
import shutil

import pandas as pd
import pytest

from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from tests.conftest import SMALL
from tests.helpers import run_task

pytestmark = pytest.mark.slow  # trains a sweep through train.py

R18 = ["backbone=timm", "backbone.name=resnet18", "backbone.preset=r18", "backbone.input_px=64", "backbone.target_mpp=2.0"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, r18_weights):
    """Two fold models (3 folds) of a 12-slide H&E cohort, and a folder of 4 new slides from another seed."""
    tmp = tmp_path_factory.mktemp("predict")
    args = ["--multirun", "data=bags", "model=abmil", "cohort.synthetic.n_slides=12", "cohort.synthetic.n_pairs=0",
            "data.n_folds=3", "fold=0,1", *R18, f"backbone.weights={r18_weights}", "trainer.max_epochs=2",
            "data.module.bag_size=16", f"hydra.sweep.dir={tmp / 'sweep'}"]
    res = run_task("train.py", *args, cwd=tmp, data_dir=tmp / "data")
    assert res.returncode == 0, res.stderr[-3000:]
    new = tmp / "new"
    generate_cohort(new, SyntheticConfig(n_slides=4, n_pairs=0, seed=77, id_prefix="new_", **SMALL))
    folder = tmp / "to_score"
    folder.mkdir()
    for f in (new / "slides").glob("*.tiff"):
        shutil.copy(f, folder / f.name)
    (folder / "broken.svs").write_bytes(b"not a slide at all" * 100)  # unreadable: reported, the rest scored
    (folder / "notes.txt").write_text("not a slide file name: left aside")
    return tmp, new


def _eval(tmp, *args, out):
    return run_task("eval.py", *args, "n_boot=20", f"hydra.run.dir={out}", cwd=tmp, data_dir=tmp / "data", timeout=900)


def test_ensemble_scores_a_folder_of_unlabelled_slides(sweep):
    tmp, new = sweep
    out = tmp / "scored"
    res = _eval(tmp, f"run_dir={tmp / 'sweep'}", f"slides={tmp / 'to_score'}", out=out)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert sorted(preds.slide_id) == sorted(p.stem for p in (new / "slides").glob("*.tiff"))  # broken.svs left out
    assert (preds.label == "").all() and (preds.label_index == -1).all()
    assert (preds.n_models == 2).all() and preds.spread.astype(float).ge(0).all()
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy(dtype=float)
    assert abs(probs.sum(1) - 1).max() < 1e-5
    # the ensemble is the mean of the two models' probabilities
    per_model = [pd.read_csv(d / "predictions.csv").set_index("slide_id") for d in sorted((out / "models").iterdir())]
    assert len(per_model) == 2
    mean = (per_model[0]["p_3+"] + per_model[1]["p_3+"]) / 2
    assert preds.set_index("slide_id")["p_3+"].to_dict() == pytest.approx(mean.to_dict(), abs=1e-9)
    # conformal sets from the models' validation predictions, kept in each run for the next time
    assert preds.set.map(lambda s: all(c in {"0", "1+", "2+", "3+"} for c in s.split("|") if c)).all()
    assert preds.refer.map(str).isin(["True", "False"]).all()
    for run in sorted((tmp / "sweep").glob("[0-9]")):
        cal = pd.read_csv(run / "eval" / "calibration" / "predictions.csv")
        splits = pd.read_csv(run / "splits.csv")
        assert set(cal.slide_id) == set(splits.slide_id[splits.split == "val"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["external/slides"] == 4 and metrics["external/slides_unlabelled"] == 4
    assert "external/auroc" not in metrics  # no label, no metric
    assert metrics["external/conformal_calibration_slides"] == 8  # 4 validation slides per fold model
    excluded = pd.read_csv(out / "excluded_slides.csv")
    assert list(excluded.slide_id) == ["broken"] and excluded.reason[0]
    # the pathologist's pages and QuPath files
    index = (out / "reports" / "index.html").read_text()
    for sid in preds.slide_id:
        assert (out / "reports" / f"{sid}.html").exists() and sid in index
    assert list((out / "models").glob("*/heatmaps/*.geojson"))


def test_a_manifest_with_some_scores_missing(sweep):
    tmp, new = sweep
    man = pd.read_csv(new / "manifest.csv", dtype=str)
    man["path"] = [str(new / p) for p in man.path]
    man.loc[man.index[:2], "her2_score"] = ""
    (tmp / "partial.csv").write_text(man.to_csv(index=False))
    run = sorted((tmp / "sweep").glob("[0-9]"))[0]
    out = tmp / "partial_eval"
    res = _eval(tmp, f"run_dir={run}", "cohort=custom", f"cohort.manifest={tmp / 'partial.csv'}", "report.enabled=false",
                out=out)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(preds) == 4 and (preds.label == "").sum() == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["external/slides_unlabelled"] == 2
    assert sum(map(sum, metrics["external/confusion_matrix"])) == 2  # the labelled slides only
    labelled = preds[preds.label != ""]
    covered = [lab in s.split("|") for lab, s in zip(labelled.label, labelled.set, strict=True)]
    assert metrics["external/conformal_coverage"] == pytest.approx(sum(covered) / 2)
    assert "n_models" not in preds  # one model: no ensemble columns


def test_failed_and_unfinished_jobs_are_named_and_left_out(sweep, tmp_path):
    tmp, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(tmp / "sweep", copy)
    (copy / "1" / "failed.txt").write_text("RuntimeError: out of memory\n")
    res = _eval(tmp, f"run_dir={copy}", f"slides={tmp / 'to_score'}", "report.enabled=false", "heatmaps.enabled=false",
                out=tmp_path / "scored")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "job 1 left out of the ensemble: RuntimeError: out of memory" in res.stdout + res.stderr
    preds = pd.read_csv(tmp_path / "scored" / "predictions.csv")
    assert (preds.n_models == 1).all() and preds.spread.isna().all()
    assert json.loads((tmp_path / "scored" / "metrics.json").read_text())["left_out"] == {"1": "RuntimeError: out of memory"}
    (copy / "0" / "metrics.json").unlink()  # unfinished
    res = _eval(tmp, f"run_dir={copy}", f"slides={tmp / 'to_score'}", out=tmp_path / "none")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no finished model in this sweep" in last and "job 1: RuntimeError" in last
