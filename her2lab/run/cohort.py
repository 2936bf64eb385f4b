"""Cohort config → validated manifest (generating the synthetic demo cohort when asked)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2lab.data.cohort import load_manifest
from her2lab.io import ensure_writable_dir

log = logging.getLogger(__name__)


def resolve_cohort(cohort: DictConfig, num_workers: int = 1) -> pd.DataFrame:
    """Load the cohort's manifest; a synthetic cohort is generated (or completed) first."""
    manifest = Path(cohort.manifest)
    synthetic = cohort.get("synthetic")
    if synthetic:
        from her2lab.data.synthetic import SyntheticConfig, generate_cohort

        root = ensure_writable_dir(cohort.root, "demo cohort folder")
        syn = SyntheticConfig(**OmegaConf.to_container(synthetic, resolve=True))
        manifest = generate_cohort(root, syn, num_workers=num_workers)
        log.info(
            "synthetic cohort %s: %d %s slides in %s", cohort.name, syn.n_slides, syn.stain, root
        )
    return load_manifest(manifest, mpp_override=cohort.get("mpp_override"))
