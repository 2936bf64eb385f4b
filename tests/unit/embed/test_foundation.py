"""Pathology foundation-model presets: each builds its authors' architecture, reads its authors'
weight files (a Hugging Face snapshot folder or the bare file), and embeds a tile the way its
model card says — checked against a direct call of the reference timm model with random weights
saved in the authors' key layout (depth shrunk to two blocks; the layout of those blocks is the
authors')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.layers import SwiGLUPacked
from torch import nn

from her2lab.embed.backbones import BackboneSpec, Encoder, WeightsError, build_encoder, create_model
from tests.helpers import compose_config

SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _cls(out):
    return out[:, 0]


def _virchow(n_prefix):
    def pool(out):  # the model card: class token ⊕ mean of the patch tokens (registers left out)
        return torch.cat([out[:, 0], out[:, n_prefix:].mean(1)], dim=-1)

    return pool


def _model_output(out):
    return out


# preset → (timm name, the authors' timm kwargs from their model cards, the card's embedding of
# model(x), the full-size embedding dimension)
CARDS = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                                      "dynamic_img_size": True}, _model_output, 1024),
    "uni2": ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                       "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                       "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                                       "dynamic_img_size": True, **SWIGLU}, _model_output, 1536),
    "virchow": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                                         "global_pool": "", "dynamic_img_size": True, **SWIGLU}, _virchow(1), 2560),
    "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4,
                                          "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True, **SWIGLU},
                 _virchow(5), 2560),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", {"num_classes": 0, "img_size": 224, "global_pool": "token",
                                                    "init_values": 1e-5, "dynamic_img_size": False}, _model_output, 1536),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", {"num_classes": 0, "img_size": 224, "global_pool": "token",
                                                    "init_values": 1e-5, "dynamic_img_size": False}, _model_output, 1536),
    "h0mini": ("vit_base_patch14_reg4_dinov2", {"img_size": 224, "num_classes": 0, "global_pool": "",
                                                "dynamic_img_size": True, **SWIGLU}, _cls, 768),
    "gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                                              "depth": 40, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
                                              "num_classes": 0}, _model_output, 1536),
}
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)


def _preset(name: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_config("train", [f"backbone={name}", *overrides]).backbone, resolve=True)


@pytest.mark.parametrize("name", sorted(CARDS))
def test_every_preset_builds_its_full_size_architecture_with_the_cards_dimension(name):
    spec = BackboneSpec(**{**_preset(name), "weights": None, "pretrained": False})
    with torch.device("meta"):  # the full model, without allocating its weights
        enc = Encoder(create_model(spec), spec)
        out = enc(torch.empty(2, 3, spec.input_px, spec.input_px))
    assert tuple(out.shape) == (2, CARDS[name][3]) == (2, spec.embed_dim)
    assert spec.label == name and spec.target_mpp == 0.5 and spec.input_px == 224
    if name.startswith(("hoptimus", "h0")):
        assert spec.mean == HOPTIMUS_MEAN and spec.std == HOPTIMUS_STD
    else:
        assert spec.mean == (0.485, 0.456, 0.406)


@pytest.mark.slow  # about 15 s a preset here
@pytest.mark.parametrize("name", sorted(CARDS))
def test_each_preset_embeds_like_its_model_card_from_a_snapshot_folder(name, tmp_path):
    timm_name, card, embed, _ = CARDS[name]
    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, **{**card, "depth": 2}).eval()
    snap = tmp_path / name  # as `hf download <repo> --local-dir` leaves it
    snap.mkdir()
    torch.save(ref.state_dict(), snap / "pytorch_model.bin")
    (snap / "config.json").write_text(json.dumps({"architecture": timm_name, "model_args": {"depth": 2}}))
    spec = BackboneSpec(**{**_preset(name, "++backbone.model_kwargs.depth=2"), "weights": str(snap), "embed_dim": None})
    enc = build_encoder(spec)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = embed(ref(x))
        got = enc(x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert enc.weights_source == "file" and len(enc.weights_sha256) == 64


def test_virchow2_embedding_is_the_class_token_and_the_mean_of_the_patch_tokens_by_hand(tmp_path):
    spec = BackboneSpec(**{**_preset("virchow2"), "weights": None, "pretrained": False, "embed_dim": None,
                           "model_kwargs": {**_preset("virchow2")["model_kwargs"], "depth": 1}})
    enc = build_encoder(spec)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.model.forward_features(x)  # (1, 1 + 4 + 256, 1280)
        got = enc(x)
    assert tokens.shape == (1, 261, 1280) and enc.model.num_prefix_tokens == 5
    by_hand = torch.cat([tokens[0, 0], tokens[0, 5:].sum(0) / 256])
    assert got.shape == (1, 2560) and torch.allclose(got[0], by_hand, atol=1e-5)


def test_a_single_weights_file_and_a_file_of_another_model(tmp_path):
    spec = _preset("uni", "++backbone.model_kwargs.depth=1")
    ref = timm.create_model("vit_large_patch16_224", **{**CARDS["uni"][1], "depth": 1})
    torch.save(ref.state_dict(), tmp_path / "uni.bin")
    assert build_encoder(BackboneSpec(**{**spec, "weights": str(tmp_path / "uni.bin")})).weights_source == "file"
    other = timm.create_model("vit_base_patch16_224", num_classes=0, depth=1)  # ViT-B: 768-d, not UNI's 1024
    torch.save(other.state_dict(), tmp_path / "vitb.bin")
    with pytest.raises(WeightsError, match=r"vitb.bin does not fit the architecture: missing 2 key\(s\) e.g. blocks.0.ls1.gamma.*shape mismatch at "):
        build_encoder(BackboneSpec(**{**spec, "weights": str(tmp_path / "vitb.bin")}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="folder .*empty holds no weights file"):
        build_encoder(BackboneSpec(**{**spec, "weights": str(empty)}))


def test_a_preset_without_its_weights_says_where_to_get_them(tmp_path):
    spec = _preset("virchow2", f"paths.weights_dir={tmp_path}")
    assert spec["weights"] == str(tmp_path / "virchow2")
    with pytest.raises(WeightsError, match=rf"backbone virchow2: no weights at {tmp_path}/virchow2; request access at "
                       r"https://huggingface.co/paige-ai/Virchow2, then `hf download paige-ai/Virchow2 --local-dir"):
        build_encoder(BackboneSpec(**spec))


def test_feature_folders_are_named_by_the_preset_never_by_a_hub_path():
    assert BackboneSpec(name="hf-hub:paige-ai/Virchow2", preset="").label == "hf-hub_paige-ai_Virchow2"
    assert BackboneSpec(name="resnet18", preset="hf-hub:org/x").label == "hf-hub_org_x"
    assert "/" not in BackboneSpec(**{**_preset("timm", "backbone.name=hf-hub:MahmoodLab/UNI")}).label


def test_model_kwargs_may_name_timm_and_torch_layers_only():
    spec = dict(name="vit_small_patch16_224", pretrained=False, embed_dim=None, model_kwargs={"depth": 1})
    assert build_encoder(BackboneSpec(**{**spec, "model_kwargs": {"depth": 1, "act_layer": "torch.nn.SiLU"}})).spec.embed_dim == 384
    with pytest.raises(WeightsError, match=r"model_kwargs.mlp_layer='os.system': only classes of timm.layers or torch.nn"):
        build_encoder(BackboneSpec(**{**spec, "model_kwargs": {"mlp_layer": "os.system"}}))
    with pytest.raises(WeightsError, match="pooling=cls reads a ViT's tokens, but resnet18 has none"):
        build_encoder(BackboneSpec(name="resnet18", pretrained=False, pooling="cls"))


@pytest.mark.slow
def test_hub_weights_offline_and_not_cached_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HER2LAB_DATA_DIR": str(tmp_path / "data")}
    code = ("from her2lab.embed.backbones import BackboneSpec, build_encoder\n"
            "build_encoder(BackboneSpec(name='vit_small_patch16_224', weights='hub', hf_hub_id='MahmoodLab/UNI'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("WeightsError: backbone vit_small_patch16_224: MahmoodLab/UNI is not in the local Hugging Face cache "
            "and the hub cannot be reached; offline: download the files of https://huggingface.co/MahmoodLab/UNI") in proc.stderr
    assert "set backbone.weights=<folder>" in proc.stderr


def test_foundation_presets_compose_in_one_sweep():
    for name in ("hne", "uni", "virchow2"):
        cfg = compose_config("train", [f"backbone={name}"])
        assert cfg.backbone.preset == name and Path(str(cfg.data._target_)).suffix == ".BagInputs"
