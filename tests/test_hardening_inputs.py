"""Inputs no one here generated: manifest ids that would name files outside their folder, empty
patient ids, output file modes under the user's umask, and demo generation resumed per slide.

Manifests are written by hand; slides are real pyramidal TIFFs from the demo generator; features
files are written with h5py in TRIDENT's layout (``features``, ``coords``, nothing else).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from her2lab import CONF_DIR
from her2lab.data.cohort import check_slide_id, load_manifest
from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from her2lab.errors import Her2labError, ManifestError
from her2lab.io import atomic_path, current_umask, write_h5
from her2lab.slides.thumbnails import save_png

HEADER = "slide_id,patient_id,path,her2_score\n"
TINY = {"width_px": 1024, "height_px": 768, "mpp": 1.0}  # 1 × 0.77 mm: the smallest the generator makes
BAD_IDS = ["../../../../x", "/tmp/x", "a/b", "a\\b", "..", ".", "a\x07b", "a\tb", "x" * 201]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _tiny_cohort(root: Path, n: int = 2, **kw) -> tuple[Path, SyntheticConfig]:
    cfg = SyntheticConfig(n_slides=n, n_pairs=0, seed=5, **TINY, **kw)
    return generate_cohort(root, cfg, num_workers=1), cfg


# --- slide ids become file names ---------------------------------------------------------------
@pytest.mark.parametrize("sid", BAD_IDS)
def test_unsafe_slide_id_is_a_one_line_error_naming_the_line(tmp_path, sid):
    p = _write(tmp_path / "manifest.csv", HEADER + "ok1,P1,a.svs,0\n" + f'"{sid}",P2,b.svs,1+\n')
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    msg = str(err.value)
    assert str(p) in msg and "on line 3" in msg and repr(sid) in msg and "\n" not in msg
    assert "slide ids may hold letters, digits" in msg
    with pytest.raises(ManifestError):
        check_slide_id(sid)


def test_all_unsafe_lines_are_named_and_safe_ids_pass(tmp_path):
    p = _write(tmp_path / "manifest.csv", HEADER + "ok,P1,a.svs,0\na/b,P2,b.svs,0\nc:d,P3,c.svs,0\n..,P4,d.svs,0\n")
    with pytest.raises(ManifestError, match=r"'a/b' on line 3 cannot name files \(it holds '/'\), nor can those on line\(s\) 4, 5"):
        load_manifest(p)
    # Ids of public cohorts and hand-typed ones are kept as they are.
    good = ["TCGA-A2-A0T2-01Z-00-DX1.8A2B0E5D-4E84-4C05-9D42-D5ACEB5CE9F4", "00012_train_2+", "HE 12-345 (A1)",
            "Schnitt_ä", "a..b", "x" * 200]
    rows = "".join(f"{s},P{i},s{i}.svs,0\n" for i, s in enumerate(good))
    assert list(load_manifest(_write(tmp_path / "good.csv", HEADER + rows)).slide_id) == good
    assert check_slide_id("case001_hne") == "case001_hne"


def test_ids_differing_only_in_case_are_refused(tmp_path):
    p = _write(tmp_path / "manifest.csv", HEADER + "S01,P1,a.svs,0\ns01,P2,b.svs,0\n")
    with pytest.raises(ManifestError, match=r"S01, s01 on line\(s\) 2, 3 differ only in case"):
        load_manifest(p)


def _prepare_cfg(manifest: Path, data: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("prepare", [
            "cohort=custom", f"cohort.manifest={manifest}", f"paths.data_dir={data}", f"paths.output_dir={data}/run",
            "num_workers=1", "tiling.target_mpp=1.0", "tiling.patch_px=64",
        ])


def test_prepare_on_unsafe_ids_writes_nothing_anywhere(tmp_path):
    from her2lab.run.prepare import run_prepare as run

    _tiny_cohort(tmp_path / "demo")
    slide = next((tmp_path / "demo" / "slides").glob("*.tiff"))
    # data_dir sits deep enough that every escape lands inside tmp_path, where it can be seen.
    data = tmp_path / "a" / "b" / "c" / "d" / "data"
    manifest = _write(tmp_path / "cohort" / "manifest.csv",
                      HEADER + f"../../../../x,P1,{slide},1+\n{tmp_path}/abs,P2,{slide},0\n")
    before = _files(tmp_path)
    with pytest.raises(ManifestError, match="on line 2 cannot name files"):
        run(_prepare_cfg(manifest, data))
    assert _files(tmp_path) == before

    # The same slide under a safe id is prepared, inside data_dir only.
    _write(manifest, HEADER + f"x,P1,{slide},1+\n")
    report = run(_prepare_cfg(manifest, data))
    assert list(report.status) == ["done"] and report.n_tiles[0] > 10
    assert all(data in p.parents for p in _files(tmp_path) - before)


def _trident(path: Path, n: int, shift: float) -> None:
    """A features file in TRIDENT's layout, written by hand."""
    rng = np.random.default_rng(int(shift * 10))
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=(rng.standard_normal((n, 32)) + shift).astype(np.float32))
        f.create_dataset("coords", data=np.stack([np.arange(n) * 256, np.zeros(n, np.int64)], 1))


