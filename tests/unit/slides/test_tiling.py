
import cv2
import numpy as np
import pytest
import tifffile

from her2lab.data.synthetic import write_pyramid_tiff
from her2lab.errors import SlideError
from her2lab.slides.reader import Slide
from her2lab.slides.tiling import TileReader, TilingParams, tile_geometry, tile_grid
from tests.helpers import gradient_rgb


def _slide(tmp_path_factory, name: str, seed: int, downsamples: tuple[int, ...]):
    src = gradient_rgb(2048, 3072, seed=seed)
    path = tmp_path_factory.mktemp(name) / f"{name}.tiff"
    write_pyramid_tiff(path, src, mpp=0.25, downsamples=downsamples, jpeg_quality=95)
    return path, src


@pytest.fixture(scope="module")
def slide_025(tmp_path_factory):
    """A 0.25 µm/px (40x) slide with levels at 1, 2 and 8 × downsample, and its source pixels."""
    return _slide(tmp_path_factory, "s025", 1, (1, 2, 8))


@pytest.fixture(scope="module")
def slide_025_no2x(tmp_path_factory):
    """The same without a 2× level: 0.5 µm/px tiles are read at level 0 and resized."""
    return _slide(tmp_path_factory, "s025b", 2, (1, 4, 16))


def test_grid_at_exact_mpp_reads_matching_level(slide_025):
    path, _ = slide_025
    slide = Slide(path)
    g = tile_geometry(slide, TilingParams(target_mpp=0.5, patch_px=224))
    # 224 px at 0.5 µm/px = 448 level-0 px at 0.25 µm/px, read as 224 px from the 2x level
    assert (g.patch_px_level0, g.stride_level0, g.read_level, g.read_px) == (448, 448.0, 1, 224)
    assert not g.needs_resize
    mask = np.ones((2048 // 32, 3072 // 32), bool)  # full tissue at 8 µm/px
    coords, frac = tile_grid(slide.dimensions, g, mask, 8.0, 0.5)
    assert len(coords) == (3072 // 448) * (2048 // 448)
    assert (coords % 448 == 0).all() and (frac == 1).all()
    assert (coords[:, 0] + 448 <= 3072).all() and (coords[:, 1] + 448 <= 2048).all()
    # the tile's physical size is patch_px × target_mpp
    assert g.patch_px_level0 * slide.level0_mpp == pytest.approx(224 * 0.5)


def test_overlap_and_resize_from_finer_level(slide_025_no2x):
    path, _ = slide_025_no2x
    slide = Slide(path)
    g = tile_geometry(slide, TilingParams(target_mpp=0.5, patch_px=100, overlap_px=20))
    assert (g.read_level, g.read_px, g.patch_px_level0) == (0, 200, 200)  # no 2x level: resize
    assert g.needs_resize and g.stride_level0 == pytest.approx(160)
    mask = np.ones((64, 96), bool)
    coords, _ = tile_grid(slide.dimensions, g, mask, 8.0, 0.0)
    xs = np.unique(coords[:, 0])
    assert np.all(np.diff(xs) == 160)


@pytest.mark.parametrize("fixture", ["slide_025", "slide_025_no2x"])
def test_tile_matches_source_pixels(request, fixture):
    path, src = request.getfixturevalue(fixture)
    slide = Slide(path)
    g = tile_geometry(slide, TilingParams(target_mpp=0.5, patch_px=224))
    reader = TileReader(slide, g)
    for x, y in [(0, 0), (448, 896), (2240, 1344)]:
        tile = reader.read((x, y))
        assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
        want = cv2.resize(src[y : y + 448, x : x + 448], (224, 224), interpolation=cv2.INTER_AREA)
        err = np.abs(tile.astype(int) - want.astype(int))
        assert err.mean() < 3.0 and np.percentile(err, 99) < 16, (err.mean(), np.percentile(err, 99))


def test_tile_equals_decoded_level0_region(hne_cohort):
    # At the slide's own resolution a tile is exactly the stored pixels (same JPEG, decoded by
    # tifffile/imagecodecs instead of OpenSlide).
    root, _ = hne_cohort
    path = next((root / "slides").glob("*.tiff"))
    slide = Slide(path)
    g = tile_geometry(slide, TilingParams(target_mpp=0.5, patch_px=224))
    assert (g.read_level, g.read_px) == (0, 224)
    level0 = tifffile.imread(path, key=0)
    tile = TileReader(slide, g).read((1120, 672))
    ref = level0[672 : 672 + 224, 1120 : 1120 + 224]
    assert np.abs(tile.astype(int) - ref.astype(int)).mean() < 1.0


def test_tissue_fraction_filter_on_hand_made_mask():
    # 4x4 tiles of 1000 level-0 px at 1 µm/px; the mask at 250 µm/px marks the left half and one
    # quarter of tile (3, 3).
    from her2lab.slides.tiling import TileGeometry

    g = TileGeometry(patch_px=250, patch_px_level0=1000, stride_level0=1000.0, read_level=0, read_px=1000, level0_mpp=1.0)
    mask = np.zeros((16, 16), bool)
    mask[:, :8] = True
    mask[12:14, 12:14] = True
    coords, frac = tile_grid((4000, 4000), g, mask, 250.0, 0.5)
    assert sorted(map(tuple, coords.tolist())) == sorted((x, y) for x in (0, 1000) for y in (0, 1000, 2000, 3000))
    coords, frac = tile_grid((4000, 4000), g, mask, 250.0, 0.25)
    assert (3000, 3000) in set(map(tuple, coords.tolist()))
    assert frac[coords.tolist().index([3000, 3000])] == pytest.approx(0.25)


def test_bad_tiling_parameters():
    with pytest.raises(ValueError, match="overlap_px"):
        TilingParams(patch_px=224, overlap_px=224)
    with pytest.raises(ValueError, match="target_mpp"):
        TilingParams(target_mpp=0)
    assert TilingParams().name == "0.5mpp_224px_0px_overlap"


def test_tile_smaller_than_a_level0_pixel_is_an_error(slides):
    slide = Slide(slides / "coarse.tiff", mpp_override=20.0)
    with pytest.raises(SlideError) as err:  # 16 px at 0.5 µm/px = 0.4 px of a 20 µm/px slide
        tile_geometry(slide, TilingParams(target_mpp=0.5, patch_px=16))
    msg = str(err.value)
    assert "\n" not in msg and "coarse.tiff" in msg and "0.4" in msg and "mpp_override" in msg
