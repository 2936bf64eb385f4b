"""The transfer-learning step end to end: train a patch classifier, export, embed with it."""

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from her2lab.embed.backbones import (
    BackboneSpec,
    build_encoder,
    create_model,
    file_sha256,
    headless_state,
    read_state_dict,
)
from tests.helpers import run_task

pytestmark = pytest.mark.slow  # every test launches train.py or extract


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_task("train.py", *args, cwd=tmp_path, data_dir=tmp_path / "data", log_dir=tmp_path / "logs")


SMALL = ["cohort.synthetic.n_slides=12", "data.n_folds=3", "trainer.max_epochs=2", "data.module.tiles_per_slide=8",
         "data.module.eval_tiles_per_slide=4", "data.module.batch_size=16"]


def test_pretrain_export_and_embed_round_trip(tmp_path):
    enc_path = tmp_path / "data" / "encoders" / "hne.safetensors"
    res = _train(tmp_path, "experiment=pretrain_hne", "backbone.input_px=64", "backbone.target_mpp=2.0", *SMALL,
                 "hydra.run.dir=" + str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert enc_path.exists() and (tmp_path / "run" / "encoder.safetensors").exists()
    run = tmp_path / "run"
    assert (run / "metrics.json").exists() and (run / "splits.csv").exists() and (run / "config.yaml").exists()
    # The export is the best checkpoint's encoder.
    best = next((run / "checkpoints").glob("best_*.ckpt"))
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    spec = BackboneSpec(name="resnet18", input_px=64, target_mpp=2.0, pretrained=False)
    clf = create_model(spec, num_classes=4)
    clf.load_state_dict({k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    exported, meta = read_state_dict(enc_path)
    for k, v in headless_state(clf, spec).items():
        assert torch.equal(exported[k], v), k
    assert meta["cohort"] == "pretrain_hne" and meta["labels"] == "her2_4way"
    # backbone=hne finds it, and the features say which weights made them.
    enc = build_encoder(BackboneSpec(name="resnet18", input_px=64, target_mpp=2.0, weights=str(enc_path), preset="hne"))
    assert enc.weights_source == "file" and enc.weights_sha256 == file_sha256(enc_path)
    res = run_task("her2lab.extract", "cohort=demo", "cohort.synthetic.n_slides=4", "cohort.synthetic.n_pairs=1",
                   "backbone=hne", "backbone.input_px=64", "backbone.target_mpp=2.0", "prepare.qc=false",
                   cwd=tmp_path, data_dir=tmp_path / "data", log_dir=tmp_path / "logs", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted((tmp_path / "data" / "demo" / "features" / "2mpp_64px_0px_overlap" / "hne").glob("*.h5"))
    assert len(files) == 4
    with h5py.File(files[0]) as f:
        assert f.attrs["encoder_weights_sha256"] == file_sha256(enc_path) and f.attrs["backbone"] == "hne"
        assert f["features"].shape[1] == 512 and np.isfinite(f["features"][:]).all()


def test_pretrain_alexnet_ihc_the_studys_encoder(tmp_path):
    import json

    from omegaconf import OmegaConf

    res = _train(tmp_path, "experiment=pretrain_ihc", "backbone=alexnet_ihc", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    path = tmp_path / "data" / "encoders" / "alexnet_ihc.safetensors"
    enc = build_encoder(BackboneSpec(name="alexnet", source="torchvision", input_px=96, weights=str(path), embed_dim=1024))
    assert enc(torch.zeros(2, 3, 96, 96)).shape == (2, 1024)
    # the study's normalisation: the mean/std of the tiles the encoder trained on, not ImageNet's,
    # recorded in the run's config and stored with the encoder, where the preset (mean: null) reads it
    ran = OmegaConf.load(tmp_path / "run" / "config.yaml").backbone
    mean, std = tuple(ran.mean), tuple(ran.std)
    assert mean != (0.485, 0.456, 0.406) and all(0 < m < 1 for m in mean) and all(0 < s < 0.5 for s in std)
    stored = json.loads(read_state_dict(path)[1]["her2lab_backbone"])
    assert (tuple(stored["mean"]), tuple(stored["std"])) == (mean, std)
    preset = build_encoder(BackboneSpec(name="alexnet", source="torchvision", input_px=96, weights=str(path),
                                        embed_dim=1024, mean=None, std=None))
    assert (preset.spec.mean, preset.spec.std) == (mean, std)


def test_missing_pretrained_encoder_says_how_to_make_it(tmp_path):
    res = run_task("her2lab.extract", "backbone=ihc", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path, data_dir=tmp_path / "data",
                   timeout=120)
    assert res.returncode == 1
    assert "ihc.safetensors not found; check backbone.weights" in res.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("n_classes", [2])
def test_patch_folder_training(tmp_path, n_classes):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(n_classes):
            d = tmp_path / "patches" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(8):
                img = np.full((48, 48, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 20, (48, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    res = _train(tmp_path, "data=patch_folder", "model=patch_classifier", f"data.module.root={tmp_path / 'patches'}", "labels=binary",
                 "backbone=timm", "backbone.name=resnet18", "backbone.input_px=48", "trainer.max_epochs=2",
                 f"export_encoder={tmp_path / 'enc.safetensors'}", "hydra.run.dir=" + str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "enc.safetensors").exists()
