from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from her2lab.data.synthetic import (
    SyntheticConfig,
    case_geometry,
    cohort_table,
    generate_cohort,
    render_slide,
)


def test_slides_are_real_pyramids_openslide_reads(hne_cohort):
    root, cfg = hne_cohort
    manifest = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == ["slide_id", "patient_id", "path", "her2_score", "ish", "stain"]
    assert len(manifest) == cfg.n_slides
    osr = openslide.OpenSlide(str(root / manifest.path[0]))
    assert osr.properties["openslide.vendor"] == "generic-tiff"
    assert osr.level_count == len(cfg.downsamples)
    assert osr.level_dimensions[0] == (cfg.width_px, cfg.height_px)
    assert [round(d) for d in osr.level_downsamples] == list(cfg.downsamples)
    assert float(osr.properties["openslide.mpp-x"]) == cfg.mpp
    for name in ("tissue", "tumour", "positive"):
        assert (root / "masks" / f"{manifest.slide_id[0]}_{name}.png").exists()


def test_manifest_patients_labels_and_ish():
    cfg = SyntheticConfig(n_slides=40, n_pairs=6)
    t = cohort_table(cfg)
    per_patient = t.groupby("patient_id")
    assert per_patient.size().max() == 2 and (per_patient.size() == 2).sum() == 6
    assert (per_patient["her2_score"].nunique() == 1).all()  # a patient's slides share the label
    counts = t.her2_score.value_counts()
    assert set(counts.index) == {"0", "1+", "2+", "3+"} and counts.min() >= 7
    assert set(t.ish[t.her2_score == "2+"]) <= {"pos", "neg"}
    assert (t.ish[t.her2_score != "2+"] == "").all()


def test_generation_is_deterministic():
    cfg = SyntheticConfig(width_px=2048, height_px=1536, nuisances=True)
    a = render_slide(cfg, 5, case_geometry(cfg, 5, "2+"), "2+", "neg")
    b = render_slide(cfg, 5, case_geometry(cfg, 5, "2+"), "2+", "neg")
    c = render_slide(cfg, 6, case_geometry(cfg, 6, "2+"), "2+", "neg")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_positive_share_grows_with_score():
    cfg = SyntheticConfig(width_px=2048, height_px=1536)
    shares = {}
    for s in ("0", "1+", "2+", "3+"):
        vals = []
        for case in range(4):
            g = case_geometry(cfg, case, s)
            vals.append(g.positive.sum() / max(g.tumour.sum(), 1))
        shares[s] = np.mean(vals)
    assert shares["0"] == 0
    assert shares["0"] < shares["1+"] < shares["2+"] < shares["3+"]


def _dab_od(rgb: np.ndarray) -> np.ndarray:
    """DAB optical density by colour deconvolution (H, E, DAB stain matrix)."""
    from her2lab.data.synthetic import STAIN_OD

    od = -np.log10(np.clip(rgb.astype(np.float32), 1, 255) / 240.0)
    return (od.reshape(-1, 3) @ np.linalg.inv(STAIN_OD))[:, 2].reshape(rgb.shape[:2])


@pytest.mark.slow  # renders four full-size slides
def test_ihc_membrane_signal_follows_score_and_lives_in_positive_regions():
    cfg = SyntheticConfig(stain="ihc", nuisances=False)
    dab_in, dab_out = {}, {}
    for s in ("0", "1+", "2+", "3+"):
        g = case_geometry(cfg, 1, s)
        rgb = render_slide(cfg, 1, g, s, "")
        dab = _dab_od(rgb)
        stroma = g.tissue & ~g.tumour
        dab_in[s] = dab[g.positive].mean() if g.positive.any() else 0.0
        dab_out[s] = dab[stroma].mean()
    assert dab_in["1+"] < dab_in["2+"] < dab_in["3+"]
    for s in ("1+", "2+", "3+"):
        assert dab_in[s] > dab_out[s] + 0.01  # the signal is in the positive regions


def test_hne_cue_is_subtle_but_present():
    # Nuclei in positive regions are larger: the hematoxylin-rich area fraction rises with score.
    cfg = SyntheticConfig(stain="hne", nuisances=False)
    frac = {}
    for s in ("0", "3+"):
        g = case_geometry(cfg, 2, s)
        rgb = render_slide(cfg, 2, g, s, "")
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        dark = hsv[..., 2] < 150
        frac[s] = dark[g.tumour].mean()
    assert frac["3+"] > frac["0"] * 1.2


TINY = {"width_px": 1024, "height_px": 768, "mpp": 1.0}  # 1 × 0.77 mm: the smallest the generator makes


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _tiny_cohort(root: Path, n: int = 2, **kw) -> tuple[Path, SyntheticConfig]:
    cfg = SyntheticConfig(n_slides=n, n_pairs=0, seed=5, **TINY, **kw)
    return generate_cohort(root, cfg, num_workers=1), cfg


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


