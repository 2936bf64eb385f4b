"""A foundation-model preset end to end: synthetic slides → tiles at its input size and mpp →
its embedding, from a local snapshot folder (random weights in the authors' layout, two blocks)."""

from __future__ import annotations

import h5py
import pytest
import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

from her2lab.run.extract import run_extract
from tests.helpers import compose_config

pytestmark = pytest.mark.slow


def test_h0mini_extracts_the_cohort_from_a_snapshot_folder_and_the_features_say_how(tmp_path):
    snap = tmp_path / "weights" / "h0mini"  # the preset's folder under paths.weights_dir
    snap.mkdir(parents=True)
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, depth=2, img_size=224,
                            mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    torch.save(ref.state_dict(), snap / "pytorch_model.bin")
    cfg = compose_config("extract", [f"paths.data_dir={tmp_path / 'data'}", f"paths.weights_dir={tmp_path / 'weights'}",
                                     "cohort.synthetic.n_slides=2", "cohort.synthetic.n_pairs=0", "num_workers=1",
                                     "backbone=h0mini", "++backbone.model_kwargs.depth=2"])
    report = run_extract(cfg)
    assert (report.status == "done").all() and len(report) == 2
    folder = tmp_path / "data" / "demo" / "features" / "0.5mpp_224px_0px_overlap" / "h0mini"
    files = sorted(folder.glob("*.h5"))
    assert len(files) == 2
    with h5py.File(files[0]) as f:
        assert f["features"].shape[1] == 768 and f["features"].shape[0] == f["coords"].shape[0] > 0
        assert f.attrs["pooling"] == "cls" and f.attrs["encoder"] == "vit_base_patch14_reg4_dinov2"
        assert f.attrs["encoder_weights"] == "file" and len(f.attrs["encoder_weights_sha256"]) == 64
        assert '"mean": [0.707223, 0.578729, 0.703617]' in f.attrs["transform"]
    again = run_extract(cfg)  # a second run finds every slide done
    assert (again.status == "skipped").all()
