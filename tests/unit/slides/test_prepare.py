import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from her2lab.data.cohort import load_manifest
from her2lab.data.synthetic import write_pyramid_tiff
from her2lab.errors import OutputError, StaleCacheError
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.tiles_file import read_tiles_h5
from her2lab.slides.tiling import TilingParams
from her2lab.slides.tissue import TissueParams
from tests.conftest import gradient_rgb

REPO = Path(__file__).resolve().parents[3]


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


def _run(args, cwd, env_extra=None):
    env = {**os.environ, "HER2LAB_DATA_DIR": str(cwd / "data"), "HER2LAB_LOG_DIR": str(cwd / "logs"), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "her2lab.prepare", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_hydra_entry_builds_demo_cohort(tmp_path):
    args = ["cohort=demo", "cohort.synthetic.n_slides=4", "cohort.synthetic.n_pairs=1", "num_workers=2"]
    res = _run(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    cache = tmp_path / "data" / "demo"
    report = pd.read_csv(cache / "prepare_report.csv")
    assert len(report) == 4 and (report.status == "done").all()
    assert len(list((cache / "qc" / "0.5mpp_224px_0px_overlap").glob("*.png"))) == 4
    assert len(list((cache / "thumbs" / "8mpp").glob("*.png"))) == 4
    res = _run([*args, "tiling=paper_a"], tmp_path)  # another tiling lands beside the first
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((cache / "tiles" / "0.5mpp_96px_0px_overlap").glob("*.h5"))) == 4


def test_hydra_entry_bad_manifest_is_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("slide_id,path\na,a.svs\n")
    res = _run(["cohort=custom", f"cohort.manifest={tmp_path / 'm.csv'}"], tmp_path)
    assert res.returncode == 1
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "missing column(s) patient_id, her2_score" in lines[-1]
    assert "Traceback" not in res.stderr
