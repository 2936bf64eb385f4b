"""What a training run's ``metrics.json`` says: the validation metrics of the epoch it selected
(not of the last epoch), and a run from a features folder takes the feature size from the files.

The cohort is a hand-written manifest and features files written with h5py in her2lab's layout
(``features`` (N, D) float16, ``coords`` (N, 2) and the encoder's attributes), 16 slides of
24-d features, a size no backbone preset has.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_config

pytestmark = pytest.mark.slow  # every test trains through the training task

CLASSES = ("0", "1+", "2+", "3+")
N_TILES, DIM = 24, 24


def _write_features(path: Path, feats: np.ndarray) -> None:
    """One slide's features file as her2lab's extraction lays it out."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float16))
        xs = np.arange(len(feats)) * 64
        f.create_dataset("coords", data=np.stack([xs, np.zeros_like(xs)], 1))
        f.attrs.update({"slide_id": path.stem, "encoder": "resnet18", "encoder_source": "timm",
                        "backbone": "hand", "encoder_weights": "random",
                        "embed_dim": feats.shape[1], "input_px": 64, "target_mpp": 2.0,
                        "patch_px": 64, "pooling": "model", "features_dtype": "float16"})


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> tuple[Path, Path]:
    """16 slides, 4 a class (2 train, 1 val, 1 test by a split column), features whose mean shifts
    with the class; (manifest, features folder)."""
    root = tmp_path_factory.mktemp("features")
    folder = root / "features"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for c, score in enumerate(CLASSES):
        for k, split in enumerate(("train", "train", "val", "test")):
            sid = f"s{c}{k}"
            _write_features(folder / f"{sid}.h5", rng.standard_normal((N_TILES, DIM)) + 0.3 * c)
            rows.append({"slide_id": sid, "patient_id": f"p{c}{k}", "path": f"slides/{sid}.svs",
                         "her2_score": score, "split": split})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv", folder


def _train(manifest: Path, folder: Path, out: Path, *overrides: str) -> dict:
    from her2lab.run.train import train

    train(compose_config("train", [
        f"paths.data_dir={out.parent / 'data'}", "cohort=custom", f"cohort.manifest={manifest}",
        f"data.features_dir={folder}", "data.module.bag_size=12", "data.module.batch_size=4",
        "trainer.accelerator=cpu", f"paths.output_dir={out}", "logger=csv", *overrides,
    ]))
    return json.loads((out / "metrics.json").read_text())


def test_metrics_json_holds_the_selected_epochs_validation_metrics(features, tmp_path):
    manifest, folder = features
    out = tmp_path / "run"
    # select by the highest validation loss: an early epoch, so the last one's values would differ
    m = _train(manifest, folder, out, "trainer.max_epochs=4", "model.optimizer.lr=0.01",
               "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=max")
    log = pd.read_csv(next(out.glob("csv/*/metrics.csv")))
    val = log.dropna(subset=["val/loss"]).set_index("epoch")
    assert list(val.index) == [0, 1, 2, 3]
    best = int(val["val/loss"].idxmax())
    assert m["selected_epoch"] == best
    assert Path(m["best_checkpoint"]).name == f"best_epoch{best:03d}.ckpt"
    assert best != 3, "the test needs a selected epoch that is not the last"
    shown = [k for k in m if k.startswith("val/") and not k.endswith("_best")]
    assert {"val/auroc", "val/f1", "val/acc", "val/bacc", "val/qwk", "val/loss"} <= set(shown)
    for k in shown:
        assert m[k] == pytest.approx(val.loc[best, k], abs=1e-6), k
    assert m["val/loss"] != pytest.approx(val.loc[3, "val/loss"], abs=1e-6)  # not the last epoch's
    # the running best, as it ended
    assert m["val/auroc_best"] == pytest.approx(val["val/auroc"].max(), abs=1e-6)


def test_a_features_folder_of_another_size_trains_without_setting_embed_dim(features, tmp_path):
    manifest, folder = features
    out = tmp_path / "run"
    # backbone=hne's preset says 512; the files are 24-d and nothing says so on the command line
    m = _train(manifest, folder, out, "backbone=hne", "trainer.max_epochs=1")
    assert 0 <= m["test/auroc"] <= 1
    cfg = OmegaConf.load(out / "config.yaml")
    assert cfg.backbone.embed_dim == DIM and cfg.model.net.in_dim == DIM
