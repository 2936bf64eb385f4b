"""Where an encoder's architecture comes from: the ``backbone.source`` registry and its builders.

A source is one decorated function ``build(spec, num_classes) -> nn.Module`` (headless at
``num_classes=0``, random weights), optionally with ``hub=state(spec)`` for ``weights: hub`` and
``convert=(state, model) -> state`` for weight files in a published layout that differs from the
model's. Built in:

- ``timm`` — any timm model, with the preset's ``model_kwargs`` (``*_layer`` kwargs may name a
  class of ``timm.layers``, ``torch.nn`` or :mod:`her2lab.embed.layers`); timm's own converter
  maps older published layouts (e.g. Swin checkpoints of timm 0.5);
- ``torchvision`` — AlexNet (the H&E-HER2 study's encoder) and ResNets;
- ``transformers`` — a Hugging Face vision model built offline from its config fields
  (``backbone.name`` is the config's ``model_type``), SDPA attention, no pooler (Phikon);
- ``conch`` — CONCH's image tower: a timm ViT trunk, open_clip's attentional pooler and a
  LayerNorm (the embedding CONCH's ``encode_image(proj_contrast=False, normalize=False)`` gives);
  it reads CONCH v1's whole checkpoint and CONCH v1.5's (TITAN's patch encoder) vision file.

``spec`` is a :class:`her2lab.embed.backbones.BackboneSpec`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from her2lab.embed.weights import WeightsError, hf_hub_weights, read_state_dict
from her2lab.registry import Registry

__all__ = ["EncoderSource", "get_source", "list_encoders", "register_encoder", "timm_hub_state", "unregister_encoder"]

#: Modules whose classes a preset may name as a layer (``mlp_layer: timm.layers.SwiGLUPacked``);
#: nothing else is imported from a config.
LAYER_MODULES = ("timm.layers", "torch.nn", "her2lab.embed.layers")


@dataclass(frozen=True)
class EncoderSource:
    """A registered ``backbone.source``: how to build its architectures and fetch hub weights."""

    build: Callable[..., nn.Module]  # (spec, num_classes) → module with random weights
    hub: Callable[..., dict] | None = None  # spec → state dict of the published weights
    convert: Callable[..., dict] | None = None  # (state, model) → state: a published layout → the model's


_ENCODERS: Registry[EncoderSource] = Registry("encoder source", key="backbone.source", error=WeightsError)


def register_encoder(source: str, hub: Callable[..., dict] | None = None,
                     convert: Callable[..., dict] | None = None):
    """Decorator: register ``build(spec, num_classes) -> nn.Module`` as ``backbone.source=source``.

    Registering a source again replaces the builder registered before.

    Args:
        source: the ``backbone.source`` value that selects the builder.
        hub: ``state(spec) -> dict`` giving the published weights for ``backbone.weights=hub``
            (``None``: the source has no hub).
        convert: ``convert(state, model) -> state`` mapping a weights file in an older or original
            layout onto the model's; tried only when the file's keys do not fit as they are.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ENCODERS.register(source, EncoderSource(fn, hub, convert), replace=True)
        return fn

    return deco


def get_source(source: str) -> EncoderSource:
    """The registered source ``backbone.source=source``; an unknown one is a one-line error."""
    return _ENCODERS.get(source)


def unregister_encoder(source: str) -> None:
    """Remove a registered source (no error if it is not there)."""
    _ENCODERS.unregister(source)


def list_encoders() -> list[str]:
    """The registered ``backbone.source`` values, sorted."""
    return _ENCODERS.names()


def timm_hub_state(name: str, model_kwargs: dict | None, what: str, key: str) -> dict[str, torch.Tensor]:
    """timm's published weights of ``name`` (headless), or one error saying how to work offline.

    Args:
        what: the thing being built, for the message (``backbone imagenet``).
        key: the config key that points at a file instead (``backbone.weights``).
    """
    try:
        import timm

        return timm.create_model(name, pretrained=True, num_classes=0, **(model_kwargs or {})).state_dict()
    except Exception as exc:  # network, hub, or cache errors all mean the same to the user
        raise WeightsError(
            f"{what}: could not fetch pretrained {name} weights from the hub "
            f"({type(exc).__name__}); offline, point at a file: {key}=/path/to/weights"
        ) from None


def _torchvision_hub(spec) -> dict[str, torch.Tensor]:
    import torchvision

    return torchvision.models.get_model_weights(spec.name).DEFAULT.get_state_dict(progress=False)


