import cv2
import numpy as np
import pandas as pd
import pytest

from her2lab.slides.reader import Slide
from her2lab.slides.tissue import TissueParams, _hist_median, pen_mask, segment_tissue


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("cohort", ["hne_cohort", "ihc_cohort"])
def test_segmentation_recovers_generator_mask(request, cohort):
    root, cfg = request.getfixturevalue(cohort)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    p = TissueParams()
    assert p.seg_mpp == cfg.mask_mpp
    ious = []
    for sid, path in zip(manifest.slide_id, manifest.path, strict=True):
        img = Slide(root / path).read_at_mpp(p.seg_mpp)
        truth = cv2.imread(str(root / "masks" / f"{sid}_tissue.png"), 0) > 0
        mask = segment_tissue(img, p)
        assert mask.shape == truth.shape
        ious.append(_iou(mask, truth))
        # nuisances are never tissue: pen ink, black border, unscanned white
        assert not (mask & pen_mask(img)).any()
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        assert not (mask & (hsv[..., 2] < p.dark_value)).any()
        assert not (mask & (img.min(-1) >= 250)).any()
    assert min(ious) >= 0.9, ious


def test_holes_kept_small_gaps_filled_fragments_dropped():
    seg_mpp = 8.0
    img = np.full((200, 200, 3), 235, np.uint8)
    cv2.circle(img, (100, 100), 80, (200, 110, 180), -1)  # tissue disc (pink)
    cv2.circle(img, (70, 100), 20, (235, 235, 235), -1)  # big hole: 1256 px ≈ 80,000 µm²
    cv2.circle(img, (130, 100), 3, (235, 235, 235), -1)  # tiny gap: 29 px ≈ 1,800 µm²
    cv2.circle(img, (190, 190), 4, (200, 110, 180), -1)  # fragment: ~3,200 µm²
    mask = segment_tissue(img, TissueParams(seg_mpp=seg_mpp, close_um=8))
    assert not mask[100, 70]  # the big hole stays a hole
    assert mask[100, 130]  # the small gap is filled
    assert not mask[190, 190]  # the fragment is dropped
    assert mask[40, 100]


def test_grey_background_and_empty_slide():
    grey = np.full((100, 100, 3), 200, np.uint8)
    grey += np.random.default_rng(0).integers(0, 6, grey.shape, dtype=np.uint8)
    assert not segment_tissue(grey).any()
    assert not segment_tissue(np.full((50, 50, 3), 255, np.uint8)).any()


def test_pen_mask_is_the_signed_rule():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    rgb[:100] //= 4  # dark pixels too
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    want = ((g > r + 15) & (g > b - 10)) | ((b > r + 70) & (b > g + 45))
    assert (pen_mask(rgb) == want).all()


def test_histogram_median_is_numpys():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 1001):
        values = rng.integers(0, 40, n)
        hist = np.bincount(values, minlength=256)
        assert _hist_median(hist) == np.median(values)
