"""Foundation-model presets end to end: synthetic slides → tiles at the preset's input size and
µm/px → its embedding, from a local weights folder in the authors' layout (random weights, one or
two blocks). One preset per source: timm (H0-mini, with registers), transformers (Phikon), CONCH
(448 px, the whole vision-language checkpoint) and CTransPath (1.0 µm/px, timm 0.5 layout)."""

from __future__ import annotations

import re

import h5py
import pytest
import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

from her2lab.run.extract import run_extract
from tests.helpers import compose_config

pytestmark = pytest.mark.slow


def _h0mini(folder):
    ref = timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, depth=2, img_size=224,
                            mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")


def _phikon(folder):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(num_hidden_layers=1, layer_norm_eps=1e-6)).save_pretrained(folder)


def _conch(folder):
    from open_clip.transformer import AttentionalPooler

    trunk = timm.create_model("vit_base_patch16_224", img_size=448, num_classes=0, depth=1)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {f"visual.attn_pool_contrast.{k}": v for k, v in AttentionalPooler(512, 768, n_head=8, n_queries=1).state_dict().items()}
    state |= {f"visual.ln_contrast.{k}": v for k, v in nn.LayerNorm(512).state_dict().items()}
    torch.save({**state, "text.token_embedding.weight": torch.zeros(8, 4), "logit_scale": torch.ones(())},
               folder / "pytorch_model.bin")


def _ctranspath(folder):
    from her2lab.embed.layers import ConvStem

    ref = timm.create_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, num_classes=0)
    old = {}
    for k, v in ref.state_dict().items():  # timm 0.5: a stage's downsampling at its end
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        old[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v
    torch.save({"model": old}, folder / "ctranspath.pth")


# preset → (authors' weights writer, overrides that shrink it, dim, features folder, pooling, encoder)
PRESETS = {
    "h0mini": (_h0mini, ["++backbone.model_kwargs.depth=2"], 768, "0.5mpp_224px_0px_overlap", "cls",
               "vit_base_patch14_reg4_dinov2"),
    "phikon": (_phikon, ["++backbone.model_kwargs.num_hidden_layers=1"], 768, "0.5mpp_224px_0px_overlap", "cls", "vit"),
    "conch": (_conch, ["++backbone.model_kwargs.depth=1"], 512, "0.5mpp_448px_0px_overlap", "model", "vit_base_patch16_224"),
    "ctranspath": (_ctranspath, [], 768, "1mpp_224px_0px_overlap", "model", "swin_tiny_patch4_window7_224"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_extracts_the_cohort_from_its_weights_folder_and_the_features_say_how(name, tmp_path):
    write, shrink, dim, tiling, pooling, encoder = PRESETS[name]
    folder = tmp_path / "weights" / name  # the preset's folder under paths.weights_dir
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    write(folder)
    cfg = compose_config("extract", [f"paths.data_dir={tmp_path / 'data'}", f"paths.weights_dir={tmp_path / 'weights'}",
                                     "cohort.synthetic.n_slides=2", "cohort.synthetic.n_pairs=0", "num_workers=1",
                                     f"backbone={name}", *shrink])
    report = run_extract(cfg)
    assert (report.status == "done").all() and len(report) == 2
    files = sorted((tmp_path / "data" / "demo" / "features" / tiling / name).glob("*.h5"))
    assert len(files) == 2
    with h5py.File(files[0]) as f:
        assert f["features"].shape[1] == dim and f["features"].shape[0] == f["coords"].shape[0] > 0
        assert f.attrs["pooling"] == pooling and f.attrs["encoder"] == encoder
        assert f.attrs["encoder_weights"] == "file" and len(f.attrs["encoder_weights_sha256"]) == 64
        if name == "h0mini":
            assert '"mean": [0.707223, 0.578729, 0.703617]' in f.attrs["transform"]
    again = run_extract(cfg)  # a second run finds every slide done
    assert (again.status == "skipped").all()
