"""Pathology foundation-model presets: each builds its authors' architecture, reads its authors'
weight files (a Hugging Face snapshot folder or the bare file), and embeds a tile the way its
model card says — checked against a direct call of the reference model (timm, transformers,
open_clip's pooler) with random weights saved in the authors' key layout (depth shrunk to two
blocks; the layout of those blocks is the authors')."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
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
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
# every preset's full-size embedding dimension, and its (input px, µm/px) where not 224 px at 0.5
DIMS = {**{name: card[3] for name, card in CARDS.items()}, "phikon": 768, "phikon2": 1024, "conch": 512, "conch15": 768,
        "ctranspath": 768}
RESOLUTION = {"conch": (448, 0.5), "conch15": (448, 0.5), "ctranspath": (224, 1.0)}


def _preset(name: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_config("train", [f"backbone={name}", *overrides]).backbone, resolve=True)


@pytest.mark.parametrize("name", sorted(DIMS))
def test_every_preset_builds_its_full_size_architecture_with_the_cards_dimension(name):
    spec = BackboneSpec(**{**_preset(name), "weights": None, "pretrained": False})
    with torch.device("meta"):  # the full model, without allocating its weights
        enc = Encoder(create_model(spec), spec)
        out = enc(torch.empty(2, 3, spec.input_px, spec.input_px))
    assert tuple(out.shape) == (2, DIMS[name]) == (2, spec.embed_dim)
    assert spec.label == name and (spec.input_px, spec.target_mpp) == RESOLUTION.get(name, (224, 0.5))
    if name.startswith(("hoptimus", "h0")):
        assert spec.mean == HOPTIMUS_MEAN and spec.std == HOPTIMUS_STD
    elif name == "conch":
        assert spec.mean == CLIP_MEAN
    else:
        assert spec.mean == (0.485, 0.456, 0.406)


def test_every_preset_file_has_a_test_here():
    presets = {p.stem for p in (Path(__file__).parents[3] / "conf" / "backbone").glob("*.yaml")}
    own = {"hne", "ihc", "imagenet", "alexnet_hne", "alexnet_ihc", "alexnet_imagenet", "timm"}  # tested elsewhere
    assert {p for p in presets if not p.startswith("_")} - own == set(DIMS)


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


@pytest.mark.parametrize(("name", "model_class"), [("phikon", "ViTModel"), ("phikon2", "Dinov2Model")])
def test_transformers_presets_embed_like_their_model_cards_from_a_snapshot_folder(name, model_class, tmp_path):
    import transformers

    kwargs = {**_preset(name)["model_kwargs"], "num_hidden_layers": 2}
    cls = getattr(transformers, model_class)
    torch.manual_seed(0)
    config = cls.config_class(**kwargs)
    cls(config).save_pretrained(tmp_path / name)  # the authors' snapshot: config.json + model.safetensors
    # the model card: AutoModel.from_pretrained(repo)(pixel_values=x).last_hidden_state[:, 0]
    ref = transformers.AutoModel.from_pretrained(tmp_path / name).eval()
    spec = BackboneSpec(**{**_preset(name, "++backbone.model_kwargs.num_hidden_layers=2"), "weights": str(tmp_path / name)})
    enc = build_encoder(spec)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 0]
        got = enc(x)
    assert got.shape == want.shape == (2, DIMS[name])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert enc.model.config._attn_implementation == "sdpa"


def test_conch_embeds_like_encode_image_from_the_whole_vision_language_checkpoint(tmp_path):
    from open_clip.transformer import AttentionalPooler

    torch.manual_seed(0)
    trunk = timm.create_model("vit_base_patch16_224", img_size=448, num_classes=0, dynamic_img_size=True, depth=2).eval()
    pool, ln = AttentionalPooler(512, 768, n_head=8, n_queries=1).eval(), nn.LayerNorm(512)
    for p in [*pool.parameters(), *ln.parameters()]:
        p.data.normal_(0, 0.5)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {f"visual.attn_pool_contrast.{k}": v for k, v in pool.state_dict().items()}
    state |= {f"visual.ln_contrast.{k}": v for k, v in ln.state_dict().items()}
    # the parts of CONCH's pytorch_model.bin the image embedding does not use
    state |= {"visual.proj_contrast": torch.randn(512, 512), "visual.ln_caption.weight": torch.ones(768),
              "text.token_embedding.weight": torch.randn(8, 4), "text_decoder.ln_final.weight": torch.ones(4),
              "logit_scale": torch.tensor(1.0)}
    (tmp_path / "conch").mkdir()
    torch.save(state, tmp_path / "conch" / "pytorch_model.bin")
    enc = build_encoder(BackboneSpec(**{**_preset("conch", "++backbone.model_kwargs.depth=2"), "weights": str(tmp_path / "conch")}))
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():  # encode_image(x, proj_contrast=False, normalize=False)
        want = ln(pool(trunk.forward_features(x))[:, 0])
        got = enc(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    del state["visual.ln_contrast.weight"]  # a truncated checkpoint names what is missing
    torch.save(state, tmp_path / "conch" / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="missing 1 key.* ln_contrast.weight"):
        build_encoder(BackboneSpec(**{**_preset("conch", "++backbone.model_kwargs.depth=2"), "weights": str(tmp_path / "conch")}))


def _trident_pos_embed(pos_embed, px, patch=16):
    """TRIDENT's ``interpolate_pos_encoding`` for CONCH v1.5 at a px × px input, written out."""
    n = pos_embed.shape[1] - 1
    w0 = h0 = px // patch + 0.1  # DINO's offset against floating-point error in the output size
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], dim=1)


