"""Shared fixtures: real, small artefacts generated in temporary folders, made once a session."""

from __future__ import annotations

from pathlib import Path

import pytest

from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from tests.helpers import prepare_thumbnails, save_random_weights, thumb_records, write_hand_slide

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


@pytest.fixture(scope="session")
def r18_weights(tmp_path_factory) -> Path:
    """Random ResNet-18 weights (seed 0) in a ``.pt`` file; tests only read it."""
    return save_random_weights(tmp_path_factory.mktemp("weights") / "r18.pt")


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> Path:
    """Slides written by hand with tifffile, never by the synthetic-cohort generator."""
    d = tmp_path_factory.mktemp("slides")
    write_hand_slide(d / "good.tiff")  # 0.5 µm/px, 1 × 1 mm
    write_hand_slide(d / "dpi72.tiff", res=(72, 72), unit="INCH")  # the same pixels, a generic 72 dpi tag
    write_hand_slide(d / "coarse.tiff", size=512, res=(1000, 1000))  # 10 µm/px: coarser than the 8 µm/px mask
    return d


@pytest.fixture(scope="session")
def ihc_thumbs(ihc_cohort, tmp_path_factory):
    """Tiles and 8 µm/px thumbnails of :func:`ihc_cohort`: settings, manifest, records, cohort root."""
    root, _ = ihc_cohort
    settings, manifest = prepare_thumbnails(tmp_path_factory.mktemp("thumbs"), root)
    return settings, manifest, thumb_records(settings, manifest), root
