"""Frozen patch encoders: presets → timm/torchvision model + weights + normalisation.

A :class:`BackboneSpec` (``conf/backbone/*.yaml``) names the architecture (any timm model, or
torchvision's AlexNet as in the H&E-HER2 study's code), where its weights come from, the input
size and resolution it expects, and its normalisation. :func:`build_encoder` makes an
:class:`Encoder` whose ``forward`` maps ``(B, 3, H, W)`` normalised images to ``(B, D)``.

Weights come from exactly one place, and the features file records which:

- ``weights: /path/file`` — a state dict (``.pt``/``.pth``/``.bin``), a ``.safetensors`` file, a
  Lightning checkpoint, or an encoder exported by her2lab's patch-classifier pretraining;
- ``weights: hub`` — downloaded by timm/torchvision (online only);
- ``weights: null`` with ``pretrained: false`` — random weights, only when asked for explicitly.

Where an architecture comes from is an extension point: ``backbone.source`` names a builder
registered with :func:`register_encoder` (``timm`` and ``torchvision`` here). A new source is one
decorated function ``build(spec, num_classes) -> nn.Module`` (headless at ``num_classes=0``),
optionally with ``hub=state(spec)`` for ``weights: hub``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from her2lab.checkpoint import data_only, unsafe_global
from her2lab.errors import Her2labError
from her2lab.io import atomic_path
from her2lab.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Prefixes stripped from checkpoint keys (Lightning modules, DDP, common wrappers).
KEY_PREFIXES = (
    "model.encoder.", "encoder.", "model.model.", "model.", "module.", "backbone.", "net.",
    "model.features.", "features.", "encoder.model.",
)


class WeightsError(Her2labError):
    """Encoder weights cannot be found or do not fit the architecture."""


@dataclass(frozen=True)
class EncoderSource:
    """A registered ``backbone.source``: how to build its architectures and fetch hub weights."""

    build: Callable[..., nn.Module]  # (spec, num_classes) → module with random weights
    hub: Callable[..., dict] | None = None  # spec → state dict of the published weights


_ENCODERS: Registry[EncoderSource] = Registry("encoder source", key="backbone.source", error=WeightsError)


def register_encoder(source: str, hub: Callable[..., dict] | None = None):
    """Decorator: register ``build(spec, num_classes) -> nn.Module`` as ``backbone.source=source``.

    Registering a source again replaces the builder registered before.

    Args:
        source: the ``backbone.source`` value that selects the builder.
        hub: ``state(spec) -> dict`` giving the published weights for ``backbone.weights=hub``
            (``None``: the source has no hub).
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ENCODERS.register(source, EncoderSource(fn, hub), replace=True)
        return fn

    return deco


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


@dataclass
class BackboneSpec:
    """What an encoder is and how to feed it (one ``conf/backbone/*.yaml``)."""

    name: str = "resnet18"  # timm model name, or "alexnet" with source=torchvision
    source: str = "timm"  # "timm" or "torchvision"
    weights: str | None = None  # file path, "hub", or None
    pretrained: bool = True  # False: random weights are intended
    input_px: int = 224  # tiles are read at this size, never resized on the fly
    target_mpp: float = 0.5  # µm/px the encoder expects
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    embed_dim: int | None = None  # checked against the model's actual output
    preset: str = ""  # folder name of the features (defaults to ``name``)
    description: str = ""
    pretrain_experiment: str = ""  # the experiment that makes ``weights`` (transfer-learning step)
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _ENCODERS.get(self.source)  # a wrong source fails when the config is read, not mid-run
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.model_kwargs = dict(self.model_kwargs or {})

    @property
    def label(self) -> str:
        return self.preset or self.name.replace("/", "_").replace(":", "_")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class Encoder(nn.Module):
    """A frozen feature extractor: ``(B, 3, H, W)`` → ``(B, embed_dim)``."""

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.weights_source = "random"
        self.weights_sha256 = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm with num_classes=0 returns pooled features; AlexNet's conv stack is flattened as in
        # the study's code (256 × 2 × 2 = 1024-d at 96 px).
        return torch.flatten(self.model(x), 1)  # (B, D)

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
    return _ENCODERS.get(spec.source).build(spec, num_classes)


