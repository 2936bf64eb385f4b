"""Attention-MIL training end to end on a small synthetic cohort (real slides, encoder, Lightning)."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from tests.helpers import run_task

pytestmark = pytest.mark.slow  # every test trains through train.py


@pytest.fixture(scope="module")
def mil_run(tmp_path_factory, r18_weights):
    tmp = tmp_path_factory.mktemp("mil")
    weights = r18_weights
    args = [
        "data=bags", "model=abmil", "cohort=demo_ihc", "cohort.synthetic.n_slides=18", "cohort.synthetic.n_pairs=2",
        "data.n_folds=3", "backbone=timm", "backbone.name=resnet18", f"backbone.weights={weights}",
        "backbone.preset=r18", "backbone.input_px=64", "backbone.target_mpp=2.0", "trainer.max_epochs=3",
        "data.module.bag_size=16", "data.module.batch_size=4", f"hydra.run.dir={tmp / 'run'}",
    ]
    res = run_task("train.py", *args, cwd=tmp, data_dir=tmp / "data", log_dir=tmp / "logs")
    assert res.returncode == 0, res.stderr[-3000:]
    (tmp / "output.txt").write_text(res.stdout + res.stderr)  # what a batch job's output file gets
    return tmp / "run"


def test_the_log_file_has_every_epoch_the_test_and_each_stage_and_no_noise(mil_run):
    log = (mil_run / "train.log").read_text()
    epoch = r"epoch (\d)/2  train/loss=[\d.]+ val/loss=[\d.]+ val/auroc=[\d.]+ val/f1=[\d.]+"
    assert re.findall(epoch, log) == ["0", "1", "2"]
    assert re.search(r"test  test/acc=[\d.]+ test/auroc=[\d.]+ .*  \(best_epoch\d{3}\.ckpt\)", log)
    embedded = r"embedding \d+ tiles of \d+ slides .*: done \d+/\d+ in [\d:.]+ \([\d.]+ patches/s\)"
    assert re.search(embedded, log)
    out = (mil_run.parent / "output.txt").read_text()
    for noise in ("litlogger", "LeafSpec", "\r", "━"):  # Lightning's tip and warning; no bar
        assert noise not in out, noise


def test_outputs_and_one_prediction_per_test_slide(mil_run):
    metrics = json.loads((mil_run / "metrics.json").read_text())
    preds = pd.read_csv(mil_run / "predictions.csv")
    splits = pd.read_csv(mil_run / "splits.csv")
    test_ids = set(splits.slide_id[splits.split == "test"])
    assert set(preds.slide_id) == test_ids and len(preds) == len(test_ids)
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    for key in ("test/auroc", "test/f1", "test/acc", "test/bacc", "test/qwk", "val/auroc_best", "test/confusion_matrix"):
        assert key in metrics
    assert np.asarray(metrics["test/confusion_matrix"]).sum() == len(test_ids)
    # folds never share a patient
    per_patient = splits.groupby("patient_id").split.nunique()
    assert (per_patient == 1).all()


def test_metrics_match_scikit_learn_on_the_same_predictions(mil_run):
    metrics = json.loads((mil_run / "metrics.json").read_text())
    preds = pd.read_csv(mil_run / "predictions.csv")
    probs = preds[[c for c in preds.columns if c.startswith("p_")]].to_numpy()
    y = preds.label_index.to_numpy()
    present = np.unique(y)
    # torchmetrics' macro one-vs-rest AUROC over the classes present in the test split
    auroc = np.mean([roc_auc_score(y == c, probs[:, c]) for c in present])
    assert metrics["test/auroc"] == pytest.approx(auroc, abs=1e-4)
    assert metrics["test/acc"] == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1e-6)
    # torchmetrics' macro F1 averages the classes in the labels or the predictions
    pred = probs.argmax(1)
    f1 = f1_score(y, pred, average="macro", labels=np.union1d(y, pred), zero_division=0)
    assert metrics["test/f1"] == pytest.approx(f1, abs=1e-4)


def test_wandb_offline_run_holds_the_metrics(tmp_path, r18_weights):
    import glob

    weights = r18_weights
    args = [
        "data=bags", "model=abmil", "cohort.synthetic.n_slides=12", "cohort.synthetic.n_pairs=0", "data.n_folds=3",
        "backbone=timm",
        "backbone.name=resnet18", f"backbone.weights={weights}", "backbone.preset=r18", "backbone.input_px=64",
        "backbone.target_mpp=2.0", "trainer.max_epochs=2", "logger=many", "tags=[test,wandb]", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    res = run_task("train.py", *args, cwd=tmp_path, data_dir=tmp_path / "data")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1  # one offline run, ready for `wandb sync`
    # The run file is a log of protobuf records; keys and JSON values are stored as text.
    data = Path(runs[0]).read_bytes()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test/auroc", "test/f1", "val/auroc_best", "train/loss", "backbone", "optimized_metric"):
        assert key.encode() in data, key
    for key in (b"test/confusion_matrix", b"test/roc", b"test/predictions"):  # charts and the per-slide table
        assert key in data, key
    assert b"wandb" in data and b"test" in data  # the tags
    assert metrics["test/auroc"] >= 0


def test_multirun_over_folds_jobs_are_self_contained(tmp_path, r18_weights):
    weights = r18_weights
    args = [
        "--multirun", "logger=many", "data=bags", "model=abmil", "cohort.synthetic.n_slides=12", "cohort.synthetic.n_pairs=0",
        "data.n_folds=3", "fold=0,1", "backbone=timm", "backbone.name=resnet18", f"backbone.weights={weights}",
        "backbone.preset=r18", "backbone.input_px=64", "backbone.target_mpp=2.0", "trainer.max_epochs=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    res = run_task("train.py", *args, cwd=tmp_path, data_dir=tmp_path / "data")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(runs) == 2
    tests = []
    for run in runs:
        assert (run / "metrics.json").exists() and (run / "predictions.csv").exists() and (run / "checkpoints").is_dir()
        splits = pd.read_csv(run / "splits.csv")
        tests.append(set(splits.slide_id[splits.split == "test"]))
    assert tests[0].isdisjoint(tests[1])  # fold 0 and fold 1 test different slides
    # one W&B group for the whole sweep (task + sweep folder), a run per job
    for run in runs:
        wb = list(run.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(wb) == 1 and b"train-sweep" in wb[0].read_bytes()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the sweep's summaries: every job's status, and the cross-validation summary over the folds
    summary = pd.read_csv(tmp_path / "sweep" / "sweep_summary.csv")
    assert list(summary.status) == ["done", "done"]
    cv = pd.read_csv(tmp_path / "sweep" / "cv_summary.csv")
    assert len(cv) == 1 and cv.folds_done[0] == 2 and cv["pooled slides"][0] == len(tests[0] | tests[1])
    # eval.py on a job of the sweep reproduces its test metrics
    res = run_task("eval.py", f"run_dir={runs[0]}", "n_boot=20", "heatmaps.limit=1", f"hydra.run.dir={tmp_path / 'eval0'}",
                   cwd=tmp_path, data_dir=tmp_path / "data", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    e, m = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "eval0", runs[0]))
    assert e["test/auroc"] == pytest.approx(m["test/auroc"], abs=1e-6) and e["test/f1"] == pytest.approx(m["test/f1"], abs=1e-6)
    # features were extracted once and reused by the second job
    feats = list((tmp_path / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "r18").glob("*.h5"))
    assert len(feats) == 12
