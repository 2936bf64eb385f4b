"""Reading features files made elsewhere: dtype kept, non-finite rows refused or dropped."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from her2lab.errors import Her2labError
from tests.helpers import write_trident


def _poison(path: Path, rows: list[int], value: float) -> None:
    with h5py.File(path, "r+") as f:
        x = f["features"][:]
        x[rows] = value
        f["features"][...] = x


def test_read_features_keeps_the_file_dtype_and_refuses_or_drops_inf_rows(tmp_path):
    from her2lab.embed.features_file import load_bag, read_features

    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float16)
    x[[3, 40], 5] = np.inf  # float16 overflow in an encoder looks like this
    x[41, 0] = -np.inf
    path = write_trident(tmp_path / "f16.h5", x)
    with pytest.raises(Her2labError, match=r"f16\.h5: 3 of 50 tiles have non-finite features .*row 3"):
        read_features(path)
    feats, coords, dropped = load_bag(path, nonfinite="drop_tiles")
    keep = np.setdiff1d(np.arange(50), [3, 40, 41])
    assert feats.dtype == np.float16 and dropped == 3
    assert np.array_equal(feats, x[keep]) and np.array_equal(coords[:, 0], keep * 256)
    f32, _ = read_features(write_trident(tmp_path / "f64.h5", x[keep].astype(np.float64)))
    assert f32.dtype == np.float32  # float64 files are halved, never kept at 8 bytes a value
    _poison(path, list(range(50)), np.nan)
    with pytest.raises(Her2labError, match="no finite tile"):
        load_bag(path, nonfinite="drop_tiles")
    with pytest.raises(Her2labError, match=r"data.nonfinite='skip': use error or drop_tiles"):
        load_bag(path, nonfinite="skip")
