"""Runs on input her2lab did not make: checkpoints from elsewhere are read as data only (a file
that would run code is refused), a run trained from another tool's features (TRIDENT layout,
no thumbnails, no encoder) trains and evaluates.

The foreign cohort is written by hand: pyramidal TIFFs with tifffile, a manifest CSV, and
features files with h5py in TRIDENT's layout (``features`` (N, D) float32, ``coords`` (N, 2)
int64 with ``patch_size_level0`` among its attributes, nothing of her2lab's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from omegaconf import OmegaConf

from her2lab.errors import Her2labError
from tests.helpers import compose_config, gradient_rgb, hostile_checkpoint, run_task
from tests.helpers import eval_config as _eval_cfg
from tests.helpers import train_run as _train

pytestmark = pytest.mark.slow  # every test uses a trained run

W, H, MPP, PATCH = 1024, 768, 1.0, 128  # slide size (level 0), µm/px, tile size at level 0
DIM = 24


def _write_slide(path: Path, seed: int) -> None:
    """A two-level tiled TIFF with its µm/px in the resolution tags, as a scanner writes one."""
    img = gradient_rgb(H, W, seed)
    res = 1e4 / MPP
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression="jpeg", photometric="rgb", resolution=(res, res),
                 resolutionunit="CENTIMETER")
        tw.write(img[::4, ::4].copy(), tile=(64, 64), compression="jpeg", photometric="rgb", subfiletype=1,
                 resolution=(res / 4, res / 4), resolutionunit="CENTIMETER")


def _write_trident(path: Path, feats: np.ndarray) -> None:
    """Features in TRIDENT's layout: the tile grid's level-0 corners and attributes on ``coords``."""
    ys, xs = np.mgrid[0:H:PATCH, 0:W:PATCH]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)[: len(feats)]
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": 32, "patch_size_level0": PATCH, "level0_magnification": 10,
                        "target_magnification": 2.5, "overlap": 0, "name": path.stem})


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """9 slides (3 train + 3 train, 2 val, 2 test; binary labels) with TRIDENT features and no
    thumbnail; test slide ``t1``'s file is not where the manifest says. A run trained on them
    with ``backbone=hne`` (whose encoder weights do not exist)."""
    root = tmp_path_factory.mktemp("foreign")
    (root / "slides").mkdir()
    feats = root / "trident"
    feats.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    plan = [("a", "train", 6), ("v", "val", 2), ("t", "test", 2)]
    for prefix, split, n in plan:
        for i in range(n):
            sid, score = f"{prefix}{i}", ("0", "3+")[i % 2]
            if sid != "t1":
                _write_slide(root / "slides" / f"{sid}.tiff", seed=len(rows))
            x = rng.standard_normal((48, DIM)).astype(np.float32) + (1.0 if score == "3+" else 0.0)
            _write_trident(feats / f"{sid}.h5", x)
            rows.append({"slide_id": sid, "patient_id": f"p{sid}", "path": f"slides/{sid}.tiff", "her2_score": score,
                         "split": split})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    run = root / "run"
    _train(_cfg(root, run))
    return {"root": root, "run": run, "features": feats}


def _cfg(root: Path, out: Path, *overrides: str):
    return compose_config("train", [
        f"paths.data_dir={root / 'data'}", "cohort=custom", f"cohort.manifest={root / 'manifest.csv'}",
        "labels=binary", "backbone=hne", f"data.features_dir={root / 'trident'}", "data.module.bag_size=16",
        "data.module.batch_size=2", "trainer.max_epochs=2", "trainer.accelerator=cpu", f"paths.output_dir={out}",
        "logger=csv", *overrides,
    ])


# --- features from elsewhere: no encoder, no thumbnail ----------------------------------------------


def test_a_features_dir_run_builds_nothing_of_the_backbone(foreign):
    root, run = foreign["root"], foreign["run"]
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["test/auroc"] <= 1
    assert not (run / "pretrain_encoder").exists()  # no encoder pretraining …
    assert not (root / "data" / "pretrain_hne").exists()  # … nor its cohort
    assert not (root / "data" / "encoders").exists()
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.backbone.embed_dim == DIM  # the features say their size, not the preset (512)


def test_eval_of_a_features_dir_run_writes_metrics_and_maps_what_it_can(foreign, tmp_path, caplog):
    from her2lab.run.evaluate import evaluate

    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        evaluate(_eval_cfg(foreign["run"], out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["test/slides"] == 2 and 0 <= m["test/auroc"] <= 1
    # t0's slide is reachable: its thumbnail is made from it, and its maps drawn in the right place
    hm = out / "heatmaps"
    for f in ("t0_heatmap.png", "t0_evidence.png", "t0_tiles.png", "t0.geojson"):
        assert (hm / f).stat().st_size > 0, f
    thumb = foreign["root"] / "data" / "custom" / "thumbs" / "8mpp" / "t0.png"
    import cv2

    assert cv2.imread(str(thumb)).shape == (H * MPP // 8, W * MPP // 8, 3)
    feats = json.loads((hm / "t0.geojson").read_text())["features"]
    assert feats[1]["geometry"]["coordinates"][0][:3] == [[PATCH, 0], [2 * PATCH, 0], [2 * PATCH, PATCH]]
    # t1's slide is not: no pictures of it (its GeoJSON is level-0 coordinates, written), and
    # the warning says which slide and why
    assert sorted(p.name for p in hm.glob("t1*")) == ["t1.geojson"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "t1" in r.getMessage()]
    assert warned and "heatmaps" in warned[0] and "t1.tiff" in warned[0]


def test_a_failure_of_the_explanations_loses_no_metric(foreign, tmp_path):
    from her2lab.run.evaluate import evaluate

    out = tmp_path / "eval"
    out.mkdir()
    (out / "heatmaps").write_text("a file where the heatmaps folder would go")
    evaluate(_eval_cfg(foreign["run"], out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["test/slides"] == 2 and "test/auroc" in m


# --- checkpoints are data ---------------------------------------------------------------------------


def test_a_hostile_checkpoint_is_refused_and_runs_nothing(foreign, tmp_path):
    from her2lab.run.evaluate import evaluate

    marker = tmp_path / "ran"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(Her2labError) as err:
        evaluate(_eval_cfg(foreign["run"], tmp_path / "e", ckpt_path=str(evil)))
    msg = str(err.value)
    assert "\n" not in msg and str(evil) in msg and "could run code" in msg and "trust" in msg
    with pytest.raises(Her2labError, match="could run code"):
        _train(_cfg(foreign["root"], tmp_path / "resume", f"ckpt_path={evil}"))
    assert not marker.exists()
    # nor does a run folder's config.yaml name code to build
    other = tmp_path / "other_run"
    other.mkdir()
    rcfg = OmegaConf.load(foreign["run"] / "config.yaml")
    rcfg.model.net = {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}
    OmegaConf.save(rcfg, other / "config.yaml")
    best = json.loads((foreign["run"] / "metrics.json").read_text())["best_checkpoint"]
    with pytest.raises(Her2labError, match=r"model\.net\._target_='pathlib.Path.touch' is not a class of her2lab"):
        evaluate(_eval_cfg(other, tmp_path / "e2", ckpt_path=best))
    assert not marker.exists()
    # the command line says the same in one line
    res = run_task("eval.py", f"run_dir={foreign['run']}", f"ckpt_path={evil}", cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(f"error: {evil}: ")
    assert "Traceback" not in res.stderr and not marker.exists()
    torch.load(evil, weights_only=False)  # the file is really hostile: an unrestricted load runs it
    assert marker.exists()


def test_own_checkpoints_are_plain_data_and_resume(foreign, tmp_path):
    from torch.serialization import get_unsafe_globals_in_checkpoint

    last = foreign["run"] / "checkpoints" / "last.ckpt"
    best = Path(json.loads((foreign["run"] / "metrics.json").read_text())["best_checkpoint"])
    for ck in (last, best):
        assert get_unsafe_globals_in_checkpoint(ck) == []
    hp = torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["class_names"] == ["negative", "positive"] and "Adam" in hp["optimizer"]
    m = _train(_cfg(foreign["root"], tmp_path / "resumed", "trainer.max_epochs=3", f"ckpt_path={last}"))
    assert m["epochs_trained"] == 3 and m["best_checkpoint"]
    # a checkpoint of an earlier her2lab, with Hydra's optimiser partial and OmegaConf's list in
    # its hyper-parameters, still evaluates (those few types are allow-listed, nothing else)
    from hydra.utils import instantiate

    from her2lab.run.evaluate import evaluate

    old = torch.load(best, map_location="cpu", weights_only=True)
    old["hyper_parameters"].update(
        optimizer=instantiate({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}),
        class_names=OmegaConf.create(["negative", "positive"]))
    torch.save(old, tmp_path / "earlier.ckpt")
    assert "omegaconf.listconfig.ListConfig" in get_unsafe_globals_in_checkpoint(tmp_path / "earlier.ckpt")
    evaluate(_eval_cfg(foreign["run"], tmp_path / "e", ckpt_path=str(tmp_path / "earlier.ckpt"),
                       heatmaps={"enabled": False}))
    ran = json.loads((foreign["run"] / "metrics.json").read_text())
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["test/auroc"] == pytest.approx(ran["test/auroc"])


def test_resuming_from_a_checkpoint_of_another_model_is_a_one_line_error(foreign, tmp_path):
    from her2lab.lit.mil_module import MILModule
    from her2lab.models.pooling import MeanPoolMIL

    other = MILModule(MeanPoolMIL(DIM, 2), 2, optimizer=torch.optim.Adam)
    ckpt = tmp_path / "meanpool.ckpt"
    torch.save({"state_dict": other.state_dict(), "epoch": 1, "global_step": 4, "optimizer_states": [], "loops": {}},
               ckpt)
    with pytest.raises(Her2labError) as err:
        _train(_cfg(foreign["root"], tmp_path / "r", f"ckpt_path={ckpt}"))
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg and "does not fit" in msg and "net.attn_v.weight" in msg
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(Her2labError, match="not a readable checkpoint"):
        _train(_cfg(foreign["root"], tmp_path / "j", f"ckpt_path={junk}"))