@register_encoder("torchvision", hub=_torchvision_hub)
def _torchvision_model(spec, num_classes: int = 0) -> nn.Module:
    import torchvision

    try:
        fn = getattr(torchvision.models, spec.name)
    except AttributeError:
        raise WeightsError(f"backbone.name={spec.name!r} is not a torchvision model") from None
    model = fn(weights=None, **spec.model_kwargs)
    if spec.name == "alexnet":
        if not num_classes:
            return model.features  # conv part only, as the study used it
        # The study's patch classifier: AlexNet conv features → 2×2 pool → classes.
        model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        model.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 2 * 2, num_classes))
        return model
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, num_classes) if num_classes else nn.Identity()
        return model
    raise WeightsError(f"backbone.name={spec.name!r}: only AlexNet and ResNet-style torchvision models; use timm")


def _hf_hub(spec) -> dict[str, torch.Tensor]:
    """The authors' weights from their Hugging Face repository (``backbone.hf_hub_id``)."""
    if not spec.hf_hub_id:
        raise WeightsError(f"backbone {spec.label}: weights=hub needs backbone.hf_hub_id (the authors' "
                           "Hugging Face repository); or set backbone.weights=/path/to/weights")
    return read_state_dict(hf_hub_weights(spec.hf_hub_id, f"backbone {spec.label}"), f"backbone {spec.label}")[0]


def _timm_hub(spec) -> dict[str, torch.Tensor]:
    if spec.hf_hub_id:
        return _hf_hub(spec)
    return timm_hub_state(spec.name, spec.model_kwargs, f"backbone {spec.label}", "backbone.weights")


