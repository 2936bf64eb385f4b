"""Output files get the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from her2lab.io import atomic_path, current_umask, write_h5
from her2lab.slides.thumbnails import save_png

TINY = {"width_px": 1024, "height_px": 768, "mpp": 1.0}  # 1 × 0.77 mm: the smallest the generator makes


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _tiny_cohort(root: Path, n: int = 2, **kw) -> tuple[Path, SyntheticConfig]:
    cfg = SyntheticConfig(n_slides=n, n_pairs=0, seed=5, **TINY, **kw)
    return generate_cohort(root, cfg, num_workers=1), cfg


# --- output file modes -------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_users_umask(tmp_path, umask):
    want = 0o666 & ~umask  # 0644 under 022, 0664 under 002
    assert current_umask() == umask
    write_h5(tmp_path / "f.h5", {"coords": np.zeros((3, 2), np.int64)}, {"slide_id": "s"})
    with atomic_path(tmp_path / "t.csv") as tmp:
        pd.DataFrame({"a": [1]}).to_csv(tmp, index=False)
    save_png(tmp_path / "p.png", np.zeros((4, 4, 3), np.uint8))
    _tiny_cohort(tmp_path / "demo", n=1)
    outs = [tmp_path / "f.h5", tmp_path / "t.csv", tmp_path / "p.png", *_files(tmp_path / "demo")]
    assert len(outs) == 3 + 6  # cohort.json, manifest.csv, slide, three masks
    assert {p.name: oct(_mode(p)) for p in outs} == {p.name: oct(want) for p in outs}
