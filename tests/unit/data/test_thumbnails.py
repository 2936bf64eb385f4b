"""The thumbnail path (end-to-end image models) and the patch-classifier baseline, on real
synthetic slides: input geometry, augmentations, aggregation, a run per model, Grad-CAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from her2lab.data.thumbnails import (
    ThumbnailDataset,
    ThumbRecord,
    fit_square,
    hed_jitter,
    tissue_box,
)
from her2lab.errors import Her2labError
from her2lab.models.aggregate import aggregate_tiles
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.tiling import TilingParams
from her2lab.slides.tissue import TissueParams

REPO = Path(__file__).resolve().parents[3]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _prepared(root: Path, cohort_root: Path, thumb_mpp: float = 8.0) -> tuple[PrepareSettings, pd.DataFrame]:
    manifest = pd.read_csv(cohort_root / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["path"] = [str(cohort_root / p) for p in manifest.path]
    manifest["mpp"] = np.nan
    settings = PrepareSettings(cache_dir=root, tiling=TilingParams(target_mpp=2.0, patch_px=64), tissue=TissueParams(),
                               thumb_mpp=thumb_mpp, qc=False)
    report = prepare_cohort(manifest, settings, num_workers=1)
    assert (report.status != "failed").all(), report.error.tolist()
    return settings, manifest


def _records(settings: PrepareSettings, manifest: pd.DataFrame) -> list[ThumbRecord]:
    score = {"0": 0, "1+": 1, "2+": 2, "3+": 3}
    return [ThumbRecord(r.slide_id, str(settings.thumb_path(r.slide_id)), str(settings.tiles_path(r.slide_id)), score[r.her2_score])
            for r in manifest.itertuples()]


@pytest.fixture(scope="module")
def ihc_thumbs(ihc_cohort, tmp_path_factory):
    root, _ = ihc_cohort
    settings, manifest = _prepared(tmp_path_factory.mktemp("thumbs"), root)
    return settings, manifest, _records(settings, manifest), root


def test_tissue_box_holds_all_the_tissue_and_the_input_keeps_its_aspect(ihc_thumbs):
    _, _, recs, _ = ihc_thumbs
    import h5py

    for fit in ("mpp", "long_side"):
        ds = ThumbnailDataset(recs, 8.0, 128, fit, 100.0, MEAN, STD, train=False, mask_background=False)
        masked = ThumbnailDataset(recs, 8.0, 128, fit, 100.0, MEAN, STD, train=False)
        for i, r in enumerate(recs):
            thumb = cv2.imread(r.thumb_path)
            x0, y0, x1, y1 = tissue_box(r.tiles_path, 8.0, thumb.shape[:2], 0.0)
            with h5py.File(r.tiles_path) as f:
                mask = f["tissue_mask"][:]
                s = float(f.attrs["mask_mpp"]) / 8.0
            ys, xs = np.nonzero(mask)
            assert x0 <= xs.min() * s and (xs.max() + 1) * s <= x1 + 1 and y0 <= ys.min() * s and (ys.max() + 1) * s <= y1 + 1
            img = ds.image(i)
            assert img.shape == (128, 128, 3)
            # the crop, resized with its aspect ratio, sits whole inside the square input
            h, w = ds.crops[i].shape[:2]
            content = np.argwhere((img != 255).any(-1))
            ch, cw = content.max(0) - content.min(0) + 1
            assert max(ch, cw) <= 128 and abs(cw / ch - w / h) < 0.1 * (w / h) + 2 / min(ch, cw)
            if fit == "long_side":
                assert max(ch, cw) >= 126  # the tissue's long side fills the input
            # with the default masking, outside the tissue is glass: no black slide edge, no pen
            m = masked.image(i)
            assert (m.max(-1) < 100).sum() == 0
            assert ((m[..., 2].astype(int) - m[..., 0]) > 60).sum() == 0  # blue pen
            assert (m != 255).any(-1).mean() > 0.2  # and the tissue is still there


def test_extreme_aspect_ratio_is_padded_not_cut():
    strip = np.zeros((20, 400, 3), np.uint8)
    out = fit_square(strip, 64, 1.0)
    content = np.argwhere((out != 255).any(-1))
    assert out.shape == (64, 64, 3)
    assert content[:, 1].min() == 0 and content[:, 1].max() == 63  # full width
    assert 2 <= content[:, 0].max() - content[:, 0].min() + 1 <= 4  # height scaled by the same factor


def test_augmentations_keep_labels_and_image_statistics(ihc_thumbs):
    _, _, recs, _ = ihc_thumbs
    plain = ThumbnailDataset(recs, 8.0, 128, "mpp", 100.0, MEAN, STD, train=False)
    aug = ThumbnailDataset(recs, 8.0, 128, "mpp", 100.0, MEAN, STD, train=True, hed_sigma=0.05, scale_jitter=0.1)
    for i in range(len(recs)):
        for epoch in range(3):
            aug.epoch = epoch
            xa, ya, ia = aug[i]
            xp, yp, ip = plain[i]
            assert ya == yp == recs[i].label and ia == ip == i
            assert xa.shape == xp.shape == (3, 128, 128) and torch.isfinite(xa).all()
            # per-channel means stay close: stain jitter is modest, dihedral moves do not change them
            assert (xa.mean((1, 2)) - xp.mean((1, 2))).abs().max() < 0.35
    img = plain.crops[0]
    same = hed_jitter(img, np.random.default_rng(0), 0.0)
    assert np.abs(same.astype(int) - img.astype(int)).max() <= 1  # no jitter, no change
    moved = hed_jitter(img, np.random.default_rng(1), 0.05)
    assert 0 < np.abs(moved.astype(int) - img.astype(int)).mean() < 12  # a modest change


def test_patch_aggregation_on_a_hand_made_slide():
    # 10 tiles: 6 clearly 0, 4 clearly 3+ (a heterogeneous slide)
    p = torch.tensor([[0.9, 0.05, 0.03, 0.02]] * 6 + [[0.02, 0.03, 0.05, 0.9]] * 4)
    assert aggregate_tiles(p, "mean").argmax() == 0
    assert aggregate_tiles(p, "majority").argmax() == 0
    assert torch.allclose(aggregate_tiles(p, "majority")[[0, 3]], torch.tensor([0.6, 0.4]), atol=1e-4)
    assert aggregate_tiles(p, "topk", top_k=4).argmax() == 3  # its most positive tiles say 3+
    assert torch.allclose(aggregate_tiles(p, "mean"), p.mean(0))
    tie = torch.tensor([[0.6, 0.4], [0.4, 0.6]])
    assert aggregate_tiles(tie, "majority").argmax() == 1  # a tied vote goes to the higher score
    for how in ("mean", "topk", "majority"):
        assert torch.isclose(aggregate_tiles(p, how).sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="aggregation 'median'"):
        aggregate_tiles(p, "median")


def test_thumbnail_finer_than_the_slide_is_a_clear_error(ihc_cohort, tmp_path):
    root, _ = ihc_cohort
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False).head(1)
    manifest["path"] = [str(root / p) for p in manifest.path]
    manifest["mpp"] = np.nan
    settings = PrepareSettings(cache_dir=tmp_path, tiling=TilingParams(target_mpp=2.0, patch_px=64), tissue=TissueParams(),
                               thumb_mpp=0.25, qc=False)
    report = prepare_cohort(manifest, settings, num_workers=1)
    assert report.status[0] == "failed" and "finer than the slide's level 0 (0.5 µm/px)" in report.error[0]


def test_tiny_tissue_is_a_clear_error(ihc_thumbs):
    _, _, recs, _ = ihc_thumbs
    with pytest.raises(Her2labError, match="tissue spans only .* px at 400 µm/px; use a finer data.thumb_mpp"):
        # at 400 µm/px the whole 2 mm slide is 5 px
        settings = ihc_thumbs[0]
        tiny = settings.thumb_path(recs[0].slide_id).with_name("tiny.png")
        img = cv2.imread(recs[0].thumb_path)
        cv2.imwrite(str(tiny), cv2.resize(img, (5, 4), interpolation=cv2.INTER_AREA))
        ThumbnailDataset([ThumbRecord(recs[0].slide_id, str(tiny), recs[0].tiles_path, 0)], 400.0, 64, "mpp", 0.0,
                         MEAN, STD, train=False)


def test_mixed_stains_in_one_manifest_are_an_error(tmp_path):
    from omegaconf import OmegaConf

    from her2lab.data.cohort_config import check_stains
    from her2lab.errors import ManifestError

    table = pd.DataFrame({"slide_id": ["a", "b", "c"], "stain": ["hne", "ihc", "ihc"]})
    cohort = OmegaConf.create({"manifest": "m.csv", "stain": "ihc"})
    with pytest.raises(ManifestError, match=r"mixed stains in one cohort \(ihc: 2, hne: 1\)"):
        check_stains(table, cohort)
    check_stains(table, OmegaConf.merge(cohort, {"allow_mixed_stains": True}))
    with pytest.raises(ManifestError, match="slides are hne but cohort.stain=ihc"):
        check_stains(table.head(1), cohort)


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HER2LAB_DATA_DIR": str(tmp / "data"), "HER2LAB_LOG_DIR": str(tmp / "logs"), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)


def _eval_on_new_ihc_cohort(run: Path, tmp: Path) -> pd.DataFrame:
    """``eval.py`` of ``run`` on 4 new synthetic IHC slides (into ``tmp/ext``); their predictions."""
    env = {**os.environ, "HER2LAB_DATA_DIR": str(tmp / "data")}
    res = subprocess.run([sys.executable, str(REPO / "eval.py"), f"run_dir={run}", "cohort=demo_external", "cohort.stain=ihc",
                          "cohort.synthetic.n_slides=4", "n_boot=20", f"hydra.run.dir={tmp / 'ext'}"],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return pd.read_csv(tmp / "ext" / "predictions.csv")


SMALL_IHC = ["cohort=demo_ihc", "labels=her2_3way", "cohort.synthetic.n_slides=12", "cohort.synthetic.n_pairs=0", "data.n_folds=3"]


def test_convnext_on_thumbnails_runs_with_gradcam(tmp_path):
    res = _run(tmp_path, "experiment=paper_b_convnext", *SMALL_IHC, "data.module.input_px=64", "trainer.max_epochs=2",
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
    ext = _eval_on_new_ihc_cohort(run, tmp_path)
    assert len(ext) == 4 and ext.slide_id.str.startswith("ext_").all()
    assert len(list((tmp_path / "ext" / "gradcam").glob("*.png"))) == 4
    assert "external/auroc" in json.loads((tmp_path / "ext" / "metrics.json").read_text())


def test_patch_classifier_baseline_scores_slides(tmp_path):
    res = _run(tmp_path, "experiment=paper_b_patch", *SMALL_IHC, "backbone.input_px=64", "backbone.target_mpp=2.0",
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
    ext = _eval_on_new_ihc_cohort(run, tmp_path)
    assert sorted(ext.slide_id) == [f"ext_case{i:03d}_ihc" for i in range(4)]


def test_gradcam_finds_the_positive_region_better_than_chance(ihc_thumbs):
    """A ConvNeXt taught 'is this 2+/3+' on IHC thumbnails looks at the stained tumour: its
    Grad-CAM ranks the generator's positive-region pixels above the rest of the tissue."""
    from sklearn.metrics import roc_auc_score

    from her2lab.explain.gradcam import cam_maps
    from her2lab.models.image import build_image_classifier

    _, _, recs, cohort_root = ihc_thumbs
    recs = [ThumbRecord(r.slide_id, r.thumb_path, r.tiles_path, int(r.label >= 2)) for r in recs]  # 0/1+ vs 2+/3+
    ds = ThumbnailDataset(recs, 8.0, 128, "long_side", 0.0, MEAN, STD, train=False)
    x, y, _ = zip(*[ds[i] for i in range(len(ds))], strict=True)
    x, y = torch.stack(x), torch.tensor(y)
    torch.manual_seed(0)
    net = build_image_classifier("convnext_atto", num_classes=2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.3  # it learned the training slides
    aucs = []
    masks = cohort_root / "masks"
    for i, r in enumerate(recs):
        if r.label != 1:
            continue
        cam = cam_maps(net, x[i : i + 1], [1], layer="stages.2")[0]  # 8×8 map at 128 px
        pos = cv2.imread(str(masks / f"{r.slide_id}_positive.png"), cv2.IMREAD_GRAYSCALE)
        tis = cv2.imread(str(masks / f"{r.slide_id}_tissue.png"), cv2.IMREAD_GRAYSCALE)
        aucs.append(roc_auc_score(*_in_input(ds, i, pos, tis, cam)))
    assert len(aucs) >= 2 and np.mean(aucs) > 0.6, aucs  # chance is 0.5


def _in_input(ds: ThumbnailDataset, i: int, pos: np.ndarray, tis: np.ndarray, cam: np.ndarray):
    """Truth labels and CAM values of the tissue pixels of input ``i``."""
    thumb = cv2.imread(ds.records[i].thumb_path)
    x0, y0, x1, y1 = tissue_box(ds.records[i].tiles_path, 8.0, thumb.shape[:2], 0.0)
    size = (thumb.shape[1], thumb.shape[0])
    pos = cv2.resize(pos, size, interpolation=cv2.INTER_NEAREST)[y0:y1, x0:x1]
    tis = cv2.resize(tis, size, interpolation=cv2.INTER_NEAREST)[y0:y1, x0:x1]
    s = ds.base_scale(i)
    h, w = pos.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    oy, ox = (ds.input_px - nh) // 2, (ds.input_px - nw) // 2
    c = cam[oy : oy + nh, ox : ox + nw]
    pos = cv2.resize(pos, (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    tis = cv2.resize(tis, (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    return pos[tis], c[tis]


def test_convnext_weights_load_through_the_encoder_mechanism_and_stages_freeze(tmp_path):
    from safetensors.torch import save_file

    from her2lab.embed.backbones import WeightsError
    from her2lab.models.image import build_image_classifier

    torch.manual_seed(0)
    src = build_image_classifier("convnext_atto", num_classes=4)
    # a her2lab Lightning checkpoint (keys under "net."), its 4-class head ignored
    state = {f"net.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "lightning.ckpt")
    net = build_image_classifier("convnext_atto", num_classes=3, weights=str(tmp_path / "lightning.ckpt"), freeze_stages=2)
    for k, v in net.state_dict().items():
        if not k.startswith("head.fc"):
            assert torch.equal(v, src.state_dict()[k]), k
    assert net.head.fc.out_features == 3
    frozen = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("stages") else "") for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "stages.0", "stages.1"}
    save_file({k: v for k, v in build_image_classifier("resnet18", 2).state_dict().items() if not k.startswith("fc")},
              str(tmp_path / "r18.safetensors"))
    with pytest.raises(WeightsError, match="does not fit the architecture"):
        build_image_classifier("convnext_atto", 3, weights=str(tmp_path / "r18.safetensors"))
    with pytest.raises(WeightsError, match="freeze_stages=9: the model has 4 stages"):
        build_image_classifier("convnext_atto", 3, freeze_stages=9)


def test_thumbnail_coarser_than_the_lowest_level_is_made_by_downsampling(ihc_cohort, tmp_path):
    root, cfg = ihc_cohort
    settings, manifest = _prepared(tmp_path, root, thumb_mpp=64.0)  # lowest level: 8 µm/px
    img = cv2.imread(str(settings.thumb_path(manifest.slide_id[0])))
    assert img.shape[:2] == (round(cfg.height_px * cfg.mpp / 64), round(cfg.width_px * cfg.mpp / 64))
