"""Shared fixtures: real, small artefacts generated in temporary folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from her2lab.data.synthetic import SyntheticConfig, generate_cohort

SMALL = {"width_px": 4096, "height_px": 3072}  # the demo size: 2 × 1.5 mm at 0.5 µm/px


def _cohort(tmp_path_factory, stain: str) -> tuple[Path, SyntheticConfig]:
    root = tmp_path_factory.mktemp(f"demo_{stain}")
    cfg = SyntheticConfig(n_slides=8, n_pairs=2, stain=stain, seed=3, **SMALL)
    generate_cohort(root, cfg, num_workers=2)
    return root, cfg


@pytest.fixture(scope="session")
def hne_cohort(tmp_path_factory) -> tuple[Path, SyntheticConfig]:
    """8 synthetic H&E slides (4096×3072 px at 0.5 µm/px), two patients with two slides."""
    return _cohort(tmp_path_factory, "hne")


@pytest.fixture(scope="session")
def ihc_cohort(tmp_path_factory) -> tuple[Path, SyntheticConfig]:
    """The IHC twin of :func:`hne_cohort` (same cases, DAB membrane staining)."""
    return _cohort(tmp_path_factory, "ihc")


def gradient_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, non-periodic RGB test image (JPEG keeps it close to the source)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 97 + rng.uniform(0, 6)) * np.cos(yy / 131),
            128 + 90 * np.cos(xx / 53 + yy / 71),
            128 + 80 * np.sin((xx + yy) / 113 + rng.uniform(0, 6)),
        ],
        -1,
    )
    return np.clip(img, 0, 255).astype(np.uint8)
