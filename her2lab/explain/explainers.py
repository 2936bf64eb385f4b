"""Explainers: what a trained model's test slides look like to it, one registered name each.

The ``data`` inputs name the explainer that suits their models (``Inputs.explainer``): attention
maps for MIL on bags, Grad-CAM for image models on thumbnails. Training and evaluation call
:func:`explain` with that name and never switch on the kind of data. A new explainer is one
function registered with :func:`register_explainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from her2lab.explain.gradcam import save_gradcam
from her2lab.explain.mil_maps import attention_maps
from her2lab.registry import Registry


@dataclass
class Explanation:
    """What an explainer made: metrics (names without the split prefix), pictures, a table."""

    metrics: dict[str, float] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    table: pd.DataFrame | None = None


@dataclass(frozen=True)
class Explainer:
    name: str
    what: str  # for log lines: "attention maps"
    fn: Callable[..., Explanation]
    in_training: bool  # cheap enough to run after every training run (else: in evaluation only)


_EXPLAINERS: Registry[Explainer] = Registry("explainer")


def register_explainer(name: str, what: str, in_training: bool = False):
    """Decorator: register ``fn(module, dataset, run_cfg, out_dir, options) -> Explanation``.

    ``out_dir`` is the run's (or evaluation's) folder, ``options`` the ``gradcam`` (training) or
    ``heatmaps`` (evaluation) config: ``limit`` and the explainer's own keys.
    """

    def deco(fn: Callable[..., Explanation]) -> Callable[..., Explanation]:
        _EXPLAINERS.register(name, Explainer(name, what, fn, in_training))
        return fn

    return deco


def unregister_explainer(name: str) -> None:
    """Remove a registered explainer (no error if it is not there)."""
    _EXPLAINERS.unregister(name)


def get_explainer(name: str) -> Explainer:
    """The explainer registered as ``name``; an unknown name is an error listing the registered ones."""
    return _EXPLAINERS.get(name)


@register_explainer("attention_maps", "attention maps")
def _attention_maps(module, dataset, run_cfg: DictConfig, out_dir: Path, options: dict[str, Any]) -> Explanation:
    """Attention heatmaps, tile montages and GeoJSON (``heatmaps/``); with ground-truth masks, the
    localisation AUROC of attention and of the tile score."""
    loc = attention_maps(module, dataset, run_cfg, out_dir / "heatmaps", limit=options.get("limit"),
                         top_k=int(options.get("top_k", 8)), chunk=int(options.get("chunk", 8192)))
    metrics = {}
    if loc is not None:
        for k in ("attention", "tile_score"):
            if loc[f"{k}_auroc"].notna().any():
                metrics[f"{k}_localisation_auroc"] = float(loc[f"{k}_auroc"].mean())
    return Explanation(metrics=metrics, table=loc)


@register_explainer("gradcam", "Grad-CAM overlays", in_training=True)
def _gradcam(module, dataset, run_cfg: DictConfig, out_dir: Path, options: dict[str, Any]) -> Explanation:
    """Grad-CAM overlays of the predicted class on the tested thumbnails (``gradcam/``)."""
    classes = [str(c) for c in run_cfg.labels.classes]
    layer = options.get("layer") or (run_cfg.get("gradcam") or {}).get("layer")
    images = save_gradcam(module, dataset, module.test_outputs, classes, out_dir / "gradcam", layer=layer,
                          limit=options.get("limit"))
    return Explanation(images=images)