def _torchvision_hub(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    import torchvision

    return torchvision.models.get_model_weights(spec.name).DEFAULT.get_state_dict(progress=False)


@register_encoder("torchvision", hub=_torchvision_hub)
def _torchvision_model(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
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


def _timm_hub(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    return timm_hub_state(spec.name, spec.model_kwargs, f"backbone {spec.label}", "backbone.weights")


@register_encoder("timm", hub=_timm_hub)
def _timm_model(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
    import timm

    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes, **spec.model_kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (…)"
        raise WeightsError(f"backbone.name={spec.name!r}: {str(exc).splitlines()[0]}; see timm.list_models()") from None
    return model


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
        load_weights(enc.model, path, what=f"backbone {spec.label}")
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
    enc.eval().requires_grad_(False)
    d = enc.output_dim()
    if spec.embed_dim is not None and d != spec.embed_dim:
        raise WeightsError(
            f"backbone {spec.label}: {spec.name} at {spec.input_px}px gives {d}-d features but "
            f"backbone.embed_dim={spec.embed_dim}; set backbone.embed_dim={d}"
        )
    spec.embed_dim = d
    return enc


def _load_hub(enc: Encoder, spec: BackboneSpec) -> None:
    hub = _ENCODERS.get(spec.source).hub
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
    load_state(enc.model, state, f"backbone {spec.label}", "hub weights")
    enc.weights_source = "hub"
    enc.weights_sha256 = state_sha256(enc.model.state_dict())


def read_state_dict(path: Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata from a safetensors file, a state dict or a (Lightning) checkpoint."""
    if not path.is_file():
        raise WeightsError(f"{what}: weights file {path} not found; check backbone.weights")
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:

            with data_only():  # weights-only: a file that would run code while read is refused
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                meta = {k: v for k, v in obj.items() if isinstance(v, str | int | float)}
                obj = obj["state_dict"]
            elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
                obj = obj["model"]
            if not isinstance(obj, dict):
                raise WeightsError(f"{what}: {path} holds a {type(obj).__name__}, not a state dict")
            state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    except WeightsError:
        raise
    except Exception as exc:

        if unsafe_global(exc):
            raise WeightsError(f"{what}: {path} refused: it holds objects beyond tensors ({unsafe_global(exc)}), and "
                               "loading it could run code; use a .safetensors file or a plain state dict you trust") from None
        raise WeightsError(f"{what}: {path} is not a readable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    return state, meta


def load_weights(model: nn.Module, path: Path, what: str = "weights") -> None:
    """Load ``path`` into ``model``; report mismatched keys by name.

    Keys are matched after stripping common prefixes (``model.encoder.``, ``module.`` …);
    classifier-head keys the headless encoder does not have are ignored.
    """
    state, _ = read_state_dict(path, what)
    load_state(model, state, what, str(path))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str, where: str) -> None:
    """Load a state dict with prefix matching; mismatches are one error naming the keys."""
    own = model.state_dict()
    state = _match_prefix(state, own)
    head = {k for k in state if k not in own and _is_head_key(k)}
    unexpected = sorted(k for k in state if k not in own and k not in head)
    missing = sorted(k for k in own if k not in state)
    shape = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise WeightsError(f"{what}: {where} does not fit the architecture: {'; '.join(parts)}; check backbone.name")
    model.load_state_dict({k: v for k, v in state.items() if k in own})


def _match_prefix(state: dict, own: dict) -> dict:
    """Strip the first prefix that makes the file's keys line up with the model's."""
    best, best_hits = state, sum(k in own for k in state)
    for p in KEY_PREFIXES:
        cand = {k[len(p) :] if k.startswith(p) else k: v for k, v in state.items()}
        hits = sum(k in own for k in cand)
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def _is_head_key(key: str) -> bool:
    return key.split(".")[0] in ("fc", "head", "classifier", "heads", "last_linear")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_encoder(model: nn.Module, spec: BackboneSpec, path: Path, extra: dict | None = None) -> Path:
    """Export a headless encoder module (``create_model(spec)``'s form) as safetensors.

    The spec travels in the metadata, so the file says what it is.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"her2lab_backbone": json.dumps(spec.to_dict()), **{k: str(v) for k, v in (extra or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def build_classifier(backbone: dict, num_classes: int, init_weights: str | None = None) -> nn.Module:
    """A backbone with a ``num_classes`` head (the patch classifier of the transfer-learning step).

    ``init_weights``: ``None`` trains from scratch; ``hub`` or a file starts from those encoder
    weights (the head is always new).
    """
    spec = BackboneSpec(**{**dict(backbone), "weights": None, "pretrained": False})
    clf = create_model(spec, num_classes=num_classes)
    if init_weights:
        enc = build_encoder(BackboneSpec(**{**spec.to_dict(), "weights": init_weights, "pretrained": True, "embed_dim": None}))
        target = clf.features if spec.source == "torchvision" and spec.name == "alexnet" else clf
        own = target.state_dict()
        missing = [k for k in enc.model.state_dict() if k not in own]
        if missing:
            raise WeightsError(f"model.net.init_weights={init_weights}: keys {missing[:3]} have no place in the classifier")
        target.load_state_dict(enc.model.state_dict(), strict=False)
    return clf
