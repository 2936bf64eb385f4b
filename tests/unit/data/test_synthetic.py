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
