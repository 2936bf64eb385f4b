"""QuPath in and out: ROI GeoJSON files limit tiling; tissue outlines are QuPath-importable GeoJSON.

The ROI files are written literally, as QuPath exports them; the slide is a real pyramidal TIFF
read through OpenSlide (``good.tiff``: 2048² px at 0.5 µm/px, one stained ellipse of radius
682 px around (1024, 1024)).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import shapely
from omegaconf import OmegaConf
from shapely.geometry import Point, shape

from her2lab.errors import Her2labError, SlideError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.roi import read_roi, tissue_polygons
from her2lab.slides.tiles_file import read_tiles_h5
from her2lab.slides.tiling import TilingParams
from tests.helpers import hand_manifest, hand_settings

TILING = TilingParams(target_mpp=1.0, patch_px=64)  # 128 level-0 px tiles: a 16 × 16 grid
P0 = 128

# File > Export objects as GeoJSON (QuPath 0.4), "Export as FeatureCollection": a square from
# (512, 512) to (1536, 1536) with a hole (896–1152) as one MultiPolygon with a triangle far
# outside the tissue, a line and a point (ignored: no area).
QUPATH_COLLECTION = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "0b8a2e41-5f7c-4d0e-9a51-3f6c2d1e7b90",
      "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
          [
            [[512, 512], [1536, 512], [1536, 1536], [512, 1536], [512, 512]],
            [[896, 896], [896, 1152], [1152, 1152], [1152, 896], [896, 896]]
          ],
          [
            [[1900, 20], [2040, 20], [2040, 120], [1900, 20]]
          ]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "isLocked": false
      }
    },
    {
      "type": "Feature",
      "id": "5d1f0c77-2b3e-4a8f-b6c4-8e9d0a1b2c3d",
      "geometry": {"type": "LineString", "coordinates": [[100, 100], [400, 400]]},
      "properties": {"objectType": "annotation", "isLocked": false}
    },
    {
      "type": "Feature",
      "id": "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b",
      "geometry": {"type": "Point", "coordinates": [1024, 1024]},
      "properties": {"objectType": "annotation", "classification": {"name": "Other", "color": [0, 0, 200]}}
    }
  ]
}
"""

# QuPath 0.2's "Export objects": a bare list of features.
QUPATH_02_LIST = """[
  {
    "type": "Feature",
    "id": "PathAnnotationObject",
    "geometry": {
      "type": "Polygon",
      "coordinates": [
        [[512, 512], [1536, 512], [1536, 1536], [512, 1536], [512, 512]],
        [[896, 896], [896, 1152], [1152, 1152], [1152, 896], [896, 896]]
      ]
    },
    "properties": {
      "classification": {"name": "Tumor", "colorRGB": -3670016},
      "isLocked": false,
      "measurements": []
    }
  }
]
"""

# One Feature, a square in the glass corner of the slide: no tissue under it.
QUPATH_OFF_TISSUE = """{
  "type": "Feature",
  "id": "3c2b1a09-8f7e-4d6c-9b5a-4e3d2c1b0a98",
  "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [300, 10], [300, 300], [10, 300], [10, 10]]]},
  "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
}
"""

ROI = shapely.Polygon([(512, 512), (1536, 512), (1536, 1536), (512, 1536)],
                      [[(896, 896), (896, 1152), (1152, 1152), (1152, 896)]])


def _cohort(tmp_path: Path, slides: Path, ids=("s1",)):
    """Copies of good.tiff as ``ids``, their manifest, and an empty ROI folder."""
    tmp_path.mkdir(exist_ok=True)
    rows = []
    for sid in ids:
        shutil.copy(slides / "good.tiff", tmp_path / f"{sid}.tiff")
        rows.append((sid, str(tmp_path / f"{sid}.tiff"), ""))
    (tmp_path / "rois").mkdir()
    return hand_manifest(tmp_path, rows), tmp_path / "rois"


def _centres(coords: np.ndarray) -> np.ndarray:
    return coords + P0 / 2


