"""Frozen patch encoders: presets → timm/torchvision model + weights + normalisation.

A :class:`BackboneSpec` (``conf/backbone/*.yaml``) names the architecture (any timm model, or
torchvision's AlexNet as in the H&E-HER2 study's code), where its weights come from, the input
size and resolution it expects, and its normalisation (its own mean/std: ImageNet's, its
authors', or — ``mean: null`` — the mean/std of the tiles it was trained on, stored with its
weights by her2lab's transfer-learning step). :func:`build_encoder` makes an :class:`Encoder`
whose ``forward`` maps ``(B, 3, H, W)`` normalised images to ``(B, D)``.

Weights come from exactly one place, and the features file records which:

- ``weights: /path/file`` — a state dict (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, a
  Lightning checkpoint, or an encoder exported by her2lab's patch-classifier pretraining;
- a Hugging Face snapshot folder (``model.safetensors``/``pytorch_model.bin`` and a config);
- ``weights: hub`` — the authors' Hugging Face repository (``hf_hub_id``) or timm/torchvision's
  published weights, downloaded with the user's token (online only);
- ``weights: null`` with ``pretrained: false`` — random weights, only when asked for explicitly.

Where an architecture comes from is an extension point: ``backbone.source`` names a builder
registered with :func:`register_encoder` (:mod:`her2lab.embed.sources`: ``timm``,
``torchvision``, ``transformers``, ``conch``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from her2lab.embed.sources import (
    get_source,
    list_encoders,
    register_encoder,
    timm_hub_state,
    unregister_encoder,
)
from her2lab.embed.weights import (
    WeightsError,
    file_sha256,
    load_state,
    load_weights,
    read_state_dict,
    save_encoder,
    state_sha256,
    stored_normalisation,
    weights_file,
)

__all__ = [
    "POOLINGS", "BackboneSpec", "Encoder", "WeightsError", "build_classifier", "build_encoder", "create_model",
    "file_sha256", "headless_state", "list_encoders", "load_state", "load_weights", "read_state_dict",
    "register_encoder", "save_encoder", "state_sha256", "stored_normalisation", "timm_hub_state", "unregister_encoder", "weights_file",
]

log = logging.getLogger(__name__)

#: How an encoder's embedding is read: its own output, or a ViT's class token, class token ⊕
#: mean patch token, or mean patch token.
POOLINGS = ("model", "cls", "cls_mean", "mean")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



@dataclass
class BackboneSpec:
    """What an encoder is and how to feed it (one ``conf/backbone/*.yaml``)."""

    name: str = "resnet18"  # timm model name, or "alexnet" with source=torchvision
    source: str = "timm"  # "timm" or "torchvision"
    weights: str | None = None  # file path, "hub", or None
    pretrained: bool = True  # False: random weights are intended
    input_px: int = 224  # tiles are read at this size, never resized on the fly
    target_mpp: float = 0.5  # µm/px the encoder expects
    # None: the normalisation stored with the weights (her2lab's transfer-learning step stores the
    # mean/std of the tiles it trained on, see stored_normalisation); resolved by build_encoder
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    embed_dim: int | None = None  # checked against the model's actual output
    preset: str = ""  # folder name of the features (defaults to ``name``)
    description: str = ""
    pretrain_experiment: str = ""  # the experiment that makes ``weights`` (transfer-learning step)
    model_kwargs: dict = field(default_factory=dict)
    pooling: str = "model"  # model | cls | cls_mean | mean (see POOLINGS)
    hf_hub_id: str = ""  # Hugging Face repository of the authors' weights, for weights=hub
    licence: str = ""  # the weights' licence and gating, for the docs and the features file

    def __post_init__(self) -> None:
        get_source(self.source)  # a wrong source fails when the config is read, not mid-run
        if self.pooling not in POOLINGS:
            raise WeightsError(f"backbone.pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}")
        if (self.mean is None) != (self.std is None):
            raise WeightsError(f"backbone {self.label}: give both backbone.mean and backbone.std, or neither "
                               "(null: the normalisation stored with the weights)")
        self.mean = None if self.mean is None else tuple(float(v) for v in self.mean)
        self.std = None if self.std is None else tuple(float(v) for v in self.std)
        self.model_kwargs = dict(self.model_kwargs or {})

    @property
    def label(self) -> str:
        """The features folder's name: the preset's, else the model's, as one safe path part
        (``hf-hub:org/model`` → ``hf-hub_org_model``)."""
        return re.sub(r"[^A-Za-z0-9._+=@-]", "_", self.preset or self.name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = None if self.mean is None else list(self.mean)
        d["std"] = None if self.std is None else list(self.std)
        return d


class Encoder(nn.Module):
    """A frozen feature extractor: ``(B, 3, H, W)`` → ``(B, embed_dim)``.

    ``spec.pooling`` says how the embedding is read (:data:`POOLINGS`): the model's own output,
    or, for a ViT, from its tokens: the class token, the class token concatenated with the mean
    of the patch tokens (Virchow's embedding), or the patch-token mean. Register tokens are
    never patch tokens.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.hf = hasattr(model, "config") and hasattr(model, "embeddings")  # a transformers model
        if self.hf and spec.pooling == "model":
            raise WeightsError(f"backbone {spec.label}: a transformers model is read from its tokens; "
                               "set backbone.pooling=cls (or cls_mean, mean)")
        if spec.pooling != "model" and not self.hf and not (hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens")):
            raise WeightsError(f"backbone {spec.label}: pooling={spec.pooling} reads a ViT's tokens, but "
                               f"{spec.name} has none; use backbone.pooling=model")
        self.model = model
        self.spec = spec
        self.weights_source = "random"
        self.weights_sha256 = ""

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A ViT's output tokens ``(B, T, D)`` after its final norm — class token, registers, then
        patch tokens — and how many come before the patch tokens."""
        if self.hf:
            n_prefix = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
            return self.model(pixel_values=x).last_hidden_state, n_prefix
        return self.model.forward_features(x), self.model.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "model":
            # timm with num_classes=0 returns pooled features; AlexNet's conv stack is flattened as
            # in the study's code (256 × 2 × 2 = 1024-d at 96 px).
            return torch.flatten(self.model(x), 1)  # (B, D)
        tokens, n_prefix = self.tokens(x)  # (B, T, D)
        cls, patches = tokens[:, 0], tokens[:, n_prefix:]  # (B, D), (B, P, D)
        if self.spec.pooling == "cls":
            return cls
        if self.spec.pooling == "mean":
            return patches.mean(1)
        return torch.cat([cls, patches.mean(1)], dim=-1)  # (B, 2D)

    @torch.no_grad()
    def output_dim(self) -> int:
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 3, self.spec.input_px, self.spec.input_px)
        d = int(self.forward(x).shape[1])
        self.train(was_training)
        return d


def create_model(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
    """Architecture with random weights; ``num_classes=0`` gives the headless encoder's module."""
    return get_source(spec.source).build(spec, num_classes)


def headless_state(classifier: nn.Module, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The encoder part of a classifier made by ``create_model(spec, num_classes=C)``."""
    import copy

    if spec.source == "torchvision" and spec.name == "alexnet":
        return classifier.features.state_dict()
    m = copy.deepcopy(classifier)
    if hasattr(m, "reset_classifier"):
        m.reset_classifier(0)  # timm: drops the head, keeps e.g. ConvNeXt's head.norm
    elif hasattr(m, "fc"):
        m.fc = nn.Identity()
    return m.state_dict()


def build_encoder(spec: BackboneSpec) -> Encoder:
    """Make the frozen encoder a spec describes, with its weights loaded and its output checked."""
    enc = Encoder(create_model(spec), spec)
    if spec.weights == "hub":
        _load_hub(enc, spec)
    elif spec.weights:
        path = Path(os.path.expanduser(str(spec.weights)))
        if not path.exists() and spec.hf_hub_id:
            raise WeightsError(
                f"backbone {spec.label}: no weights at {path}; request access at https://huggingface.co/"
                f"{spec.hf_hub_id}, then `hf download {spec.hf_hub_id} --local-dir {path}`, or set "
                "backbone.weights=hub (downloads with your Hugging Face token)"
            )
        path = weights_file(path, f"backbone {spec.label}")
        load_weights(enc.model, path, what=f"backbone {spec.label}", convert=get_source(spec.source).convert)
        enc.weights_source = "file"
        enc.weights_sha256 = file_sha256(path)
    elif spec.pretrained:
        raise WeightsError(
            f"backbone {spec.label}: pretrained weights asked for but none given; set "
            "backbone.weights=/path/to/weights (.safetensors/.pt/.ckpt) or backbone.weights=hub "
            "(online), or backbone.pretrained=false for random weights"
        )
    else:
        log.warning("backbone %s: random weights (pretrained=false)", spec.label)
    if spec.mean is None:
        _stored_normalisation(spec)
    enc.eval().requires_grad_(False)
    d = enc.output_dim()
    if spec.embed_dim is not None and d != spec.embed_dim:
        raise WeightsError(
            f"backbone {spec.label}: {spec.name} at {spec.input_px}px gives {d}-d features but "
            f"backbone.embed_dim={spec.embed_dim}; set backbone.embed_dim={d}"
        )
    spec.embed_dim = d
    return enc


def _stored_normalisation(spec: BackboneSpec) -> None:
    """``spec.mean``/``spec.std`` from the weights file (``backbone.mean: null``), or an error."""
    path = weights_file(Path(os.path.expanduser(str(spec.weights))), f"backbone {spec.label}") \
        if spec.weights and spec.weights != "hub" else None
    stored = stored_normalisation(path) if path is not None else None
    if stored is None:
        raise WeightsError(
            f"backbone {spec.label}: backbone.mean/std are null (the normalisation stored with the weights), but "
            f"{path or 'weights=' + str(spec.weights)} holds none (her2lab's transfer-learning step stores the mean/std "
            "of its training tiles); set backbone.mean=[r,g,b] backbone.std=[r,g,b]"
        )
    spec.mean, spec.std = stored
    log.info("backbone %s: normalisation stored with its weights: mean %s, std %s", spec.label,
             [round(v, 4) for v in spec.mean], [round(v, 4) for v in spec.std])


def _load_hub(enc: Encoder, spec: BackboneSpec) -> None:
    hub = get_source(spec.source).hub
    if hub is None:
        raise WeightsError(f"backbone {spec.label}: source {spec.source!r} has no hub; set backbone.weights=/path/to/weights")
    try:
        state = hub(spec)
    except WeightsError:
        raise
    except Exception as exc:  # network, hub, or cache errors all mean the same to the user
        raise WeightsError(
            f"backbone {spec.label}: could not fetch pretrained {spec.name} weights from the hub "
            f"({type(exc).__name__}); offline, point at a file: backbone.weights=/path/to/weights"
        ) from None
    load_state(enc.model, state, f"backbone {spec.label}", "hub weights", get_source(spec.source).convert)
    enc.weights_source = "hub"
    enc.weights_sha256 = state_sha256(enc.model.state_dict())


def build_classifier(backbone: dict, num_classes: int, init_weights: str | None = None) -> nn.Module:
    """A backbone with a ``num_classes`` head (the patch classifier of the transfer-learning step).

    ``init_weights``: ``None`` trains from scratch; ``hub`` or a file starts from those encoder
    weights (the head is always new).
    """
    # the classifier's own normalisation is its datamodule's; a null mean/std is not resolved here
    spec = BackboneSpec(**{**dict(backbone), "weights": None, "pretrained": False, "mean": None, "std": None})
    clf = create_model(spec, num_classes=num_classes)
    if init_weights:
        enc = build_encoder(BackboneSpec(**{**spec.to_dict(), "weights": init_weights, "pretrained": True, "embed_dim": None,
                                            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}))  # only its weights are used
        target = clf.features if spec.source == "torchvision" and spec.name == "alexnet" else clf
        own = target.state_dict()
        missing = [k for k in enc.model.state_dict() if k not in own]
        if missing:
            raise WeightsError(f"model.net.init_weights={init_weights}: keys {missing[:3]} have no place in the classifier")
        target.load_state_dict(enc.model.state_dict(), strict=False)
    return clf