def _flamingo_pool(tokens, p, heads=8):
    """CONCH v1.5's attentional pooler (Flamingo's, one query) by hand: (B, T, D_ctx) → (B, 1, D)."""
    b, t, _ = tokens.shape
    d = p["query"].shape[-1]
    x = F.layer_norm(tokens, (tokens.shape[-1],), p["ln_k.weight"], p["ln_k.bias"])
    q = F.layer_norm(p["query"], (d,), p["ln_q.weight"], p["ln_q.bias"]) @ p["to_q.weight"].T  # (1, D)
    k, v = (x @ p["to_kv.weight"].T).chunk(2, dim=-1)  # (B, T, D) each
    q = q.reshape(1, heads, 1, d // heads).expand(b, -1, -1, -1)  # (B, h, 1, D/h)
    k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (k, v))  # (B, h, T, D/h)
    attn = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)  # (B, h, 1, T)
    out = (attn @ v).transpose(1, 2).reshape(b, 1, d)  # (B, 1, D)
    return out @ p["to_out.weight"].T


def _conch15_state(depth=2, seed=0):
    """Random weights in the layout of CONCH v1.5's pytorch_model_vision.bin: the trunk's position
    embedding for 224 px, the pooler's to_q / to_kv / to_out without biases."""
    torch.manual_seed(seed)
    trunk = timm.create_model("vit_large_patch16_224", num_classes=0, init_values=1.0, depth=depth).eval()
    with torch.no_grad():  # a position embedding and LayerScale far from their init, so both matter
        trunk.pos_embed.normal_(0, 1)
        for name, p in trunk.named_parameters():
            if name.endswith("gamma"):
                p.normal_(1, 0.2)
    pool = {"query": torch.randn(1, 768), "ln_k.weight": 1 + 0.1 * torch.randn(1024), "ln_k.bias": 0.1 * torch.randn(1024),
            "ln_q.weight": 1 + 0.1 * torch.randn(768), "ln_q.bias": 0.1 * torch.randn(768),
            "to_q.weight": 0.05 * torch.randn(768, 768), "to_kv.weight": 0.05 * torch.randn(1536, 1024),
            "to_out.weight": 0.05 * torch.randn(768, 768)}
    state = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {f"attn_pool_contrast.{k}": v for k, v in pool.items()}
    state |= {"ln_contrast.weight": 1 + 0.1 * torch.randn(768), "ln_contrast.bias": 0.1 * torch.randn(768)}
    return trunk, pool, state


