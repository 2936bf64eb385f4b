"""Extension points: a new encoder source, MIL net and label scheme are each one registered
function or class, and the code that uses them (feature extraction, attention maps, label
encoding) takes them up by name."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from her2lab.data.labels import (
    label_scheme,
    list_label_schemes,
    register_label_scheme,
    unregister_label_scheme,
)
from her2lab.embed.backbones import (
    BackboneSpec,
    WeightsError,
    build_encoder,
    create_model,
    list_encoders,
    register_encoder,
    unregister_encoder,
)
from her2lab.errors import Her2labError, ManifestError
from her2lab.explain.heatmaps import bag_attention
from her2lab.io import write_h5
from her2lab.models.base import (
    MILNet,
    MILNetError,
    create_mil_net,
    list_mil_nets,
    register_mil_net,
    unregister_mil_net,
)


@pytest.fixture
def tiny_encoder():
    @register_encoder("tinyconv")
    def build(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
        layers = [nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1)]
        return nn.Sequential(*layers, *([nn.Flatten(), nn.Linear(8, num_classes)] if num_classes else []))

    yield "tinyconv"
    unregister_encoder("tinyconv")


class UniformMIL(MILNet):
    """Every real tile weighs the same: attention logits are all zero."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, 6), nn.ReLU())
        self.classifier = nn.Linear(6, num_classes)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros(h.shape[:2], dtype=h.dtype, device=h.device)  # (B, N)


@pytest.fixture
def uniform_mil():
    register_mil_net("uniform")(UniformMIL)
    yield "uniform"
    unregister_mil_net("uniform")


@pytest.fixture
def zero_vs_rest():
    @register_label_scheme("her2_zero_vs_rest", classes=("zero", "nonzero"))
    def encode(manifest: pd.DataFrame) -> pd.Series:
        return (manifest["her2_score"] != "0").astype(int)

    yield "her2_zero_vs_rest"
    unregister_label_scheme("her2_zero_vs_rest")


def test_a_registered_encoder_source_builds_a_frozen_encoder(tiny_encoder):
    assert {"timm", "torchvision", "tinyconv"} <= set(list_encoders())
    enc = build_encoder(BackboneSpec(name="tiny", source=tiny_encoder, pretrained=False, input_px=32))
    x = torch.rand(5, 3, 32, 32)  # (B, 3, H, W)
    assert enc(x).shape == (5, 8) and enc.spec.embed_dim == 8 and not any(p.requires_grad for p in enc.parameters())
    assert create_model(enc.spec, num_classes=3)(x).shape == (5, 3)  # the patch-classifier form
    with pytest.raises(WeightsError, match="source 'tinyconv' has no hub"):
        build_encoder(BackboneSpec(name="tiny", source=tiny_encoder, weights="hub", input_px=32))


def test_an_unknown_encoder_source_lists_the_registered_ones():
    with pytest.raises(WeightsError, match=r"backbone.source='nope': use one of conch, timm, torchvision, transformers$"):
        BackboneSpec(source="nope")
    assert "tinyconv" not in list_encoders()  # the fixture's registration did not leak


def test_a_registered_mil_net_is_scored_by_the_attention_maps(uniform_mil, tmp_path):
    assert {"abmil", "meanpool", "maxpool", "uniform"} <= set(list_mil_nets())
    torch.manual_seed(0)
    net = create_mil_net(uniform_mil, in_dim=4, num_classes=3).eval()
    feats = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float16)
    coords = np.stack([np.arange(10) * 224, np.zeros(10)], 1).astype(np.int64)
    path = tmp_path / "s.h5"
    write_h5(path, {"features": feats, "coords": coords}, {"slide_id": "s", "patch_px_level0": 224, "level0_mpp": 0.5})
    att = bag_attention(net, path, lambda z: z.softmax(-1), chunk=3)  # 4 chunks, the last one short
    x = torch.as_tensor(feats.astype(np.float32))[None]  # (1, N, D)
    logits, w = net(x)
    assert np.allclose(att.attention, 0.1) and np.allclose(w.detach().numpy(), 0.1)
    assert np.allclose(att.probs, logits.softmax(-1)[0].detach().numpy(), atol=1e-5)
    assert att.tile_probs.shape == (10, 3)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    assert torch.allclose(net(x, mask)[1], torch.tensor([[1 / 6] * 6 + [0.0] * 4]))  # padding weighs nothing
    assert torch.allclose(net(x, mask, chunk=4)[0], net(x, mask)[0], atol=1e-6)  # chunked = one pass


def test_mil_net_registry_errors():
    with pytest.raises(MILNetError, match="MIL net 'nope' is not registered; use one of abmil, maxpool, meanpool$"):
        create_mil_net("nope")
    with pytest.raises(MILNetError, match="is not a MILNet subclass"):
        register_mil_net("plain")(nn.Linear)
    with pytest.raises(MILNetError, match="Linear is not a MILNet"):
        bag_attention(nn.Linear(2, 2), "unused.h5", lambda z: z)
    assert isinstance(MILNetError("x"), Her2labError)


def test_a_registered_label_scheme_encodes_a_manifest(zero_vs_rest):
    m = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "her2_score": ["0", "1+", "2+", "0"]})
    scheme = label_scheme(zero_vs_rest)
    assert scheme.classes == ("zero", "nonzero") and scheme.encode(m).tolist() == [0, 1, 1, 0]
    assert label_scheme(zero_vs_rest, ["neg", "pos"]).classes == ("neg", "pos")
    assert zero_vs_rest in list_label_schemes()


def test_an_unknown_label_scheme_lists_the_registered_ones():
    with pytest.raises(ManifestError, match=r"labels.name='nope': use one of binary, her2_3way, her2_4way, her2_ultralow$"):
        label_scheme("nope")
