"""The ``cohort`` config group → a validated manifest (the synthetic demo cohort is generated first)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2lab.data.cohort import load_manifest
from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from her2lab.errors import Her2labError, ManifestError
from her2lab.io import ensure_writable_dir

log = logging.getLogger(__name__)


def resolve_cohort(cohort: DictConfig, num_workers: int = 1, allow_unlabelled: bool = False) -> pd.DataFrame:
    """Load the cohort's manifest; a synthetic cohort is generated (or completed) first.
    ``allow_unlabelled``: slides without ``her2_score`` are kept (to be scored, never measured).

    Every slide id reaching the pipeline comes through here and :func:`load_manifest`, which
    refuses ids that cannot safely name files.
    """
    manifest = Path(cohort.manifest)
    synthetic = cohort.get("synthetic")
    if synthetic:
        try:  # before any folder is made
            syn = SyntheticConfig(**OmegaConf.to_container(synthetic, resolve=True))
        except (TypeError, ValueError) as exc:  # unknown keys, impossible sizes, unsafe id_prefix
            raise Her2labError(f"cohort.synthetic: {str(exc).splitlines()[0]}; fix the cohort config") from None
        root = ensure_writable_dir(cohort.root, "demo cohort folder")
        manifest = generate_cohort(root, syn, num_workers=num_workers,
                                   cache_dir=cohort.get("cache_dir"))
        log.info(
            "synthetic cohort %s: %d %s slides in %s", cohort.name, syn.n_slides, syn.stain, root
        )
    table = load_manifest(manifest, mpp_override=cohort.get("mpp_override"), allow_unlabelled=allow_unlabelled)
    check_stains(table, cohort)
    return table


def check_stains(table, cohort: DictConfig) -> None:
    """One stain per cohort: a manifest ``stain`` column with several stains, or one that
    contradicts ``cohort.stain``, is an error (models would learn the stain, not HER2), unless
    ``cohort.allow_mixed_stains=true``."""
    if "stain" not in table.columns or cohort.get("allow_mixed_stains", False):
        return
    stains = table["stain"].astype(str).str.strip().str.lower()
    counts = stains[stains != ""].value_counts()
    if len(counts) > 1:
        raise ManifestError(
            f"{cohort.manifest}: mixed stains in one cohort ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
            "split the manifest by stain, or set cohort.allow_mixed_stains=true"
        )
    want = str(cohort.get("stain") or "").lower()
    if want and len(counts) == 1 and counts.index[0] != want:
        raise ManifestError(f"{cohort.manifest}: slides are {counts.index[0]} but cohort.stain={want}; fix one of them")