def test_conch15_embeds_like_tridents_forward_from_its_vision_checkpoint(tmp_path):
    trunk, pool, state = _conch15_state()
    assert state["trunk.pos_embed"].shape == (1, 197, 1024)  # 14 × 14 + 1: the checkpoint's 224 px grid
    snap = tmp_path / "conch15"  # as `hf download MahmoodLab/conchv1_5 --local-dir` leaves it
    snap.mkdir()
    torch.save(state, snap / "pytorch_model_vision.bin")
    (snap / "meta.yaml").write_text("model: conch_v1_5\n")
    (snap / "README.md").write_text("CONCH v1.5\n")
    enc = build_encoder(BackboneSpec(**{**_preset("conch15", "++backbone.model_kwargs.depth=2"), "weights": str(snap)}))
    assert enc.weights_source == "file" and enc.spec.embed_dim == 768
    # the position embedding TRIDENT interpolates at every 448 px forward, computed once at load
    want_pos = _trident_pos_embed(state["trunk.pos_embed"], 448)
    assert want_pos.shape == enc.model.trunk.pos_embed.shape == (1, 785, 1024)
    assert torch.equal(enc.model.trunk.pos_embed, want_pos)
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():  # TRIDENT's CONCHVisionTower.forward, written out
        t = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (2, 784, 1024)
        t = torch.cat([trunk.cls_token.expand(2, -1, -1), t], dim=1) + want_pos  # (2, 785, 1024)
        tokens = trunk.norm(trunk.blocks(t))
        pooled = _flamingo_pool(tokens, pool)  # (2, 1, 768)
        want = F.layer_norm(pooled[:, 0], (768,), state["ln_contrast.weight"], state["ln_contrast.bias"])
        got_pooled = enc.model.attn_pool_contrast(tokens)  # open_clip's pooler with the converted weights
        got = enc(x)
    torch.testing.assert_close(got_pooled, pooled, atol=1e-5, rtol=1e-4)
    assert got.shape == (2, 768) and want.std() > 0.5
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_conch15_names_what_does_not_fit(tmp_path):
    _, _, state = _conch15_state(depth=1)
    del state["ln_contrast.weight"]  # a truncated checkpoint names what is missing
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    spec = {**_preset("conch15", "++backbone.model_kwargs.depth=1"), "weights": str(tmp_path / "pytorch_model_vision.bin")}
    with pytest.raises(WeightsError, match=r"pytorch_model_vision.bin does not fit the architecture: missing 1 key\(s\) e.g. ln_contrast.weight; check"):
        build_encoder(BackboneSpec(**spec))
    # CONCH v1's image tower (ViT-B/16, 512-d pooler) where v1.5's is expected: the wrong download
    trunk = timm.create_model("vit_base_patch16_224", img_size=448, num_classes=0, dynamic_img_size=True, depth=1)
    from open_clip.transformer import AttentionalPooler

    v1 = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    v1 |= {f"visual.attn_pool_contrast.{k}": v for k, v in AttentionalPooler(512, 768, n_head=8, n_queries=1).state_dict().items()}
    v1 |= {"visual.ln_contrast.weight": torch.ones(512), "visual.ln_contrast.bias": torch.zeros(512)}
    torch.save(v1, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pytorch_model.bin does not fit the architecture: missing 2 key\(s\) e.g. "
                       r"trunk.blocks.0.ls1.gamma.*shape mismatch at attn_pool_contrast.attn.in_proj_bias: file \(1536,\) vs model \(2304,\)"):
        build_encoder(BackboneSpec(**{**spec, "weights": str(tmp_path / "pytorch_model.bin")}))


def test_conch15_from_the_hub_is_its_vision_file(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    _, _, state = _conch15_state(depth=1)
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    asked = []

    def download(repo_id, filename, **_):  # MahmoodLab/conchv1_5 holds meta.yaml and pytorch_model_vision.bin
        asked.append((repo_id, filename))
        if filename != "pytorch_model_vision.bin":
            raise EntryNotFoundError(f"404 {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    enc = build_encoder(BackboneSpec(**{**_preset("conch15", "++backbone.model_kwargs.depth=1"), "weights": "hub"}))
    assert asked[-1] == ("MahmoodLab/conchv1_5", "pytorch_model_vision.bin") and enc.weights_source == "hub"
    assert torch.equal(enc.model.trunk.pos_embed, _trident_pos_embed(state["trunk.pos_embed"], 448))


def test_ctranspath_loads_the_authors_timm_0_5_checkpoint_layout(tmp_path):
    import re

    from her2lab.embed.layers import ConvStem

    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, num_classes=0).eval()
    for m in ref.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    old = {}  # ctranspath.pth: {"model": …}, downsampling at the end of stages 0–2, index and mask buffers saved
    for k, v in ref.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        old[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v
    old |= {k: b for k, b in ref.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))}
    assert "layers.0.downsample.reduction.weight" in old and sum("attn_mask" in k for k in old) == 5
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    enc = build_encoder(BackboneSpec(**{**_preset("ctranspath"), "weights": str(tmp_path / "ctranspath.pth")}))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # the authors' forward: mean of the last stage's tokens after the final norm
        want = ref.norm(ref.layers(ref.patch_embed(x))).mean((1, 2))
        got = enc(x)
    assert got.shape == (2, 768)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    swin_s = timm.create_model("swin_small_patch4_window7_224", embed_layer=ConvStem, num_classes=0)  # 18 blocks in stage 2
    torch.save({"model": swin_s.state_dict()}, tmp_path / "swin_s.pth")
    with pytest.raises(WeightsError, match=r"swin_s.pth does not fit the architecture: unexpected 156 key\(s\) e.g. layers.2.blocks.10."):
        build_encoder(BackboneSpec(**{**_preset("ctranspath"), "weights": str(tmp_path / "swin_s.pth")}))


def test_a_gated_repository_says_how_to_get_access(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, filename, **_):  # what the hub answers a token without access
        raise GatedRepoError(f"Access to model {repo_id} is restricted.", response=None)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(WeightsError, match=r"^backbone uni: MahmoodLab/UNI is gated; request access at "
                       r"https://huggingface.co/MahmoodLab/UNI, log in \(`hf auth login` or HF_TOKEN\) and retry; or, offline"):
        build_encoder(BackboneSpec(**{**_preset("uni", "++backbone.model_kwargs.depth=1"), "weights": "hub"}))
