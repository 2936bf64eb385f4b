
import cv2
import numpy as np
import pytest
import tifffile

from her2lab.errors import SlideError
from her2lab.slides.reader import Slide, resolve_mpp
from tests.helpers import gradient_rgb, tissue_image


@pytest.mark.parametrize(
    ("props", "mpp", "source"),
    [
        ({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527", "aperio.MPP": "9"}, 0.2527, "openslide"),
        ({"aperio.MPP": "0.499"}, 0.499, "aperio.MPP"),
        ({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}, 0.25, "tiff-resolution"),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, 0.5, "tiff-resolution"),
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}, None, None),
        ({"openslide.objective-power": "20"}, 0.5, "objective-power"),
        ({"openslide.mpp-x": "0", "openslide.objective-power": "40"}, 0.25, "objective-power"),
        ({}, None, None),
    ],
)
def test_mpp_resolution_order(props, mpp, source):
    got = resolve_mpp(props)
    if mpp is None:
        assert got is None
    else:
        assert got.mean == pytest.approx(mpp) and got.source == source


def test_override_wins_over_metadata():
    got = resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, override=0.5)
    assert (got.mean, got.source) == (0.5, "override")
    with pytest.raises(SlideError, match="not a positive number"):
        resolve_mpp({}, override=-1)


def _tiff_without_mpp(path):
    img = gradient_rgb(1024, 1024)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression="jpeg", photometric="rgb")
        tw.write(img[::4, ::4].copy(), tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1)


def test_no_mpp_is_a_one_line_error_naming_the_override(tmp_path):
    path = tmp_path / "nompp.tiff"
    _tiff_without_mpp(path)
    with pytest.raises(SlideError) as err:
        Slide(path)
    msg = str(err.value)
    assert "\n" not in msg and "nompp.tiff" in msg and "mpp_override" in msg
    slide = Slide(path, mpp_override=0.25)
    assert slide.mpp.source == "override" and slide.level_mpp(1) == pytest.approx(1.0)


def test_level_choice_and_read_at_mpp(hne_cohort):
    root, cfg = hne_cohort
    slide = Slide(next((root / "slides").glob("*.tiff")))
    assert slide.mpp.source == "openslide" and slide.level0_mpp == 0.5
    # levels at 0.5, 2, 8 µm/px: the coarsest level at least as fine as the target
    assert slide.level_for_mpp(0.5) == 0
    assert slide.level_for_mpp(1.0) == 0
    assert slide.level_for_mpp(2.0) == 1
    assert slide.level_for_mpp(6.0) == 1
    assert slide.level_for_mpp(8.0) == 2
    assert slide.level_for_mpp(32.0) == 2
    low = slide.read_at_mpp(4.0)
    assert low.shape == (cfg.height_px // 8, cfg.width_px // 8, 3) and low.dtype == np.uint8
    with Slide(slide.path, tile_cache=False) as uncached:  # the same pixels, nothing kept
        assert (uncached.read_at_mpp(4.0) == low).all()
        region = ((100, 50), 0, (64, 32))
        assert (uncached.read_region(*region) == slide.read_region(*region)).all()


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "directory"])
def test_bad_files_are_one_line_errors(tmp_path, hne_cohort, kind):
    root, _ = hne_cohort
    if kind == "missing":
        path = tmp_path / "nope.svs"
    elif kind == "text":
        path = tmp_path / "notes.tiff"
        path.write_text("this is not a slide\n")
    elif kind == "truncated":
        src = next((root / "slides").glob("*.tiff")).read_bytes()
        path = tmp_path / "cut.tiff"
        path.write_bytes(src[: len(src) // 3])
    else:
        path = tmp_path / "folder.svs"
        path.mkdir()
    with pytest.raises(SlideError) as err:
        slide = Slide(path)
        # a truncated file may open (header intact) and fail only when its pixels are read
        for lvl in range(slide.level_count):
            slide.read_region((0, 0), lvl, slide.level_dimensions[lvl])
    msg = str(err.value)
    assert "\n" not in msg and path.name in msg


# --- resolution -------------------------------------------------------------------------------

def test_72_dpi_tag_is_an_error_at_open_naming_the_fix(slides):
    with pytest.raises(SlideError) as err:
        Slide(slides / "dpi72.tiff")
    msg = str(err.value)
    assert "\n" not in msg and "dpi72.tiff" in msg
    assert "352.8 µm/px" in msg and "72 per inch" in msg  # the value and where it came from
    assert "cohort.mpp_override" in msg and "`mpp` column" in msg
    # with a plausible override it opens, and the override is what it uses
    s = Slide(slides / "dpi72.tiff", mpp_override=0.5)
    assert (s.level0_mpp, s.mpp.source) == (0.5, "override")


@pytest.mark.parametrize("override", [353.0, 0.001])
def test_implausible_override_is_refused_naming_it(slides, override):
    with pytest.raises(SlideError) as err:
        Slide(slides / "good.tiff", mpp_override=override)
    msg = str(err.value)
    assert "\n" not in msg and "good.tiff" in msg and f"{override:g}" in msg and "override" in msg


# --- no upsampling ----------------------------------------------------------------------------

def test_read_at_mpp_never_upsamples(slides):
    slide = Slide(slides / "coarse.tiff")
    assert slide.level0_mpp == pytest.approx(10.0)
    with pytest.raises(SlideError, match=r"coarse.tiff: .*8 µm/px is finer than the slide's level 0 \(10 µm/px"):
        slide.read_at_mpp(8.0)
    img, mpp = slide.read_lowres(8.0)  # the slide's own pixels, and their resolution
    assert img.shape == (512, 512, 3) and mpp == pytest.approx(10.0)
    img, mpp = slide.read_lowres(40.0)
    assert img.shape == (128, 128, 3) and mpp == pytest.approx(40.0)


# --- truncated and foreign files --------------------------------------------------------------

@pytest.mark.parametrize("cut", ["half", "4kb", "empty"])
def test_truncated_slide_says_truncated_and_to_recopy(slides, tmp_path, cut):
    data = (slides / "good.tiff").read_bytes()
    n = {"half": len(data) // 2, "4kb": 4096, "empty": 0}[cut]
    path = tmp_path / "cut.tiff"
    path.write_bytes(data[:n])
    with pytest.raises(SlideError) as err:
        slide = Slide(path)
        for lvl in range(slide.level_count):
            slide.read_region((0, 0), lvl, slide.level_dimensions[lvl])
    msg = str(err.value)
    assert "\n" not in msg and "cut.tiff" in msg and "re-copy" in msg
    assert "truncated" in msg and "convert" not in msg


def test_complete_files_of_other_formats_are_told_to_convert(tmp_path):
    cv2.imwrite(str(tmp_path / "photo.png"), tissue_image(64))
    (tmp_path / "notes.tiff").write_text("slide_id,path\n")
    # a complete, strip-based TIFF: OpenSlide reads only tiled ones
    tifffile.imwrite(tmp_path / "strips.tiff", tissue_image(256), photometric="rgb", resolution=(20_000, 20_000),
                     resolutionunit="CENTIMETER")
    msgs = {}
    for name in ("photo.png", "notes.tiff", "strips.tiff"):
        with pytest.raises(SlideError) as err:
            Slide(tmp_path / name)
        msgs[name] = msg = str(err.value)
        assert "\n" not in msg and name in msg and "convert" in msg and "truncated" not in msg
    assert "not a slide format" in msgs["photo.png"] and "not a slide format" in msgs["notes.tiff"]
    assert "complete TIFF" in msgs["strips.tiff"] and "strips instead of tiles" in msgs["strips.tiff"]