def _orange(png: Path) -> int:
    img = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB).astype(int)
    return int(((img[..., 0] > 230) & (abs(img[..., 1] - 140) < 25) & (img[..., 2] < 40)).sum())


def test_qupath_roi_keeps_only_tiles_inside_it(slides, tmp_path):
    manifest, rois = _cohort(tmp_path, slides)
    whole = hand_settings(tmp_path / "whole", tiling=TILING, qc=True)
    prepare_cohort(manifest, whole)
    (rois / "s1.geojson").write_text(QUPATH_COLLECTION)
    inside = hand_settings(tmp_path / "roi", tiling=TILING, qc=True, roi_dir=rois)
    report = prepare_cohort(manifest, inside)
    assert list(report.status) == ["done"] and report.roi[0] == "s1.geojson"
    all_xy, all_attrs = read_tiles_h5(whole.tiles_path("s1"))
    roi_xy, attrs = read_tiles_h5(inside.tiles_path("s1"))
    assert 20 < len(roi_xy) < len(all_xy)
    assert {tuple(t) for t in roi_xy} <= {tuple(t) for t in all_xy}
    assert shapely.contains_xy(ROI, *_centres(roi_xy).T).all()
    # exactly the tissue tiles whose centre is in the square and not in its hole
    want = {tuple(t) for t in all_xy if shapely.contains_xy(ROI, *(t + P0 / 2))}
    assert {tuple(t) for t in roi_xy} == want
    hole = (1024, 1024)  # centre (1088, 1088): in the hole, over tissue
    assert hole in {tuple(t) for t in all_xy} and hole not in {tuple(t) for t in roi_xy}
    assert json.loads(attrs["params_json"])["roi"]["sha1"] and attrs["param_hash"] != all_attrs["param_hash"]
    with h5py.File(inside.tiles_path("s1")) as f:
        assert len(f["tissue_fraction"]) == len(roi_xy)
    # the QC picture draws the ROI (orange); without one, none
    assert _orange(inside.qc_path("s1")) > 200 and _orange(whole.qc_path("s1")) < 20


def test_qupath_02_list_and_single_feature_forms(slides, tmp_path):
    listed = tmp_path / "list.geojson"
    listed.write_text(QUPATH_02_LIST)
    roi = read_roi(listed)
    assert roi.area.equals(ROI)
    single = tmp_path / "single.geojson"
    single.write_text(QUPATH_OFF_TISSUE)
    assert read_roi(single).area.area == 290 * 290
    # a self-intersecting polygon (a bow tie drawn in QuPath's polygon tool) is repaired, not refused
    bow = tmp_path / "bow.geojson"
    bow.write_text('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
                   '[[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}, "properties": {"objectType": "annotation"}}')
    area = read_roi(bow).area
    assert area.is_valid and area.area == pytest.approx(5000)
    # the list form tiles the same as the collection's square
    manifest, rois = _cohort(tmp_path / "c", slides)
    (rois / "s1.geojson").write_text(QUPATH_02_LIST)
    settings = hand_settings(tmp_path / "cache", tiling=TILING, roi_dir=rois)
    prepare_cohort(manifest, settings)
    xy, _ = read_tiles_h5(settings.tiles_path("s1"))
    assert len(xy) > 20 and shapely.contains_xy(ROI, *_centres(xy).T).all()


