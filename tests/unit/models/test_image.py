"""Image classifiers: weights through the encoder mechanism, frozen stages."""

from __future__ import annotations

import pytest
import torch


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
