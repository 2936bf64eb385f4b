"""Cohort configs: stains, synthetic id prefixes."""

from __future__ import annotations

import pandas as pd
import pytest

from her2lab.errors import Her2labError, ManifestError
from tests.helpers import compose_config


def test_mixed_stains_in_one_manifest_are_an_error(tmp_path):
    from omegaconf import OmegaConf

    from her2lab.data.cohort_config import check_stains

    table = pd.DataFrame({"slide_id": ["a", "b", "c"], "stain": ["hne", "ihc", "ihc"]})
    cohort = OmegaConf.create({"manifest": "m.csv", "stain": "ihc"})
    with pytest.raises(ManifestError, match=r"mixed stains in one cohort \(ihc: 2, hne: 1\)"):
        check_stains(table, cohort)
    check_stains(table, OmegaConf.merge(cohort, {"allow_mixed_stains": True}))
    with pytest.raises(ManifestError, match="slides are hne but cohort.stain=ihc"):
        check_stains(table.head(1), cohort)


def test_unsafe_synthetic_id_prefix_is_refused_before_any_write(tmp_path):
    from her2lab.data.cohort_config import resolve_cohort

    cfg = compose_config("prepare", [f"paths.data_dir={tmp_path / 'data'}", "cohort.synthetic.n_slides=2",
                              "cohort.synthetic.n_pairs=0", "cohort.synthetic.width_px=1024",
                              "cohort.synthetic.height_px=768", "cohort.synthetic.mpp=1.0",
                              "++cohort.synthetic.id_prefix=../../"])
    with pytest.raises(Her2labError, match=r"cohort.synthetic: synthetic id_prefix '../../' cannot start file names"):
        resolve_cohort(cfg.cohort)
    assert not any(tmp_path.rglob("*"))