def _timm_convert(state: dict, model: nn.Module) -> dict:
    """timm's own converter for the architecture's published layouts (its ``checkpoint_filter_fn``:
    e.g. Swin checkpoints of timm < 0.9 whose downsampling ended a stage instead of starting one)."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn(state, model) if fn is not None else state


@register_encoder("timm", hub=_timm_hub, convert=_timm_convert)
def _timm_model(spec, num_classes: int = 0) -> nn.Module:
    import timm

    kwargs = {k: _layer(k, v) if k.endswith("_layer") else v for k, v in spec.model_kwargs.items()}
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (…)"
        raise WeightsError(f"backbone.name={spec.name!r}: {str(exc).splitlines()[0]}; see timm.list_models()") from None
    return model


def _layer(key: str, value):
    """A ``*_layer`` model kwarg: ``timm.layers.X`` or ``torch.nn.X`` names that class; any other
    value (timm's own names such as ``silu``) goes to timm as it is."""
    if not isinstance(value, str) or "." not in value:
        return value
    module, _, name = value.rpartition(".")
    if module not in LAYER_MODULES:
        raise WeightsError(f"backbone.model_kwargs.{key}={value!r}: only classes of {' or '.join(LAYER_MODULES)} can be named")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        raise WeightsError(f"backbone.model_kwargs.{key}={value!r}: {module} has no {name}") from None


@register_encoder("transformers", hub=_hf_hub)
def _transformers_model(spec, num_classes: int = 0) -> nn.Module:
    """A Hugging Face transformers vision model, built offline from ``backbone.name`` (the config's
    ``model_type``: ``vit``, ``dinov2`` …) and ``model_kwargs`` (its config fields), with SDPA
    attention and no pooling layer; the encoder reads its tokens (``backbone.pooling``)."""
    if num_classes:
        raise WeightsError(f"backbone {spec.label}: transformers encoders embed only; a patch classifier needs a timm model")
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise WeightsError(f"backbone {spec.label} needs the transformers package: pip install 'her2lab[foundation]'") from None
    try:
        config = AutoConfig.for_model(spec.name, **spec.model_kwargs)
    except ValueError as exc:  # "Unrecognized model identifier"
        raise WeightsError(f"backbone.name={spec.name!r}: {str(exc).splitlines()[0][:160]}") from None
    config._attn_implementation = "sdpa"
    model_class = AutoModel._model_mapping[type(config)]
    kwargs = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters else {}
    return model_class(config, **kwargs)


class AttentionPooledViT(nn.Module):
    """CONCH's image tower: ``ln_contrast(attn_pool_contrast(trunk.forward_features(x))[:, 0])``.

    The trunk is a timm ViT (class token kept, final norm applied); the pooler is open_clip's
    ``AttentionalPooler`` (one learned query attending over every token); keys ``trunk.*``,
    ``attn_pool_contrast.*``, ``ln_contrast.*`` — CONCH's ``visual.*`` without its prefix.
    """

    def __init__(self, trunk: nn.Module, pool_dim: int, pool_heads: int) -> None:
        super().__init__()
        from open_clip.transformer import AttentionalPooler

        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(pool_dim, trunk.num_features, n_head=pool_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(pool_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # (B, T, D_trunk)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # (B, pool_dim)


#: The parts of a CONCH checkpoint its image embedding uses (the rest: text tower, captioning
#: pooler, contrastive projection).
CONCH_PARTS = ("trunk.", "attn_pool_contrast.", "ln_contrast.")


def _conch_convert(state: dict, model: nn.Module) -> dict:
    """A CONCH checkpoint as its authors publish it → the image tower's keys.

    - v1's ``pytorch_model.bin`` is the whole vision-language model (``visual.*``, ``text.*``,
      ``text_decoder.*`` …): the image tower's keys are taken.
    - v1.5's ``pytorch_model_vision.bin`` (TITAN's patch encoder, as TRIDENT builds it) has a
      Flamingo-style pooler (``to_q``, ``to_kv``, ``to_out``) and a position embedding for 224 px,
      which TRIDENT interpolates at every forward to the 448 px input; both are converted here, the
      interpolation done once.
    """
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.").removeprefix("visual.")
        if k.startswith(CONCH_PARTS):
            out[k] = v
    if "attn_pool_contrast.to_q.weight" in out:  # CONCH v1.5
        out = _flamingo_pooler(out, "attn_pool_contrast.")
        if "trunk.pos_embed" in out:
            out["trunk.pos_embed"] = _dino_pos_embed(out["trunk.pos_embed"], model.trunk.patch_embed.grid_size)
    return out


def _flamingo_pooler(state: dict, prefix: str) -> dict:
    """Flamingo's attentional pooler (bias-free ``to_q``, ``to_kv`` = k rows then v rows,
    ``to_out``) → open_clip's, whose ``nn.MultiheadAttention`` computes the same attention with
    separate q/k/v weights and biases: the biases are zero."""
    to_q = state.pop(f"{prefix}to_q.weight")  # (D, D)
    d = to_q.shape[0]
    state[f"{prefix}attn.q_proj_weight"] = to_q
    if (kv := state.pop(f"{prefix}to_kv.weight", None)) is not None:  # (2D, D_context)
        state[f"{prefix}attn.k_proj_weight"], state[f"{prefix}attn.v_proj_weight"] = kv.chunk(2)
    if (to_out := state.pop(f"{prefix}to_out.weight", None)) is not None:  # (D, D)
        state[f"{prefix}attn.out_proj.weight"] = to_out
    state[f"{prefix}attn.in_proj_bias"] = to_q.new_zeros(3 * d)
    state[f"{prefix}attn.out_proj.bias"] = to_q.new_zeros(d)
    return state


def _dino_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ViT's position embedding (class token first, a square grid of patches) resized to ``grid``
    as DINO and iBOT resize it at run time: bicubic by the scale factor (grid + 0.1) / old grid,
    not to a target size, so it samples at other points than timm's resampling does."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if tuple(grid) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, side, side)
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, H·W, D)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1)  # (1, 1 + H·W, D)


@register_encoder("conch", hub=_hf_hub, convert=_conch_convert)
def _conch_model(spec, num_classes: int = 0) -> nn.Module:
    """``backbone.name``: the timm trunk; ``model_kwargs``: its kwargs plus ``pool_dim`` and
    ``pool_heads`` of the attentional pooler."""
    if num_classes:
        raise WeightsError(f"backbone {spec.label}: CONCH embeds only; a patch classifier needs a timm model")
    try:
        import open_clip  # noqa: F401
    except ImportError:
        raise WeightsError(f"backbone {spec.label} needs open-clip-torch: pip install 'her2lab[foundation]'") from None
    kwargs = dict(spec.model_kwargs)
    pool_dim, pool_heads = int(kwargs.pop("pool_dim", 512)), int(kwargs.pop("pool_heads", 8))
    trunk = _timm_model(type(spec)(**{**spec.to_dict(), "source": "timm", "model_kwargs": kwargs}))
    return AttentionPooledViT(trunk, pool_dim, pool_heads)
