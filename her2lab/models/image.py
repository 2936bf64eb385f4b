"""End-to-end image classifiers (timm), e.g. ConvNeXt on whole-slide thumbnails.

Weights go through the encoders' mechanism (:mod:`her2lab.embed.backbones`): ``hub`` (timm's
pretrained weights, online), a file (safetensors / state dict / Lightning checkpoint / her2lab
export; prefixes matched, head keys ignored, mismatches named), or ``null`` for random
initialisation. The class head is always new.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from her2lab.embed.backbones import (
    BackboneSpec,
    WeightsError,
    create_model,
    load_state,
    load_weights,
    timm_hub_state,
)


def build_image_classifier(
    name: str,
    num_classes: int,
    weights: str | None = None,
    drop_path_rate: float = 0.0,
    freeze_stages: int = 0,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """A timm model with a ``num_classes`` head.

    Args:
        name: timm model name (``convnext_tiny``, ``convnext_atto``, ``resnet18``, …).
        weights: ``hub``, a weights file, or ``None``.
        drop_path_rate: stochastic depth (ConvNeXt, ViTs).
        freeze_stages: freeze the stem and the first ``k`` stages (models with ``stages``).
    """
    kw = dict(model_kwargs or {})
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    spec = BackboneSpec(name=name, weights=None, pretrained=False, model_kwargs=kw)
    model = create_model(spec, num_classes=0)  # headless first: weights never carry our head
    what = f"model.net ({name})"
    if weights == "hub":
        load_state(model, timm_hub_state(name, None, what, "model.net.weights"), what, "hub weights")
    elif weights:
        load_weights(model, Path(weights).expanduser(), what=what)
    model.reset_classifier(num_classes)
    if freeze_stages:
        freeze(model, freeze_stages)
    return model


def freeze(model: nn.Module, k: int) -> None:
    """No gradients for the stem and the first ``k`` stages."""
    stages = getattr(model, "stages", None)
    if stages is None:
        raise WeightsError(f"model.net.freeze_stages={k}: {type(model).__name__} has no stages; use 0")
    if not 0 <= k <= len(stages):
        raise WeightsError(f"model.net.freeze_stages={k}: the model has {len(stages)} stages")
    for m in [getattr(model, "stem", nn.Identity()), *list(stages)[:k]]:
        m.requires_grad_(False)
