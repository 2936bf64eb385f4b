"""The inference-optimised encoder extraction runs: BatchNorm folded into the convolutions, the
features those of the plain model within float16 storage tolerance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from her2lab.embed.backbones import BackboneSpec, build_encoder
from her2lab.embed.extract import Embedder, ExtractSettings, fold_batchnorm
from her2lab.errors import Her2labError


def _with_batchnorm_statistics(enc):
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():  # non-trivial statistics, so folding has something to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return enc


def test_folded_resnet_features_equal_the_plain_model_and_hold_no_batchnorm():
    enc = _with_batchnorm_statistics(build_encoder(BackboneSpec(name="resnet50", pretrained=False)))
    folded = fold_batchnorm(enc)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())  # the original is untouched
    tiles = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = Embedder(enc, "cpu", "fp32").embed(tiles)  # (4, 2048)
    mean = torch.tensor(enc.spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(enc.spec.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        want = enc((tiles.permute(0, 3, 1, 2).float() - mean) / std)
    assert got.shape == want.shape == (4, 2048)
    torch.testing.assert_close(got.half().float(), want.half().float(), rtol=1e-3, atol=1e-3)


def test_an_encoder_without_batchnorm_runs_as_it_is():
    enc = build_encoder(BackboneSpec(name="alexnet", source="torchvision", pretrained=False, input_px=96))
    assert fold_batchnorm(enc) is enc


@pytest.mark.slow  # compiling takes 10–40 s on two cores
def test_compiled_encoder_features_equal_the_plain_model_at_every_batch_size():
    enc = _with_batchnorm_statistics(build_encoder(BackboneSpec(name="resnet18", pretrained=False, input_px=64)))
    tiles = torch.randint(0, 256, (7, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plain = Embedder(enc, "cpu", "fp32")
    compiled = Embedder(enc, "cpu", "fp32", compile=True, batch_size=4)
    want = plain.embed(tiles)
    got = torch.cat([compiled.embed(tiles[:4]), compiled.embed(tiles[4:])])  # the last batch padded to 4
    assert compiled.compiled is not None  # it did compile, and stayed compiled
    assert got.shape == want.shape == (7, 512)
    torch.testing.assert_close(got.half().float(), want.half().float(), rtol=1e-3, atol=1e-3)


def test_extract_compile_setting_is_checked():
    with pytest.raises(Her2labError, match=r"extract.compile='yes': use auto, true or false"):
        ExtractSettings(compile="yes")
