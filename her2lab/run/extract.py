"""The extraction task: the configured cohort's tiles through the configured encoder.

What it writes is described in :mod:`her2lab.embed.cohort`.
"""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from her2lab.data.cohort_config import resolve_cohort
from her2lab.embed.backbones import build_encoder
from her2lab.embed.cohort import backbone_spec, embed_manifest


def run_extract(cfg: DictConfig, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """Prepare (if needed) and embed this process's shard of the cohort; returns the report."""
    encoder = build_encoder(backbone_spec(cfg.backbone))  # fails fast on missing weights, before any slide work
    if manifest is None:
        manifest = resolve_cohort(cfg.cohort, num_workers=cfg.num_workers)
    return embed_manifest(cfg, manifest, encoder)
