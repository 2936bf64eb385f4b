"""Localisation of attention maps against the generator's masks."""

from __future__ import annotations

import numpy as np


def test_each_reason_a_slide_is_not_scored_for_localisation(tmp_path):
    import cv2

    from her2lab.explain.heatmaps import SlideAttention
    from her2lab.explain.mil_maps import _localisation

    ys, xs = np.mgrid[0:4, 0:4] * 256  # 16 tiles of 256 px at 0.5 µm/px: a 2 x 2 mm square
    att = SlideAttention("s", np.stack([xs.ravel(), ys.ravel()], 1), np.tile([0.1, 0.2, 0.3, 0.4], 4) / 4, np.array([0.4, 0.6]),
                         np.full((16, 2), 0.5), 256, 0.5, "")
    mask = np.zeros((32, 32), np.uint8)  # at 8 µm/px: 64 µm a pixel, 2 px a tile
    files = {}
    for name, img in (("none", mask), ("all", mask + 255), ("half", np.pad(mask[:, :16] + 255, ((0, 0), (0, 16))))):
        files[name] = tmp_path / f"{name}.png"
        cv2.imwrite(str(files[name]), img)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    assert _localisation(att, tmp_path / "gone.png", 8.0)["skipped"] == "no ground-truth mask gone.png"
    assert _localisation(att, tmp_path / "bad.png", 8.0)["skipped"] == "ground-truth mask bad.png is not a readable image"
    assert _localisation(att, files["none"], 8.0)["skipped"] == "no positive tissue under any tile"
    assert _localisation(att, files["all"], 8.0)["skipped"] == "every tile lies in positive tissue"
    unknown = SlideAttention(**{**att.__dict__, "patch_px_level0": 0})
    assert _localisation(unknown, files["half"], 8.0)["skipped"] == "tile size or level-0 µm/px unknown"
    half = _localisation(att, files["half"], 8.0)
    assert half["skipped"] == "" and half["attention_auroc"] == 0.0  # the left half: the least attended
