"""Features that her2lab did not make: non-finite values are refused (or, on request, the bad tiles
left out and listed); a run whose loss turns non-finite stops with an error and no metrics; no
metric is computed over non-finite probabilities; huge bags stay in the file's dtype and are
scored chunk by chunk, with the same result as the whole-bag forward pass.

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
from hydra import compose, initialize_config_dir

from her2lab import CONF_DIR
from her2lab.errors import Her2labError

CLASSES = ("0", "1+", "2+", "3+")
N_TILES, DIM = 40, 32


def _trident(path: Path, feats: np.ndarray) -> Path:
    """A features file in TRIDENT's layout, written by hand (no her2lab attributes)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats), np.int64)], 1))
    return path


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
            _trident(folder / f"{sid}.h5", (rng.standard_normal((N_TILES, DIM)) + 0.5 * c).astype(np.float32))
            rows.append({"slide_id": sid, "patient_id": f"p{c}{k}", "path": f"slides/{sid}.svs", "her2_score": score,
                         "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv", folder


def _cfg(manifest: Path, folder: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", [
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


def test_read_features_keeps_the_file_dtype_and_refuses_or_drops_inf_rows(tmp_path):
    from her2lab.embed.features_file import load_bag, read_features

    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float16)
    x[[3, 40], 5] = np.inf  # float16 overflow in an encoder looks like this
    x[41, 0] = -np.inf
    path = _trident(tmp_path / "f16.h5", x)
    with pytest.raises(Her2labError, match=r"f16\.h5: 3 of 50 tiles have non-finite features .*row 3"):
        read_features(path)
    feats, coords, dropped = load_bag(path, nonfinite="drop_tiles")
    keep = np.setdiff1d(np.arange(50), [3, 40, 41])
    assert feats.dtype == np.float16 and dropped == 3
    assert np.array_equal(feats, x[keep]) and np.array_equal(coords[:, 0], keep * 256)
    f32, _ = read_features(_trident(tmp_path / "f64.h5", x[keep].astype(np.float64)))
    assert f32.dtype == np.float32  # float64 files are halved, never kept at 8 bytes a value
    _poison(path, list(range(50)), np.nan)
    with pytest.raises(Her2labError, match="no finite tile"):
        load_bag(path, nonfinite="drop_tiles")
    with pytest.raises(Her2labError, match=r"data.nonfinite='skip': use error or drop_tiles"):
        load_bag(path, nonfinite="skip")


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


# --- bounded memory: file dtype in the cache, chunked whole-bag forward -----------------------------------


def _nets():
    from her2lab.models.abmil import AttentionMIL
    from her2lab.models.pooling import MaxPoolMIL, MeanPoolMIL

    torch.manual_seed(0)
    return [AttentionMIL(24, 4, dropout=0.0), AttentionMIL(24, 3, gated=False, hidden_dim=0, dropout=0.0),
            AttentionMIL(24, 4, dropout=0.0, ordinal=True), MeanPoolMIL(24, 4, dropout=0.0), MaxPoolMIL(24, 4, dropout=0.0)]


def test_chunked_forward_equals_the_whole_bag_forward():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((3, 1000, 24)).astype(np.float16))  # (B, N, D) in the file's dtype
    mask = torch.ones(3, 1000, dtype=torch.bool)
    mask[1, 700:] = False  # a shorter bag, padded
    mask[2, 5:] = False  # shorter than one chunk: later chunks are all padding
    for net in _nets():
        net.eval()
        with torch.no_grad():
            whole_logits, whole_w = net(x.float(), mask)
            for chunk in (64, 333, 1000, 4096):
                logits, w = net(x, mask, chunk=chunk)
                assert logits.dtype == torch.float32 and w.shape == (3, 1000)
                assert torch.allclose(logits, whole_logits, atol=1e-5), (type(net).__name__, chunk)
                assert torch.allclose(w, whole_w, atol=1e-5) and (w[1, 700:] == 0).all()
                assert torch.allclose(w.sum(1), torch.ones(3), atol=1e-5)
        grads = []  # training on bags longer than a chunk: the same gradients
        for chunk in (None, 333):
            net.zero_grad()
            logits, w = net(x, mask, chunk=chunk)
            (logits.sum() + (w * torch.arange(1000.0)).sum()).backward()
            grads.append(torch.cat([q.grad.flatten() for q in net.parameters() if q.grad is not None]))
        assert torch.allclose(grads[0], grads[1], atol=1e-4 * float(grads[0].abs().max()))


def test_the_bag_cache_keeps_float16_and_a_lone_test_bag_is_not_copied(tmp_path):
    from her2lab.data.bags import BagDataModule, BagRecord
    from her2lab.lit.mil_module import MILModule

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 24)).astype(np.float16)
    recs = [BagRecord("big", str(_trident(tmp_path / "big.h5", x)), 2)]
    dm = BagDataModule({"train": recs, "test": recs}, embed_dim=24, bag_size=100, batch_size=1)
    dm.setup()
    assert dm.datasets["test"].cache[0].dtype == np.float16  # 2 bytes a value, as in the file
    batch = next(iter(dm.test_dataloader()))
    feats, mask = batch[0], batch[1]
    assert feats.dtype == torch.float16 and feats.shape == (1, 3000, 24) and mask.all()
    assert feats.data_ptr() == dm.datasets["test"].cache[0].__array_interface__["data"][0]  # a view, not a copy
    sub = next(iter(dm.train_dataloader()))[0]
    assert sub.shape == (1, 100, 24) and sub.dtype == torch.float16
    net = _nets()[0].eval()
    module = MILModule(net, 4, optimizer=torch.optim.Adam, chunk=256).eval()
    with torch.no_grad():
        logits, _, _ = module.logits_of(batch)
        ref, _ = net(torch.from_numpy(x.astype(np.float32))[None])
    assert torch.allclose(logits, ref, atol=1e-5)


def test_attention_maps_leave_out_non_finite_tiles(tmp_path):
    """Heatmaps read the file themselves: with ``data.nonfinite=drop_tiles`` they see the same
    tiles as the model did."""
    from her2lab.explain.heatmaps import bag_attention

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 24)).astype(np.float16)
    x[[10, 299], 3] = np.nan
    path = _trident(tmp_path / "s.h5", x)
    keep = np.setdiff1d(np.arange(300), [10, 299])
    for net in _nets():
        net.eval()
        att = bag_attention(net, path, lambda z: z.softmax(-1), chunk=64)
        logits, w = net(torch.from_numpy(x[keep].astype(np.float32))[None])
        assert np.array_equal(att.coords[:, 0], keep * 256) and np.isfinite(att.tile_probs).all()
        assert np.allclose(att.attention, w[0].detach().numpy(), atol=1e-6)
        assert np.allclose(att.probs, logits.softmax(-1)[0].detach().numpy(), atol=1e-5)