def test_train_on_unsafe_id_reads_and_writes_nothing_outside(tmp_path):
    from her2lab.run.train import train

    feats = tmp_path / "features" / "trident"
    feats.mkdir(parents=True)
    rows = []
    for c, score in enumerate(("0", "1+", "2+", "3+")):
        for k, split in enumerate(("train", "train", "val", "test")):
            sid = f"s{c}{k}"
            _trident(feats / f"{sid}.h5", 12, c)
            rows.append(f"{sid},p{c}{k},slides/{sid}.svs,{score},{split}\n")
    # A file beside the features folder that "../outside" would reach.
    _trident(tmp_path / "features" / "outside.h5", 12, 3.0)
    rows[0] = "../outside,p00,slides/s00.svs,0,train\n"
    manifest = _write(tmp_path / "manifest.csv", "slide_id,patient_id,path,her2_score,split\n" + "".join(rows))
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", [
            f"paths.data_dir={tmp_path / 'data'}", "cohort=custom", f"cohort.manifest={manifest}", "backbone=timm",
            "backbone.name=uni_v1", f"data.features_dir={feats}", "data.module.bag_size=8",
            "data.module.batch_size=4", "trainer.max_epochs=1", "trainer.accelerator=cpu", f"paths.output_dir={out}",
        ])
    before = _files(tmp_path)
    with pytest.raises(ManifestError, match=r"'../outside' on line 2 cannot name files"):
        train(cfg)
    assert not (out / "metrics.json").exists()
    assert all(out in p.parents for p in _files(tmp_path) - before)


def test_unsafe_synthetic_id_prefix_is_refused_before_any_write(tmp_path):
    from her2lab.data.cohort_config import resolve_cohort

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("prepare", [f"paths.data_dir={tmp_path / 'data'}", "cohort.synthetic.n_slides=2",
                                  "cohort.synthetic.n_pairs=0", "cohort.synthetic.width_px=1024",
                                  "cohort.synthetic.height_px=768", "cohort.synthetic.mpp=1.0",
                                  "++cohort.synthetic.id_prefix=../../"])
    with pytest.raises(Her2labError, match=r"cohort.synthetic: synthetic id_prefix '../../' cannot start file names"):
        resolve_cohort(cfg.cohort)
    assert not any(tmp_path.rglob("*"))


# --- empty fields ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ("a,,a.svs,0\nb,P2,b.svs,0\nc,,c.svs,1+\n", "empty patient_id on line(s) 2, 4; fill them in"),
        ("a,P1,a.svs,\n", "empty her2_score on line(s) 2"),
        ("a,P1,,0\nb,,b.svs,0\n", "empty patient_id on line(s) 3; empty path on line(s) 2"),
        ("a,P1\n", "empty path on line(s) 2; empty her2_score on line(s) 2"),  # a short row
    ],
)
def test_empty_required_fields_are_one_line_errors(tmp_path, rows, needle):
    p = _write(tmp_path / "manifest.csv", HEADER + rows)
    with pytest.raises(ManifestError) as err:
        load_manifest(p)
    assert needle in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


def test_a_column_given_twice_is_refused(tmp_path):
    # As Excel saves it (BOM, CRLF); pandas would read the first her2_score and drop the revised one.
    p = tmp_path / "manifest.csv"
    p.write_bytes("\ufeffslide_id,patient_id,path,her2_score,her2_score\r\nS1,P1,a.svs,0,3+\r\n".encode())
    with pytest.raises(ManifestError, match=r"column\(s\) her2_score appear more than once"):
        load_manifest(p)
    p.write_bytes("\ufeffslide_id,patient_id,path,her2_score\r\nS1,P1,a.svs,2\r\n".encode())
    df = load_manifest(p)
    assert list(df.columns[:4]) == ["slide_id", "patient_id", "path", "her2_score"] and list(df.her2_score) == ["2+"]


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


# --- demo generation resumes per slide ---------------------------------------------------------
def test_missing_masks_are_regenerated_with_their_slide(tmp_path):
    manifest, _ = _tiny_cohort(tmp_path, n=3)
    ids = list(pd.read_csv(manifest).slide_id)
    first = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in _files(tmp_path / "slides") | _files(tmp_path / "masks")}
    gone = tmp_path / "masks" / f"{ids[1]}_positive.png"
    gone.unlink()
    _tiny_cohort(tmp_path, n=3)
    assert gone.read_bytes() == first[gone][0]  # generation is seeded: the same mask comes back
    now = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first}
    redone = {p.name for p in first if now[p][1] != first[p][1]}
    assert redone == {f"{ids[1]}.tiff", f"{ids[1]}_tissue.png", f"{ids[1]}_tumour.png", f"{ids[1]}_positive.png"}
    assert all(now[p][0] == first[p][0] for p in first)


def test_a_failed_mask_write_leaves_the_slide_to_be_made_again(tmp_path, monkeypatch):
    import cv2

    from her2lab.data import synthetic

    real = cv2.imwrite
    # A full disk: OpenCV reports it only by returning False.
    monkeypatch.setattr(synthetic.cv2, "imwrite", lambda path, img, *a: False if "tumour" in str(path) else real(path, img, *a))
    with pytest.raises(OSError, match="writing the tumour mask failed"):
        _tiny_cohort(tmp_path, n=1)
    assert not list((tmp_path / "slides").glob("*")) and not list((tmp_path / "masks").glob("*tumour*"))
    monkeypatch.undo()
    manifest, _ = _tiny_cohort(tmp_path, n=1)
    sid = pd.read_csv(manifest).slide_id[0]
    masks = {n: cv2.imread(str(tmp_path / "masks" / f"{sid}_{n}.png"), cv2.IMREAD_GRAYSCALE) for n in ("tissue", "tumour")}
    assert (tmp_path / "slides" / f"{sid}.tiff").exists()
    assert masks["tumour"].shape == masks["tissue"].shape and 0 < (masks["tumour"] > 0).sum() < (masks["tissue"] > 0).sum()
