"""Features that her2lab did not make: non-finite values are refused (or, on request, the bad tiles
left out and listed); a run whose loss turns non-finite stops with an error and no metrics; no
metric is computed over non-finite probabilities; a manifest id that would name a file outside
the features folder reads and writes nothing there.

The cohort is a hand-written manifest and TRIDENT-layout features files written with h5py
(``features`` (N, D), ``coords`` (N, 2), nothing else), given via ``data.features_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from her2lab.errors import Her2labError, ManifestError
from tests.helpers import compose_config, write_trident

CLASSES = ("0", "1+", "2+", "3+")
N_TILES, DIM = 40, 32


@pytest.fixture
def trident(tmp_path) -> tuple[Path, Path]:
    """16 slides, 4 a class (2 train, 1 val, 1 test, fixed by a split column), features whose
    mean shifts with the class; returns (manifest, features folder)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "trident"
    folder.mkdir()
    rows = []
    for c, score in enumerate(CLASSES):
        for k, split in enumerate(("train", "train", "val", "test")):
            sid = f"s{c}{k}"
            write_trident(folder / f"{sid}.h5", (rng.standard_normal((N_TILES, DIM)) + 0.5 * c).astype(np.float32))
            rows.append({"slide_id": sid, "patient_id": f"p{c}{k}", "path": f"slides/{sid}.svs", "her2_score": score,
                         "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv", folder


def _cfg(manifest: Path, folder: Path, out: Path, *overrides: str):
    return compose_config("train", [
        f"paths.data_dir={out.parent / 'data'}", "cohort=custom", f"cohort.manifest={manifest}",
        "backbone=timm", "backbone.name=uni_v1", f"data.features_dir={folder}", "data.module.bag_size=16",
        "data.module.batch_size=4", "trainer.max_epochs=2", "trainer.accelerator=cpu", f"paths.output_dir={out}",
        *overrides,
    ])


def _train(manifest: Path, folder: Path, out: Path, *overrides: str) -> dict:
    from her2lab.run.train import train

    train(_cfg(manifest, folder, out, *overrides))
    return json.loads((out / "metrics.json").read_text())


def _poison(path: Path, rows: list[int], value: float) -> None:
    with h5py.File(path, "r+") as f:
        x = f["features"][:]
        x[rows] = value
        f["features"][...] = x


# --- non-finite features on read ---------------------------------------------------------------


@pytest.mark.slow
def test_trident_file_with_a_nan_row_stops_training_with_a_one_line_error(trident, tmp_path):
    manifest, folder = trident
    _poison(folder / "s11.h5", [7], np.nan)  # one tile of one training slide
    out = tmp_path / "run"
    with pytest.raises(Her2labError) as err:
        _train(manifest, folder, out)
    msg = str(err.value)
    assert "\n" not in msg and str(folder / "s11.h5") in msg
    assert "1 of 40 tiles" in msg and "row 7" in msg and "data.nonfinite=drop_tiles" in msg
    assert not (out / "metrics.json").exists() and not (out / "predictions.csv").exists()
    assert "s11.h5" in (out / "failed.txt").read_text()


@pytest.mark.slow
def test_drop_tiles_trains_without_the_bad_tiles_and_lists_them(trident, tmp_path):
    manifest, folder = trident
    _poison(folder / "s11.h5", [7, 8], np.nan)
    out = tmp_path / "run"
    m = _train(manifest, folder, out, "data.nonfinite=drop_tiles")
    listed = pd.read_csv(out / "excluded_tiles.csv")
    assert listed.to_dict("records") == [{"slide_id": "s11", "tiles": 40, "dropped": 2, "reason": "non-finite features"}]
    preds = pd.read_csv(out / "predictions.csv")
    probs = preds[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.isfinite(m["train/loss"]) and 0 <= m["test/auroc"] <= 1


# --- non-finite loss and probabilities -------------------------------------------------------------


@pytest.mark.slow
def test_a_loss_that_turns_non_finite_stops_the_run_with_no_metrics(trident, tmp_path):
    manifest, folder = trident
    out = tmp_path / "run"
    # Adam steps of ~1e30: the loss is ~1e30 at step 1 and NaN at step 2 (4 steps an epoch)
    with pytest.raises(Her2labError) as err:
        _train(manifest, folder, out, "model.optimizer.lr=1e30", "data.module.batch_size=2")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("training loss became non-finite (nan) at epoch 0, step 2")
    assert "learning rate" in msg and "lr=1e+30" in msg and "features" in msg
    assert not (out / "metrics.json").exists() and not (out / "predictions.csv").exists()
    assert "non-finite" in (out / "failed.txt").read_text()


@pytest.mark.slow
def test_no_metric_is_computed_over_non_finite_test_probabilities(trident, tmp_path):
    """Finite but absurd features in a test slide overflow the net: an error naming the slide,
    in training's test stage and in eval.py (a checkpoint with NaN weights)."""
    from her2lab.run.evaluate import evaluate

    manifest, folder = trident
    _poison(folder / "s23.h5", list(range(N_TILES)), 3e38)  # finite float32, so the read check passes
    run = tmp_path / "run"
    with pytest.raises(Her2labError, match=r"test: non-finite class probabilities for slide s23 .*no metric"):
        _train(manifest, folder, run)
    assert not (run / "metrics.json").exists() and not (run / "predictions.csv").exists()
    ckpt = run / "checkpoints" / "last.ckpt"  # what was computed is kept
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["state_dict"]["net.classifier.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"run_dir": str(run), "ckpt_path": str(tmp_path / "nan.ckpt"), "split": "val", "n_boot": 10,
                            "seed": 0, "output_dir": str(tmp_path / "eval"), "heatmaps": {"enabled": False}})
    with pytest.raises(Her2labError, match=r"test: non-finite class probabilities for slide s02, s12, s22, s32"):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _trident_shifted(path: Path, n: int, shift: float) -> None:
    """A features file in TRIDENT's layout, written by hand."""
    rng = np.random.default_rng(int(shift * 10))
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=(rng.standard_normal((n, 32)) + shift).astype(np.float32))
        f.create_dataset("coords", data=np.stack([np.arange(n) * 256, np.zeros(n, np.int64)], 1))


def test_train_on_unsafe_id_reads_and_writes_nothing_outside(tmp_path):
    from her2lab.run.train import train

    feats = tmp_path / "features" / "trident"
    feats.mkdir(parents=True)
    rows = []
    for c, score in enumerate(("0", "1+", "2+", "3+")):
        for k, split in enumerate(("train", "train", "val", "test")):
            sid = f"s{c}{k}"
            _trident_shifted(feats / f"{sid}.h5", 12, c)
            rows.append(f"{sid},p{c}{k},slides/{sid}.svs,{score},{split}\n")
    # A file beside the features folder that "../outside" would reach.
    _trident_shifted(tmp_path / "features" / "outside.h5", 12, 3.0)
    rows[0] = "../outside,p00,slides/s00.svs,0,train\n"
    manifest = _write_text(tmp_path / "manifest.csv", "slide_id,patient_id,path,her2_score,split\n" + "".join(rows))
    out = tmp_path / "run"
    cfg = compose_config("train", [
        f"paths.data_dir={tmp_path / 'data'}", "cohort=custom", f"cohort.manifest={manifest}", "backbone=timm",
        "backbone.name=uni_v1", f"data.features_dir={feats}", "data.module.bag_size=8",
        "data.module.batch_size=4", "trainer.max_epochs=1", "trainer.accelerator=cpu", f"paths.output_dir={out}",
    ])
    before = _files(tmp_path)
    with pytest.raises(ManifestError, match=r"'../outside' on line 2 cannot name files"):
        train(cfg)
    assert not (out / "metrics.json").exists()
    assert all(out in p.parents for p in _files(tmp_path) - before)