# --- HER2-ultralow -------------------------------------------------------------------------------
def _stained_cells(rgb: np.ndarray, tumour: np.ndarray, spacing_px: float) -> tuple[int, float]:
    """Measured on the image: DAB rings in the tumour (connected DAB-stained spots) and the number
    of tumour cells the tumour area holds (cells sit on a hexagonal grid ``spacing_px`` apart)."""
    stained = (_dab_od(rgb) > 0.03) & tumour
    n, _ = cv2.connectedComponents(stained.astype(np.uint8))
    return n - 1, tumour.sum() / (spacing_px**2 * 0.866)


def test_ultralow_slides_stain_a_few_cells_faintly_and_null_slides_none():
    cfg = SyntheticConfig(stain="ihc", nuisances=False, seed=5, **TINY)
    for case in (0, 1):
        g_null, g_ul = case_geometry(cfg, case, "0"), case_geometry(cfg, case, "0")
        null = render_slide(cfg, case, g_null, "0", "", ultralow=False)
        ul = render_slide(cfg, case, g_ul, "0", "", ultralow=True)
        # Ground truth of the generator: the share of tumour cells with any membrane stain.
        n_cells = g_ul.extras["tumour_cells"]
        assert n_cells > 100 and g_null.extras["membrane_cells"] == 0
        assert 0 < g_ul.extras["membrane_cells"] / n_cells <= 0.10
        # Measured on the image: null slides have no DAB in the tumour; ultralow ones a few rings.
        rings, cells = _stained_cells(ul, g_ul.tumour, 11.0 / cfg.mpp)
        assert _stained_cells(null, g_null.tumour, 11.0 / cfg.mpp)[0] == 0
        assert 0 < rings / cells <= 0.10 and abs(cells - n_cells) < 0.1 * n_cells
        # Only the rings differ: everything else is painted from the same draws.
        differ = (null != ul).any(-1)
        near_tumour = cv2.dilate(g_ul.tumour.astype(np.uint8), np.ones((23, 23), np.uint8)) > 0  # a cell's reach
        assert 0 < differ.mean() < 0.02 and not differ[~near_tumour].any()
        # Fainter than 1+.
        g1 = case_geometry(cfg, case, "1+")
        one = _dab_od(render_slide(cfg, case, g1, "1+", ""))
        dab_ul = _dab_od(ul)
        assert np.median(dab_ul[(dab_ul > 0.03) & g_ul.tumour]) < np.median(one[(one > 0.03) & g1.positive])


def test_ultralow_table_marks_a_share_of_the_score_0_patients():
    off = cohort_table(SyntheticConfig(n_slides=40, n_pairs=6))
    on = cohort_table(SyntheticConfig(n_slides=40, n_pairs=6, ultralow_fraction=0.5))
    assert (off.her2_ultralow == "").all()
    assert on.drop(columns="her2_ultralow").equals(off.drop(columns="her2_ultralow"))  # nothing else moves
    zero = on[on.her2_score == "0"]
    assert set(zero.her2_ultralow) == {"yes", "no"} and (on.her2_ultralow[on.her2_score != "0"] == "").all()
    per_patient = zero.groupby("patient_id").her2_ultralow
    assert (per_patient.nunique() == 1).all()  # a patient's slides share it
    n_zero, n_yes = per_patient.first().size, (per_patient.first() == "yes").sum()
    assert n_yes == round(0.5 * n_zero)
    assert cohort_table(SyntheticConfig(n_slides=40, n_pairs=6, ultralow_fraction=0.5)).equals(on)  # seeded
    with pytest.raises(ValueError, match="ultralow_fraction=1.5 is not within 0..1"):
        SyntheticConfig(ultralow_fraction=1.5)


def _hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root)}


def test_ultralow_off_leaves_the_cohort_byte_for_byte_the_same(tmp_path):
    manifest, _ = _tiny_cohort(tmp_path / "absent", n=3, stain="ihc")
    _tiny_cohort(tmp_path / "zero", n=3, stain="ihc", ultralow_fraction=0.0)
    assert "0" in set(pd.read_csv(manifest, dtype=str).her2_score)  # a score-0 slide is compared too
    assert _hashes(tmp_path / "absent") == _hashes(tmp_path / "zero")
    assert list(pd.read_csv(manifest).columns) == ["slide_id", "patient_id", "path", "her2_score", "ish", "stain"]
    # cohort.json (hence the parameter hash) has no new key: cohorts made before are kept as they are.
    assert "ultralow_fraction" not in (tmp_path / "absent" / "cohort.json").read_text()