def test_roi_off_tissue_fails_that_slide_and_a_slide_without_roi_is_tiled_whole(slides, tmp_path):
    manifest, rois = _cohort(tmp_path, slides, ids=("off", "plain"))
    before = hand_settings(tmp_path / "cache", tiling=TILING)
    prepare_cohort(manifest, before)  # no roi_dir: both whole
    plain_xy, plain_attrs = read_tiles_h5(before.tiles_path("plain"))
    (rois / "off.geojson").write_text(QUPATH_OFF_TISSUE)
    settings = hand_settings(tmp_path / "cache", tiling=TILING, roi_dir=rois)
    report = prepare_cohort(manifest, settings).set_index("slide_id")
    # the slide without a file keeps its tiles and their hash: the cache made without roi_dir is reused
    assert report.status["plain"] == "skipped"
    xy, attrs = read_tiles_h5(settings.tiles_path("plain"))
    assert np.array_equal(xy, plain_xy) and attrs["param_hash"] == plain_attrs["param_hash"]
    assert "roi" not in json.loads(attrs["params_json"])
    assert report.status["off"] == "failed"
    error = pd.read_csv(tmp_path / "cache" / "failures.csv").set_index("slide_id")["error"]["off"]
    assert "no tiles inside ROI" in error and "off.geojson" in error and "\n" not in error
    # the failed slide's old tiles (made without the ROI) are not taken as current
    assert prepare_cohort(manifest, settings).set_index("slide_id").status["off"] == "failed"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"type": "FeatureCollection", "features": [{"type": "Feature",', r"not valid JSON \(line 1 column"),
        ('{"annotations": []}', "not GeoJSON features"),
        ('{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}}',
         "no polygon in the ROI file"),
        ('{"type": "FeatureCollection", "features": []}', "no polygon in the ROI file"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]',
         "feature 0 has a malformed Polygon"),
        ("\udcff", "not valid JSON \\(not UTF-8\\)"),
    ],
)
def test_bad_roi_file_is_one_line_naming_it(tmp_path, text, match):
    path = tmp_path / "S 01.geojson"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SlideError, match=match) as err:
        read_roi(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_malformed_roi_fails_its_slide_in_prepare(slides, tmp_path):
    manifest, rois = _cohort(tmp_path, slides)
    (rois / "s1.geojson").write_text(QUPATH_COLLECTION[:200])
    report = prepare_cohort(manifest, hand_settings(tmp_path / "cache", tiling=TILING, roi_dir=rois))
    assert list(report.status) == ["failed"] and "s1.geojson: not valid JSON" in report.error[0]


def test_a_changed_added_or_removed_roi_reprepares_the_slide(slides, tmp_path):
    manifest, rois = _cohort(tmp_path, slides)
    settings = hand_settings(tmp_path / "cache", tiling=TILING, roi_dir=rois)
    prepare_cohort(manifest, settings)
    whole, _ = read_tiles_h5(settings.tiles_path("s1"))
    roi = rois / "s1.geojson"
    roi.write_text(QUPATH_02_LIST)  # added after a run without it: not the whole-slide tiles
    assert list(prepare_cohort(manifest, settings).status) == ["done"]
    first, _ = read_tiles_h5(settings.tiles_path("s1"))
    assert len(first) < len(whole)
    assert list(prepare_cohort(manifest, settings).status) == ["skipped"]
    roi.write_text(QUPATH_02_LIST.replace("1536", "1280"))  # redrawn smaller
    assert list(prepare_cohort(manifest, settings).status) == ["done"]
    second, _ = read_tiles_h5(settings.tiles_path("s1"))
    assert 0 < len(second) < len(first)
    roi.unlink()  # removed: tiled whole again
    assert list(prepare_cohort(manifest, settings).status) == ["done"]
    assert np.array_equal(read_tiles_h5(settings.tiles_path("s1"))[0], whole)


def test_roi_dir_from_config_and_a_missing_folder(slides, tmp_path):
    base = {"cohort": {"cache_dir": str(tmp_path)}, "tiling": TILING.to_dict(), "tissue": {},
            "prepare": {"thumb_mpp": 8.0, "qc": False, "overwrite": False}}
    cfg = OmegaConf.create(base)
    OmegaConf.set_struct(cfg, True)  # a run config from before roi_dir
    assert PrepareSettings.from_config(cfg).roi_dir is None
    cfg = OmegaConf.create({**base, "cohort": {"cache_dir": str(tmp_path), "roi_dir": str(tmp_path / "nope")}})
    settings = PrepareSettings.from_config(cfg)
    assert settings.roi_dir == tmp_path / "nope"
    manifest, _ = _cohort(tmp_path, slides)
    with pytest.raises(Her2labError, match=r"cohort.roi_dir=.*nope: no such folder"):
        prepare_cohort(manifest, settings)


# --- tissue outlines --------------------------------------------------------------------------


def _outline(path: Path) -> list:
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"]
    return doc["features"]


def test_tissue_outline_is_qupath_geojson_matching_the_mask_and_tiles(slides, tmp_path):
    manifest, _ = _cohort(tmp_path, slides)
    settings = hand_settings(tmp_path / "cache", tiling=TILING)
    prepare_cohort(manifest, settings)
    path = settings.outline_path("s1")
    assert path == tmp_path / "cache" / "outlines" / TILING.name / "s1.geojson"
    features = _outline(path)
    polys = []
    for f in features:
        assert f["type"] == "Feature" and str(uuid.UUID(f["id"], version=4)) == f["id"]
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tissue"
        assert len(f["properties"]["classification"]["color"]) == 3
        assert f["geometry"]["type"] == "Polygon"
        for ring in f["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
        p = shape(f["geometry"])
        assert p.is_valid and p.exterior.is_ccw  # RFC 7946: counter-clockwise outside
        polys.append(p)
    assert len(polys) == 1  # one ellipse
    with h5py.File(settings.tiles_path("s1")) as f:
        mask, mask_mpp, level0_mpp = f["tissue_mask"][:], f.attrs["mask_mpp"], f.attrs["level0_mpp"]
    tissue = shapely.union_all(polys)
    assert tissue.area * level0_mpp**2 == pytest.approx(mask.sum() * mask_mpp**2, rel=0.02)
    assert tissue.area == pytest.approx(np.pi * 682**2, rel=0.05)
    xy, _ = read_tiles_h5(settings.tiles_path("s1"))
    assert shapely.contains_xy(tissue, *_centres(xy).T).all()
    # an older cache without outlines gets them on the next run, with the same tiles and hash
    _, attrs = read_tiles_h5(settings.tiles_path("s1"))
    path.unlink()
    assert list(prepare_cohort(manifest, settings).status) == ["done"] and path.exists()
    xy2, attrs2 = read_tiles_h5(settings.tiles_path("s1"))
    assert np.array_equal(xy, xy2) and attrs2["param_hash"] == attrs["param_hash"]
    assert list(prepare_cohort(manifest, settings).status) == ["skipped"]


def test_tissue_polygons_keep_holes_islands_and_thin_strands():
    mask = np.zeros((120, 160), bool)
    cv2.circle(mask.view(np.uint8), (50, 60), 40, 1, -1)
    cv2.circle(mask.view(np.uint8), (50, 60), 20, 0, -1)  # a hole …
    cv2.circle(mask.view(np.uint8), (50, 60), 6, 1, -1)  # … with an island in it
    mask[10:110, 130] = True  # a one-pixel strand
    mask[0:30, 140:160] = True  # touching the image border
    mask[15, 150] = False  # a one-pixel hole
    scale = 16.0  # level-0 px per mask px
    polys = tissue_polygons(mask, scale)
    assert all(p.is_valid and p.area > 0 for p in polys)
    n_components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1
    assert len(polys) == n_components == 4
    big = max(polys, key=lambda p: p.area)
    assert len(big.interiors) == 1
    total = sum(p.area for p in polys) / scale**2
    assert total == pytest.approx(mask.sum(), rel=0.02)
    # every mask pixel's centre lies inside, every background pixel's outside (away from the edges)
    union = shapely.union_all(polys)
    ys, xs = np.mgrid[0:120, 0:160]
    inside = shapely.contains_xy(union, (xs.ravel() + 0.5) * scale, (ys.ravel() + 0.5) * scale).reshape(mask.shape)
    assert (inside == mask).mean() > 0.97
    assert shapely.contains_xy(union, 130.5 * scale, 60.5 * scale)  # the strand
    assert not union.contains(Point(150.5 * scale, 15.5 * scale))  # the one-pixel hole
    x0, y0, x1, y1 = union.bounds
    assert y0 == 0 and x1 == 160 * scale  # the image's edges, not half a pixel off
    assert x0 == pytest.approx(10 * scale, abs=scale / 4) and y1 <= 120 * scale  # within a mask pixel
