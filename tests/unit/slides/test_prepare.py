from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from her2lab.data.cohort import load_manifest
from her2lab.data.synthetic import write_pyramid_tiff
from her2lab.errors import OutputError, StaleCacheError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort, prepare_slide
from her2lab.slides.reader import Slide
from her2lab.slides.tiles_file import read_tiles_h5
from her2lab.slides.tiling import TilingParams
from her2lab.slides.tissue import TissueParams, segment_tissue
from tests.helpers import REPO, gradient_rgb, hand_manifest, hand_settings, prepare_thumbnails


def _settings(cache, **kw):
    return PrepareSettings(cache_dir=Path(cache), tiling=TilingParams(), tissue=TissueParams(), **kw)


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.suffix in (".h5", ".png")}


def test_prepare_writes_tiles_thumbs_qc_and_resumes(hne_cohort, tmp_path):
    root, cfg = hne_cohort
    manifest = load_manifest(root / "manifest.csv")
    settings = _settings(tmp_path)
    report = prepare_cohort(manifest, settings, num_workers=2)
    assert (report.status == "done").all() and (report.n_tiles > 20).all()
    sid = manifest.slide_id[0]
    coords, attrs = read_tiles_h5(settings.tiles_path(sid))
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    for key in ("patch_px", "target_mpp", "patch_px_level0", "level0_mpp", "mpp_source", "slide_id", "param_hash"):
        assert key in attrs
    assert attrs["patch_px"] == 224 and attrs["target_mpp"] == 0.5 and attrs["mpp_source"] == "openslide"
    with h5py.File(settings.tiles_path(sid)) as f:
        mask = f["tissue_mask"][:]
        assert mask.shape == (cfg.height_px // 16, cfg.width_px // 16)
        assert (f["tissue_fraction"][:] >= 0.5).all()
    assert settings.thumb_path(sid).exists() and settings.qc_path(sid).exists()
    assert pd.read_csv(tmp_path / "failures.csv").empty

    # A second run redoes nothing.
    before = _mtimes(tmp_path)
    report2 = prepare_cohort(manifest, settings, num_workers=2)
    assert (report2.status == "skipped").all()
    assert _mtimes(tmp_path) == before

    # A run killed part-way: outputs of two slides missing (and a stray temp file) → only those redone.
    settings.tiles_path(manifest.slide_id[1]).unlink()
    settings.qc_path(manifest.slide_id[2]).unlink()
    (settings.tiles_path(sid).parent / ".x.123.tmp.h5").write_bytes(b"partial")
    report3 = prepare_cohort(manifest, settings, num_workers=1)
    redone = set(report3.slide_id[report3.status == "done"])
    assert redone == {manifest.slide_id[1], manifest.slide_id[2]}
    after = _mtimes(tmp_path)
    unchanged = [p for p in before if manifest.slide_id[1] not in p.name and manifest.slide_id[2] not in p.name]
    assert all(after[p] == before[p] for p in unchanged)


def test_stale_cache_is_an_error_naming_the_mismatch(hne_cohort, tmp_path):
    root, _ = hne_cohort
    manifest = load_manifest(root / "manifest.csv").iloc[:2]
    prepare_cohort(manifest, _settings(tmp_path), num_workers=1)
    stale = _settings(tmp_path, overwrite=False)
    stale = replace(stale, tiling=TilingParams(min_tissue=0.8))
    with pytest.raises(StaleCacheError, match=r"tiling.min_tissue=0.5 \(now 0.8\).*prepare.overwrite=true"):
        prepare_cohort(manifest, stale)
    report = prepare_cohort(manifest, replace(stale, overwrite=True))
    assert (report.status == "done").all()
    _, attrs = read_tiles_h5(stale.tiles_path(manifest.slide_id[0]))
    assert attrs["min_tissue"] == 0.8


def _bad_cohort(root: Path, good_slide: Path) -> Path:
    slides = root / "slides"
    slides.mkdir(parents=True)
    shutil.copy(good_slide, slides / "good.tiff")
    data = good_slide.read_bytes()
    (slides / "truncated.tiff").write_bytes(data[: len(data) // 2])
    (slides / "notes.svs").write_text("not a slide")
    img = gradient_rgb(1024, 1024)
    with tifffile.TiffWriter(slides / "nompp.tiff") as tw:
        tw.write(img, tile=(256, 256), compression="jpeg", photometric="rgb")
    write_pyramid_tiff(slides / "blank.tiff", np.full((1536, 2048, 3), 240, np.uint8), mpp=0.5, downsamples=(1, 4, 16))
    rows = [
        ("good", "good.tiff"), ("missing", "missing.svs"), ("truncated", "truncated.tiff"),
        ("notes", "notes.svs"), ("nompp", "nompp.tiff"), ("blank", "blank.tiff"),
    ]
    text = "slide_id,patient_id,path,her2_score\n" + "".join(f"{s},P{i},slides/{p},0\n" for i, (s, p) in enumerate(rows))
    (root / "manifest.csv").write_text(text)
    return root / "manifest.csv"


def test_bad_slides_are_reported_and_the_rest_finish(hne_cohort, tmp_path):
    root, _ = hne_cohort
    manifest = load_manifest(_bad_cohort(tmp_path / "cohort", next((root / "slides").glob("*.tiff"))))
    report = prepare_cohort(manifest, _settings(tmp_path / "cache"), num_workers=2)
    status = dict(zip(report.slide_id, report.status, strict=True))
    assert status["good"] == "done"
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv").set_index("slide_id")["error"]
    assert set(failures.index) == {"missing", "truncated", "notes", "nompp", "blank"}
    assert "slide file not found" in failures["missing"]
    assert "unreadable" in failures["truncated"] or "truncated" in failures["truncated"]
    assert "not a slide format OpenSlide reads" in failures["notes"]
    assert "no mpp in metadata" in failures["nompp"] and "mpp_override" in failures["nompp"]
    assert "no tissue found" in failures["blank"]
    assert all("\n" not in e for e in failures)


def test_unwritable_output_folder(hne_cohort, tmp_path):
    root, _ = hne_cohort
    manifest = load_manifest(root / "manifest.csv").iloc[:1]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="not writable"):
        prepare_cohort(manifest, _settings(blocker / "cache"))


def test_thumbnail_finer_than_the_slide_is_a_clear_error(ihc_cohort, tmp_path):
    root, _ = ihc_cohort
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False).head(1)
    manifest["path"] = [str(root / p) for p in manifest.path]
    manifest["mpp"] = np.nan
    settings = PrepareSettings(cache_dir=tmp_path, tiling=TilingParams(target_mpp=2.0, patch_px=64), tissue=TissueParams(),
                               thumb_mpp=0.25, qc=False)
    report = prepare_cohort(manifest, settings, num_workers=1)
    assert report.status[0] == "failed" and "finer than the slide's level 0 (0.5 µm/px)" in report.error[0]


def test_thumbnail_coarser_than_the_lowest_level_is_made_by_downsampling(ihc_cohort, tmp_path):
    root, cfg = ihc_cohort
    settings, manifest = prepare_thumbnails(tmp_path, root, thumb_mpp=64.0)  # lowest level: 8 µm/px
    img = cv2.imread(str(settings.thumb_path(manifest.slide_id[0])))
    assert img.shape[:2] == (round(cfg.height_px * cfg.mpp / 64), round(cfg.width_px * cfg.mpp / 64))


@pytest.mark.parametrize(("seg_mpp", "thumb_mpp"), [(8.0, 8.0), (8.0, 16.0), (16.0, 8.0)])
def test_one_read_makes_the_mask_and_the_thumbnail(
    hne_cohort, tmp_path, monkeypatch, seg_mpp, thumb_mpp
):
    root, _ = hne_cohort
    manifest = load_manifest(root / "manifest.csv")
    sid, path = manifest.slide_id[0], manifest.path[0]
    settings = replace(
        _settings(tmp_path, thumb_mpp=thumb_mpp, qc=False), tissue=TissueParams(seg_mpp=seg_mpp)
    )
    reads = []
    real = Slide.read_region
    monkeypatch.setattr(Slide, "read_region", lambda self, *a: reads.append(a) or real(self, *a))
    prepare_slide(sid, path, None, settings)
    assert len(reads) == 1  # the finer of the two resolutions, the other one downscaled from it
    with Slide(path) as slide:  # the same as reading each at its own resolution
        want_mask = segment_tissue(slide.read_at_mpp(seg_mpp), settings.tissue)
        want_thumb = slide.read_at_mpp(thumb_mpp)
    with h5py.File(settings.tiles_path(sid)) as f:
        assert f.attrs["mask_mpp"] == seg_mpp and (f["tissue_mask"][:] == want_mask).all()
    thumb = cv2.cvtColor(cv2.imread(str(settings.thumb_path(sid))), cv2.COLOR_BGR2RGB)
    assert (thumb == want_thumb).all()


def test_a_corrected_mpp_reprepares_the_slide(slides, tmp_path):
    settings = hand_settings(tmp_path / "cache")
    prepare_cohort(hand_manifest(tmp_path, [("dpi72", str(slides / "dpi72.tiff"), "0.5")]), settings)
    report = prepare_cohort(hand_manifest(tmp_path, [("dpi72", str(slides / "dpi72.tiff"), "0.25")]), settings)
    assert list(report.status) == ["done"]  # not "skipped" with tiles cut at 0.5 µm/px
    _, attrs = read_tiles_h5(settings.tiles_path("dpi72"))
    assert attrs["level0_mpp"] == 0.25 and attrs["patch_px_level0"] == 512


def test_slide_coarser_than_the_mask_is_segmented_at_its_own_resolution(slides, tmp_path):
    manifest = hand_manifest(tmp_path, [("coarse", str(slides / "coarse.tiff"), "")])
    settings = hand_settings(tmp_path / "cache", tiling=TilingParams(target_mpp=20.0, patch_px=16), thumb_mpp=16.0)
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
    manifest = hand_manifest(tmp_path, [("good", str(slides / "good.tiff"), ""),
                                    ("dpi72", str(slides / "dpi72.tiff"), "")])
    settings = hand_settings(tmp_path / "cache")
    report = prepare_cohort(manifest, settings, num_workers=2).set_index("slide_id")
    assert report.status["good"] == "done" and report.status["dpi72"] == "failed"
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv").set_index("slide_id")["error"]
    assert list(failures.index) == ["dpi72"] and "mpp_override" in failures["dpi72"]
    assert not settings.tiles_path("dpi72").exists()
    # the advice followed: the same pixels at 0.5 µm/px tile exactly like the good slide
    manifest = hand_manifest(tmp_path, [("good", str(slides / "good.tiff"), ""),
                                    ("dpi72", str(slides / "dpi72.tiff"), "0.5")])
    report = prepare_cohort(manifest, settings).set_index("slide_id")
    assert report.status["good"] == "skipped" and report.status["dpi72"] == "done"
    good, _ = read_tiles_h5(settings.tiles_path("good"))
    fixed, attrs = read_tiles_h5(settings.tiles_path("dpi72"))
    assert attrs["mpp_source"] == "override" and attrs["patch_px_level0"] == 256
    assert len(good) > 20 and np.array_equal(good, fixed)


# --- full disk --------------------------------------------------------------------------------

def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_the_reports_is_one_line_and_keeps_the_slides(slides, tmp_path, monkeypatch, caplog):
    manifest = hand_manifest(tmp_path, [("good", str(slides / "good.tiff"), ""),
                                    ("dpi72", str(slides / "dpi72.tiff"), "")])
    settings = hand_settings(tmp_path / "cache", qc=True)
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
    manifest = hand_manifest(tmp_path, [(s, str(tmp_path / f"{s}.tiff"), "") for s in ("a", "b", "c")])
    settings = hand_settings(tmp_path / "cache")
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
