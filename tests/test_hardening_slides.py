"""Slides and files no one here made: wrong resolution tags, truncated copies, full disks, killed runs.

Every slide is written by hand with tifffile (top-level pages, ``subfiletype=1`` for the reduced
levels, as OpenSlide reads generic TIFFs), never by the synthetic-cohort generator.
"""

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from her2lab.data.cohort import load_manifest
from her2lab.errors import OutputError, SlideError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.reader import Slide
from her2lab.slides.tiles_file import read_tiles_h5
from her2lab.slides.tiling import TilingParams, tile_geometry
from her2lab.slides.tissue import TissueParams

REPO = Path(__file__).resolve().parents[1]
TILING = TilingParams(target_mpp=2.0, patch_px=64)


def _tissue(size: int) -> np.ndarray:
    """Grey glass with one stained ellipse (axes size/3), a little noise so JPEG has texture."""
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 235, np.uint8)
    cv2.ellipse(img, (size // 2, size // 2), (size // 3, size // 3), 0, 0, 360, (170, 90, 160), -1)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def _slide(path: Path, size: int = 2048, res: tuple[float, float] = (20_000, 20_000), unit: str = "CENTIMETER") -> Path:
    """A two-level tiled JPEG TIFF written by hand; ``res`` pixels per ``unit`` at level 0."""
    img = _tissue(size)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression="jpeg", photometric="rgb", resolution=res, resolutionunit=unit)
        tw.write(img[::4, ::4].copy(), tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1,
                 resolution=(res[0] / 4, res[1] / 4), resolutionunit=unit)
    return path


def _manifest(folder: Path, rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    text = "slide_id,patient_id,path,her2_score,mpp\n" + "".join(
        f"{sid},P{i},{p},0,{mpp}\n" for i, (sid, p, mpp) in enumerate(rows)
    )
    (folder / "manifest.csv").write_text(text)
    return load_manifest(folder / "manifest.csv")


def _settings(cache: Path, **kw) -> PrepareSettings:
    return PrepareSettings(cache_dir=cache, tiling=kw.pop("tiling", TILING), tissue=kw.pop("tissue", TissueParams()),
                           qc=kw.pop("qc", False), **kw)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    _slide(d / "good.tiff")  # 0.5 µm/px, 1 × 1 mm
    _slide(d / "dpi72.tiff", res=(72, 72), unit="INCH")  # the same pixels, a generic 72 dpi tag
    _slide(d / "coarse.tiff", size=512, res=(1000, 1000))  # 10 µm/px: coarser than the 8 µm/px mask
    return d


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


def test_a_corrected_mpp_reprepares_the_slide(slides, tmp_path):
    settings = _settings(tmp_path / "cache")
    prepare_cohort(_manifest(tmp_path, [("dpi72", str(slides / "dpi72.tiff"), "0.5")]), settings)
    report = prepare_cohort(_manifest(tmp_path, [("dpi72", str(slides / "dpi72.tiff"), "0.25")]), settings)
    assert list(report.status) == ["done"]  # not "skipped" with tiles cut at 0.5 µm/px
    _, attrs = read_tiles_h5(settings.tiles_path("dpi72"))
    assert attrs["level0_mpp"] == 0.25 and attrs["patch_px_level0"] == 512


def test_tile_smaller_than_a_level0_pixel_is_an_error(slides):
    slide = Slide(slides / "coarse.tiff", mpp_override=20.0)
    with pytest.raises(SlideError) as err:  # 16 px at 0.5 µm/px = 0.4 px of a 20 µm/px slide
        tile_geometry(slide, TilingParams(target_mpp=0.5, patch_px=16))
    msg = str(err.value)
    assert "\n" not in msg and "coarse.tiff" in msg and "0.4" in msg and "mpp_override" in msg


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


def test_slide_coarser_than_the_mask_is_segmented_at_its_own_resolution(slides, tmp_path):
    manifest = _manifest(tmp_path, [("coarse", str(slides / "coarse.tiff"), "")])
    settings = _settings(tmp_path / "cache", tiling=TilingParams(target_mpp=20.0, patch_px=16), thumb_mpp=16.0)
    report = prepare_cohort(manifest, settings)
    assert list(report.status) == ["done"], report.error.tolist()
    with h5py.File(settings.tiles_path("coarse")) as f:
        mask, attrs = f["tissue_mask"][:], dict(f.attrs)
        frac = f["tissue_fraction"][:]
    assert mask.shape == (512, 512) and attrs["mask_mpp"] == pytest.approx(10.0)  # not upsampled to 640
    # tissue area in mm² from the mask at its recorded mpp: the ellipse is π·(170 px · 10 µm)²
    want = np.pi * (170 * 10e-3) ** 2
    assert report.tissue_mm2[0] == pytest.approx(want, rel=0.05)
    assert mask.sum() * attrs["mask_mpp"] ** 2 / 1e6 == pytest.approx(want, rel=0.05)
    assert (frac >= 0.5).all() and len(frac) == pytest.approx(want / (0.32**2), rel=0.15)
    thumb = cv2.imread(str(settings.thumb_path("coarse")))
    assert thumb.shape[:2] == (320, 320)  # 512 px × 10 / 16


# --- one bad slide among good ones -----------------------------------------------------------

def test_bad_resolution_slide_fails_alone_in_prepare_and_an_override_fixes_it(slides, tmp_path):
    manifest = _manifest(tmp_path, [("good", str(slides / "good.tiff"), ""),
                                    ("dpi72", str(slides / "dpi72.tiff"), "")])
    settings = _settings(tmp_path / "cache")
    report = prepare_cohort(manifest, settings, num_workers=2).set_index("slide_id")
    assert report.status["good"] == "done" and report.status["dpi72"] == "failed"
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv").set_index("slide_id")["error"]
    assert list(failures.index) == ["dpi72"] and "mpp_override" in failures["dpi72"]
    assert not settings.tiles_path("dpi72").exists()
    # the advice followed: the same pixels at 0.5 µm/px tile exactly like the good slide
    manifest = _manifest(tmp_path, [("good", str(slides / "good.tiff"), ""),
                                    ("dpi72", str(slides / "dpi72.tiff"), "0.5")])
    report = prepare_cohort(manifest, settings).set_index("slide_id")
    assert report.status["good"] == "skipped" and report.status["dpi72"] == "done"
    good, _ = read_tiles_h5(settings.tiles_path("good"))
    fixed, attrs = read_tiles_h5(settings.tiles_path("dpi72"))
    assert attrs["mpp_source"] == "override" and attrs["patch_px_level0"] == 256
    assert len(good) > 20 and np.array_equal(good, fixed)


def _encoder():
    import torch

    from her2lab.embed.backbones import BackboneSpec, build_encoder

    torch.manual_seed(0)
    return build_encoder(BackboneSpec(name="resnet18", input_px=64, target_mpp=2.0, pretrained=False, preset="r18"))


def _old_tiles_file(path: Path, slide: Path, **attrs) -> Path:
    """A tiles file as an older prepare wrote it for the 72 dpi slide: 0-px tiles."""
    with h5py.File(path, "w") as f:
        f["coords"] = np.zeros((4, 2), np.int64)
        f.attrs.update({
            "slide_id": slide.stem, "slide_path": str(slide), "slide_bytes": slide.stat().st_size,
            "level0_mpp": 352.78, "mpp_source": "openslide", "target_mpp": 2.0, "patch_px": 64,
            "patch_px_level0": 0, "stride_level0": 0.36, "read_level": 0, "read_px": 0,
            "tiling": TILING.name, "param_hash": "old", **attrs,
        })
    return path


def _prepared_good(slides: Path, tmp_path: Path) -> tuple:
    manifest = _manifest(tmp_path, [("good", str(slides / "good.tiff"), "")])
    settings = _settings(tmp_path / "cache")
    prepare_cohort(manifest, settings)
    return ("good", str(slides / "good.tiff"), None, settings.tiles_path("good"))


@pytest.mark.parametrize("kind", ["zero_px_tiles", "clam_patches", "bad_level"])
def test_extraction_isolates_a_bad_slide(slides, tmp_path, kind):
    from her2lab.embed.extract import extract_cohort

    good = _prepared_good(slides, tmp_path)
    bad_tiles = tmp_path / "bad.h5"
    if kind == "zero_px_tiles":
        _old_tiles_file(bad_tiles, slides / "dpi72.tiff")
    elif kind == "bad_level":  # plausible sizes, but a pyramid level the slide does not have
        _old_tiles_file(bad_tiles, slides / "dpi72.tiff", patch_px_level0=256, read_px=64, read_level=7,
                        stride_level0=256.0, level0_mpp=0.5)
    else:  # CLAM's create_patches_fp.py layout: a `coords` dataset with patch_level/patch_size attributes
        with h5py.File(bad_tiles, "w") as f:
            d = f.create_dataset("coords", data=np.array([[0, 0], [256, 0]], np.int64))
            d.attrs.update({"patch_level": 0, "patch_size": 256, "downsample": [1.0, 1.0]})
    items = [("dpi72", str(slides / "dpi72.tiff"), 0.5, bad_tiles), good]
    report = extract_cohort(items, _encoder(), tmp_path / "features").set_index("slide_id")
    assert report.status["good"] == "done" and report.status["dpi72"] == "failed"
    msg = report.error["dpi72"]
    assert "\n" not in msg and ("bad.h5" in msg or "dpi72.tiff" in msg)
    assert "prepare" in msg  # the fix: re-run prepare
    why = {"zero_px_tiles": "tiles of 0 level-0 px", "clam_patches": "not a her2lab tiles file",
           "bad_level": "pyramid level 7 asked for, the slide has 2"}[kind]
    assert why in msg
    with h5py.File(tmp_path / "features" / "good.h5") as f:
        assert f["features"].shape == (len(f["coords"]), 512) and np.isfinite(f["features"][:]).all()


def test_peer_features_file_in_the_features_folder_is_named_not_mistaken(slides, tmp_path):
    from her2lab.embed.extract import extract_cohort

    good = _prepared_good(slides, tmp_path)
    out = tmp_path / "features"
    out.mkdir()
    with h5py.File(out / "good.h5", "w") as f:  # TRIDENT / CLAM features: no attributes at all
        f["features"] = np.zeros((3, 512), np.float32)
        f["coords"] = np.zeros((3, 2), np.int64)
    from her2lab.errors import StaleCacheError

    with pytest.raises(StaleCacheError) as err:
        extract_cohort([good], _encoder(), out)
    msg = str(err.value)
    assert "\n" not in msg and "good.h5" in msg and "not made by her2lab" in msg and "extract.overwrite=true" in msg


def test_run_extract_writes_failures_csv_beside_the_features(slides, tmp_path):
    from hydra import compose, initialize_config_dir

    from her2lab import CONF_DIR
    from her2lab.run.extract import run_extract

    _manifest(tmp_path, [("good", str(slides / "good.tiff"), ""), ("dpi72", str(slides / "dpi72.tiff"), "")])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("extract", [
            "cohort=custom", f"cohort.manifest={tmp_path / 'manifest.csv'}", f"paths.data_dir={tmp_path / 'data'}",
            "backbone=timm", "backbone.name=resnet18", "backbone.weights=null", "backbone.pretrained=false",
            "backbone.input_px=64", "backbone.target_mpp=2.0", "prepare.qc=false", "num_workers=1",
            f"paths.output_dir={tmp_path / 'out'}",
        ])
    report = run_extract(cfg).set_index("slide_id")
    assert report.status["good"] == "done" and report.status["dpi72"] == "failed"
    folder = tmp_path / "data" / "custom" / "features" / "2mpp_64px_0px_overlap" / "resnet18"
    failures = pd.read_csv(folder / "failures.csv")
    assert list(failures.slide_id) == ["dpi72"] and list(failures.stage) == ["prepare"]
    assert "mpp_override" in failures.error[0] and failures.path[0].endswith("dpi72.tiff")
    assert (folder / "good.h5").exists() and not (folder / "dpi72.h5").exists()


# --- full disk --------------------------------------------------------------------------------

def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_the_reports_is_one_line_and_keeps_the_slides(slides, tmp_path, monkeypatch, caplog):
    manifest = _manifest(tmp_path, [("good", str(slides / "good.tiff"), ""),
                                    ("dpi72", str(slides / "dpi72.tiff"), "")])
    settings = _settings(tmp_path / "cache", qc=True)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _enospc)
    with caplog.at_level(logging.WARNING), pytest.raises(OutputError) as err:
        prepare_cohort(manifest, settings)
    msg = str(err.value)
    assert "\n" not in msg and "prepare_report.csv" in msg and "disk full" in msg and "cohort.cache_dir" in msg
    # the failed slide's reason was logged before the reports were attempted
    assert any("dpi72.tiff" in r.getMessage() and "mpp_override" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    coords, attrs = read_tiles_h5(settings.tiles_path("good"))
    assert len(coords) > 20 and attrs["slide_id"] == "good"
    assert cv2.imread(str(settings.thumb_path("good"))) is not None and settings.qc_path("good").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    # resumes: nothing redone, reports now written
    report = prepare_cohort(manifest, settings).set_index("slide_id")
    assert report.status["good"] == "skipped" and (tmp_path / "cache" / "prepare_report.csv").exists()


def test_disk_full_writing_a_slide_stops_in_one_line_and_leaves_no_half_file(slides, tmp_path, monkeypatch):
    import shutil

    for sid in ("a", "b", "c"):
        shutil.copy(slides / "good.tiff", tmp_path / f"{sid}.tiff")
    manifest = _manifest(tmp_path, [(s, str(tmp_path / f"{s}.tiff"), "") for s in ("a", "b", "c")])
    settings = _settings(tmp_path / "cache")
    real = Path.write_bytes

    def write_bytes(self, data):  # the disk fills up while slide b's tiles file is written
        if self.name.startswith(".b."):
            real(self, bytes(data)[:100])  # part of it reached the disk
            _enospc()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OutputError) as err:
        prepare_cohort(manifest, settings)
    msg = str(err.value)
    assert "\n" not in msg and "b.h5" in msg and "disk full" in msg and "cohort.cache_dir" in msg
    monkeypatch.undo()
    assert len(read_tiles_h5(settings.tiles_path("a"))[0]) > 20 and settings.thumb_path("a").exists()
    assert not settings.tiles_path("b").exists() and not settings.tiles_path("c").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]
    report = pd.read_csv(tmp_path / "cache" / "prepare_report.csv").set_index("slide_id")
    assert report.status["a"] == "done" and report.status["b"] == "failed" and "disk full" in report.error["b"]
    assert report.status["c"] == "not run"
    again = prepare_cohort(manifest, settings).set_index("slide_id")  # space freed: the rest finish
    assert list(again.status) == ["skipped", "done", "done"]


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
    cv2.imwrite(str(tmp_path / "photo.png"), _tissue(64))
    (tmp_path / "notes.tiff").write_text("slide_id,path\n")
    # a complete, strip-based TIFF: OpenSlide reads only tiled ones
    tifffile.imwrite(tmp_path / "strips.tiff", _tissue(256), photometric="rgb", resolution=(20_000, 20_000),
                     resolutionunit="CENTIMETER")
    msgs = {}
    for name in ("photo.png", "notes.tiff", "strips.tiff"):
        with pytest.raises(SlideError) as err:
            Slide(tmp_path / name)
        msgs[name] = msg = str(err.value)
        assert "\n" not in msg and name in msg and "convert" in msg and "truncated" not in msg
    assert "not a slide format" in msgs["photo.png"] and "not a slide format" in msgs["notes.tiff"]
    assert "complete TIFF" in msgs["strips.tiff"] and "strips instead of tiles" in msgs["strips.tiff"]


