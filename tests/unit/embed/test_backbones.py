from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from her2lab.embed.backbones import (
    BackboneSpec,
    WeightsError,
    build_encoder,
    create_model,
    headless_state,
    read_state_dict,
    save_encoder,
)
from tests.helpers import hostile_checkpoint


def _spec(**kw):
    base = {"name": "resnet18", "input_px": 64, "pretrained": False}
    return BackboneSpec(**{**base, **kw})


def _x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "lightning_ckpt", "with_head"])
def test_weights_round_trip_from_file(tmp_path, fmt):
    torch.manual_seed(1)
    ref = create_model(_spec())  # headless resnet18 with random weights
    state = ref.state_dict()
    if fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "lightning_ckpt":
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": {f"model.encoder.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:  # a full classifier's state dict: the head is ignored
        clf = create_model(_spec(), num_classes=4)
        clf.load_state_dict({**state, "fc.weight": torch.zeros(4, 512), "fc.bias": torch.zeros(4)}, strict=False)
        path = tmp_path / "w.pth"
        torch.save(clf.state_dict(), path)
    enc = build_encoder(_spec(weights=str(path), pretrained=True))
    assert enc.weights_source == "file" and len(enc.weights_sha256) == 64
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(enc(_x()), torch.flatten(ref(_x()), 1))


def test_alexnet_is_the_studys_1024d_encoder():
    enc = build_encoder(BackboneSpec(name="alexnet", source="torchvision", input_px=96, pretrained=False, embed_dim=1024))
    assert enc(torch.zeros(3, 3, 96, 96)).shape == (3, 1024)
    clf = create_model(enc.spec, num_classes=4)
    assert clf(torch.zeros(2, 3, 96, 96)).shape == (2, 4)
    assert set(headless_state(clf, enc.spec)) == set(enc.model.state_dict())


def test_export_carries_spec_and_loads_back(tmp_path):
    spec = _spec(name="convnext_atto")
    clf = create_model(spec, num_classes=3)
    enc_model = create_model(spec)
    enc_model.load_state_dict(headless_state(clf, spec))  # ConvNeXt keeps head.norm
    path = save_encoder(enc_model, spec, tmp_path / "e.safetensors", extra={"trained_on": "demo"})
    _, meta = read_state_dict(path)
    assert json.loads(meta["her2lab_backbone"])["name"] == "convnext_atto" and meta["trained_on"] == "demo"
    enc = build_encoder(_spec(name="convnext_atto", weights=str(path), pretrained=True))
    enc_model.eval()
    with torch.no_grad():
        assert torch.allclose(enc(_x()), enc_model(_x()), atol=1e-6)


def test_key_mismatch_is_reported_by_name(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(create_model(_spec(name="resnet34")).state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_encoder(_spec(weights=str(path), pretrained=True))
    msg = str(err.value)
    assert "unexpected" in msg and "layer1.2." in msg and "r34.pt" in msg and "\n" not in msg
    torch.save(create_model(_spec(name="resnet50")).state_dict(), path)
    with pytest.raises(WeightsError, match="shape mismatch at"):
        build_encoder(_spec(weights=str(path), pretrained=True))


def test_missing_or_unreadable_weights(tmp_path):
    with pytest.raises(WeightsError, match="not found; check backbone.weights"):
        build_encoder(_spec(weights=str(tmp_path / "nope.safetensors"), pretrained=True))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a readable weights file"):
        build_encoder(_spec(weights=str(bad), pretrained=True))


def test_pretrained_without_weights_needs_explicit_random():
    with pytest.raises(WeightsError, match="backbone.pretrained=false for random weights"):
        build_encoder(_spec(pretrained=True))
    enc = build_encoder(_spec(pretrained=False))
    assert enc.weights_source == "random"


def test_embed_dim_mismatch():
    with pytest.raises(WeightsError, match="gives 512-d features but backbone.embed_dim=999; set backbone.embed_dim=512"):
        build_encoder(_spec(embed_dim=999))


def test_hostile_encoder_weights_are_refused_and_run_nothing(tmp_path):
    from her2lab.embed.backbones import BackboneSpec, WeightsError, create_model, load_weights

    marker = tmp_path / "ran"
    evil = hostile_checkpoint(tmp_path / "encoder.pt", marker)
    with pytest.raises(WeightsError) as err:
        load_weights(create_model(BackboneSpec(name="test_resnet", pretrained=False)), evil, "backbone.weights")
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg and str(evil) in msg and "could run code" in msg
    assert not marker.exists()


def test_a_null_mean_std_needs_weights_that_store_one(tmp_path):
    torch.manual_seed(0)
    plain = tmp_path / "plain.pt"
    torch.save(create_model(_spec()).state_dict(), plain)
    with pytest.raises(WeightsError, match=r"holds none .*backbone.mean=\[r,g,b\]"):
        build_encoder(_spec(weights=str(plain), pretrained=True, mean=None, std=None))
    with pytest.raises(WeightsError, match="give both backbone.mean and backbone.std"):
        _spec(mean=None)
    with pytest.raises(WeightsError, match="holds none"):
        build_encoder(_spec(mean=None, std=None))  # random weights store nothing either
