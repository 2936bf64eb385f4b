"""The debug options and early stopping on a small real cohort: Lightning's fast dev run, a few
batches, overfitting, the profiler; checkpoints and loggers where each mode has them.

The cohort (12 synthetic H&E slides) and its ResNet-18 features (random weights, 64 px at
2 µm/px) are made once; every run here reuses them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_config, run_task, save_random_weights

pytestmark = pytest.mark.slow  # every test trains (in-process or through train.py)


def _base(root: Path) -> list[str]:
    return [
        f"paths.data_dir={root / 'data'}",
        "cohort.synthetic.n_slides=12",
        "cohort.synthetic.n_pairs=0",
        "data.n_folds=3",
        "backbone=timm",
        "backbone.name=resnet18",
        f"backbone.weights={root / 'r18.pt'}",
        "backbone.preset=r18",
        "backbone.input_px=64",
        "backbone.target_mpp=2.0",
        "data.module.bag_size=8",
        "data.module.batch_size=1",
        "prepare.qc=false",
        "extras.print_config=false",
    ]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Data folder with a 12-slide H&E demo cohort, its tiles and features."""
    from her2lab.run.extract import run_extract

    root = tmp_path_factory.mktemp("debug")
    save_random_weights(root / "r18.pt")
    report = run_extract(
        compose_config("train", [*_base(root), f"paths.output_dir={root / 'extract'}"])
    )
    assert (report.status == "done").sum() == 12
    return root


@pytest.fixture(autouse=True)
def _torch_flags():
    """The debug trainer turns deterministic algorithms on for the process: put them back."""
    was, env = (
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(was)
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _train(root: Path, out: Path, *overrides: str) -> dict:
    from her2lab.run.train import train

    train(compose_config("train", [*_base(root), f"paths.output_dir={out}", *overrides]))
    return json.loads((out / "metrics.json").read_text())


def _steps(run: Path) -> int:
    return int(
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
            "global_step"
        ]
    )


def test_fast_dev_run_goes_through_without_checkpoints_or_loggers(cohort, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="her2lab")
    m = _train(
        cohort, tmp_path, "debug=fdr", "logger=many"
    )  # W&B and TensorBoard asked for, none written
    assert m["best_checkpoint"] == "" and "test/auroc" in m
    assert not (tmp_path / "checkpoints").exists()
    assert not any(p.name in ("wandb", "tensorboard", "csv") for p in tmp_path.rglob("*")), sorted(
        tmp_path.rglob("*")
    )
    assert (
        len((tmp_path / "predictions.csv").read_text().splitlines()) == 2
    )  # one test batch: one slide
    assert "fast_dev_run: no checkpoint was saved; testing the last weights" in caplog.text
    assert "no best checkpoint" not in caplog.text


def test_limit_trains_a_few_batches_and_tests_the_best_epoch(cohort, tmp_path):
    m = _train(cohort, tmp_path, "debug=limit")
    assert m["epochs_trained"] == 3 and Path(m["best_checkpoint"]).is_file()
    assert _steps(tmp_path) == 3 * 2  # 2 of the training split's bags an epoch (batch size 1)
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) <= 1 + 4


def test_overfit_repeats_the_same_batches(cohort, tmp_path):
    m = _train(cohort, tmp_path, "debug=overfit", "trainer.max_epochs=3")
    assert m["epochs_trained"] == 3 and _steps(tmp_path) == 3 * 2


def test_profiler_writes_its_report_to_the_run_folder(cohort, tmp_path):
    _train(cohort, tmp_path, "debug=profiler")
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and (tmp_path / "test-profile.txt").is_file()


def test_early_stopping_stops_when_the_metric_stalls(cohort, tmp_path):
    # no change of AUROC can reach min_delta=1: the first epoch sets the score and one more ends the run
    m = _train(
        cohort,
        tmp_path,
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1.0",
        "trainer.max_epochs=10",
    )
    assert m["epochs_trained"] == 2 and Path(m["best_checkpoint"]).is_file()


def test_train_py_debug_fdr_runs_under_the_debug_folder_and_prints_the_config(cohort):
    logs = cohort / "logs"
    args = [a for a in _base(cohort) if a != "extras.print_config=false"]
    res = run_task(
        "train.py", *args, "debug=fdr", "logger=wandb", cwd=cohort, log_dir=logs, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (logs / "debug" / "runs").iterdir()
    assert (run / "metrics.json").is_file() and not (run / "wandb").exists()
    tree = (run / "config_tree.log").read_text()
    assert tree.startswith("CONFIG") and "fast_dev_run: true" in tree and "task_name: debug" in tree
    assert "── trainer" in res.stdout and "fast_dev_run: true" in res.stdout