# --- killed runs ------------------------------------------------------------------------------

_KILLED_PREPARE = """
import os, sys, time
from pathlib import Path
import pandas as pd
import her2lab.slides.prepare as prep
from her2lab.slides.tiling import TilingParams
from her2lab.slides.tissue import TissueParams

def slow(slide_id, path, mpp, settings):  # a slide that takes a long time
    Path(sys.argv[1], f"{os.getpid()}.pid").write_text("")
    time.sleep(120)

prep.prepare_slide = slow
if sys.argv[2] == "watchdog":  # the fallback where prctl is unavailable
    from concurrent.futures import ProcessPoolExecutor

    from her2lab.pool import die_with_parent

    prep.worker_pool = lambda n: ProcessPoolExecutor(n, initializer=die_with_parent, initargs=(os.getpid(), False))
manifest = pd.DataFrame({"slide_id": ["a", "b"], "path": ["a.tiff", "b.tiff"], "mpp": [None, None]})
settings = prep.PrepareSettings(cache_dir=Path(sys.argv[1]) / "cache", tiling=TilingParams(), tissue=TissueParams())
prep.prepare_cohort(manifest, settings, num_workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("watchdog", [False, True])
def test_prepare_workers_die_with_a_killed_parent(tmp_path, watchdog):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    mode = "watchdog" if watchdog else "prctl"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PREPARE, str(tmp_path), mode], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(tmp_path.glob("*.pid"))) < 2:
        time.sleep(0.05)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.time()
    while time.time() - t0 < 10 and any(_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:  # do not leave them behind on failure
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"