def test_an_ultralow_cohort_is_labelled_by_the_scheme_and_seeded(tmp_path):
    from her2lab.data.cohort import load_manifest
    from her2lab.data.labels import label_scheme

    kw = {"stain": "ihc", "scores": ("0", "1+"), "ultralow_fraction": 0.5}
    manifest, _ = _tiny_cohort(tmp_path / "a", n=4, **kw)
    _tiny_cohort(tmp_path / "b", n=4, **kw)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    raw = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(raw.columns) == ["slide_id", "patient_id", "path", "her2_score", "ish", "her2_ultralow", "stain"]
    assert list(zip(raw.her2_score, raw.her2_ultralow, strict=True)).count(("1+", "")) == 2
    y = label_scheme("her2_ultralow").encode(load_manifest(manifest))
    assert sorted(y) == [0, 1, 2, 2]


def test_the_demo_ultralow_cohort_has_five_balanced_classes():
    from omegaconf import OmegaConf

    from tests.helpers import compose_config

    cohort = compose_config("prepare", ["cohort=demo_ihc_ultralow", "paths.data_dir=/d"]).cohort
    cfg = SyntheticConfig(**OmegaConf.to_container(cohort.synthetic, resolve=True))
    t = cohort_table(cfg)
    assert cfg.stain == "ihc" and t.slide_id.str.startswith("ul_").all() and t.patient_id.str.startswith("ul_").all()
    assert pd.Series(list(zip(t.her2_score, t.her2_ultralow, strict=True))).value_counts().tolist() == [8] * 5


# --- every synthetic cohort has ids of its own -------------------------------------------------
def test_no_two_synthetic_cohorts_name_different_cases_alike():
    from omegaconf import OmegaConf

    from her2lab import CONF_DIR
    from tests.helpers import compose_config

    names = sorted(p.stem for p in (CONF_DIR / "cohort").glob("[!_]*.yaml") if p.stem != "custom")
    tables = {}
    for name in names:
        cohort = compose_config("prepare", [f"cohort={name}", "paths.data_dir=/d"]).cohort
        cfg = SyntheticConfig(**OmegaConf.to_container(cohort.synthetic, resolve=True))
        tables[name] = (cfg, cohort_table(cfg))
    builtin = {"demo", "demo_ihc", "demo_external", "demo_ihc_ultralow", "pretrain_hne",
               "pretrain_ihc"}
    assert builtin <= set(tables)
    demo = tables["demo"][1]
    assert demo.slide_id[0] == "demo_case000_hne" and demo.patient_id[0] == "demo_P000"
    assert tables["pretrain_hne"][1].slide_id[0] == "pretrain_case000_hne"
    for a in names:
        for b in names:
            if a >= b:
                continue
            (ca, ta), (cb, tb) = tables[a], tables[b]
            assert not set(ta.slide_id) & set(tb.slide_id), (a, b)
            same_cases = (ca.seed, ca.n_slides, ca.n_pairs) == (cb.seed, cb.n_slides, cb.n_pairs)
            shared = set(ta.patient_id) & set(tb.patient_id)
            # twins (one set of cases in two stains) share their patients; no one else shares any
            assert shared == (set(ta.patient_id) if same_cases else set()), (a, b)


def test_a_cohort_made_again_with_other_ids_leaves_nothing_of_the_old_one(tmp_path, caplog):
    manifest, _ = _tiny_cohort(tmp_path, n=2)
    old_ids = list(pd.read_csv(manifest).slide_id)
    for d in ("tiles/t", "features/t/b", "thumbs/8mpp"):  # caches made from the old slides
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / f"{old_ids[0]}.h5").write_bytes(b"old")
    (tmp_path / "prepare_report.csv").write_text("slide_id\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tiles").mkdir(parents=True)
    manifest, _ = _tiny_cohort(tmp_path, n=2, id_prefix="new_")
    new_ids = list(pd.read_csv(manifest).slide_id)
    assert new_ids == [f"new_{s}" for s in old_ids]
    left = {p.relative_to(tmp_path).as_posix() for p in _files(tmp_path)}
    left -= {"cohort.json", "manifest.csv"}
    assert left == {f"{d}/{s}{ext}" for s in new_ids for d, ext in [("slides", ".tiff")]} | {
        f"masks/{s}_{m}.png" for s in new_ids for m in ("tissue", "tumour", "positive")}
    assert "made with other parameters (id_prefix: '' → 'new_')" in caplog.text
    assert "tiles" in caplog.text and "features" in caplog.text
    # a cache folder elsewhere is not removed, only reported
    again = SyntheticConfig(n_slides=2, n_pairs=0, seed=6, id_prefix="new_", **TINY)
    generate_cohort(tmp_path, again, num_workers=1, cache_dir=elsewhere)
    assert (elsewhere / "tiles").is_dir()
    assert f"{elsewhere} holds tiles made from the old slides" in caplog.text
