"""Tissue segmentation on a low-resolution image of the slide.

Tissue is what is *stained*: saturated pixels. The saturation threshold comes from Otsu's method
(clamped to a sane range), which separates tissue from white or grey glass, from the pure white
of unscanned areas and from dust. Very dark pixels (slide-holder borders, black ink, debris) and
coloured ink (green and blue pen) are removed before the morphology. Sizes are given in µm² so
that one setting works at any resolution: fragments smaller than ``min_area_um2`` are dropped and
holes smaller than ``min_hole_area_um2`` are filled (larger holes — fat, lumina — stay holes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueParams:
    """Segmentation settings (``conf/tissue/default.yaml``)."""

    seg_mpp: float = 8.0  # resolution the mask is computed at, µm/px
    min_saturation: int = 15  # floor (and ``max_saturation`` the cap) of the Otsu threshold, 0–255
    max_saturation: int = 60
    dark_value: int = 50  # HSV value below this is border/ink/debris, never tissue
    pen_filter: bool = True
    min_area_um2: float = 20_000.0  # drop fragments smaller than this (0.02 mm²)
    min_hole_area_um2: float = 5_000.0  # fill holes smaller than this
    close_um: float = 16.0  # closing radius that bridges small gaps

    def to_dict(self) -> dict:
        return asdict(self)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Green, blue or strongly cyan ink (bool, H×W). H&E and IHC stains are never G>R or B≫R,G.

    Green is ``G > R + 15`` and ``G > B - 10``, blue ``B > R + 70`` and ``B > G + 45``; computed
    with saturating uint8 differences (``a - b`` clipped at 0), which give the same answers.
    """
    r, g, b = cv2.split(rgb)
    green = (cv2.subtract(g, r) > 15) & (cv2.subtract(b, g) < 10)
    blue = (cv2.subtract(b, r) > 70) & (cv2.subtract(b, g) > 45)
    return green | blue


def segment_tissue(
    rgb: np.ndarray, params: TissueParams | None = None, mpp: float | None = None
) -> np.ndarray:
    """Boolean tissue mask (H, W) of an RGB uint8 image (H, W, 3).

    Args:
        rgb: the slide at ``mpp`` µm/px.
        params: segmentation settings.
        mpp: resolution of ``rgb``; default ``params.seg_mpp``. A slide coarser than ``seg_mpp``
            is segmented at its own resolution (never upsampled), and the µm-based sizes of
            ``params`` are converted at that resolution.
    """
    p = params or TissueParams()
    if mpp is not None and mpp != p.seg_mpp:
        p = replace(p, seg_mpp=float(mpp))
    um2_per_px = p.seg_mpp**2
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], 3)
    val = hsv[..., 2]
    valid = val >= p.dark_value
    if p.pen_filter:
        # Dilated: the stroke's edge pixels are part ink, part glass — saturated but not ink-coloured.
        pen = pen_mask(rgb).astype(np.uint8)
        valid &= ~cv2.dilate(pen, np.ones((5, 5), np.uint8)).astype(bool)
    # Otsu over the valid pixels only, clamped: a slide that is nearly all tissue or all glass
    # still gets a threshold that means "stained".
    sample = sat[valid]
    if sample.size:
        thr, _ = cv2.threshold(sample.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        thr = p.min_saturation
    thr = float(np.clip(thr, p.min_saturation, p.max_saturation))
    # Hysteresis: at this resolution an edge pixel is part glass, part tissue. Pixels brighter
    # than halfway between the glass and the typical tissue saturation count when they touch
    # clearly stained ones, so edges of pale (IHC) tissue are not shaved off. The two medians
    # come from one histogram of the valid saturations, split at the threshold.
    strong = (sat > thr) & valid
    hist = np.bincount(sample, minlength=256)
    cut = int(np.floor(thr)) + 1  # sat > thr  ⇔  sat ≥ cut
    if hist[:cut].any() and hist[cut:].any():
        half = 0.5 * (_hist_median(hist[:cut]) + cut + _hist_median(hist[cut:]))
    else:
        half = thr
    weak = (sat > min(thr, half)) & valid
    n, labels = cv2.connectedComponents(weak.view(np.uint8), connectivity=8)
    seeded = np.zeros(n, bool)
    seeded[labels[strong]] = True
    seeded[0] = False
    mask = np.take(seeded, labels).view(np.uint8)
    r = max(1, round(p.close_um / p.seg_mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    # Closing only: an opening would cut thin strands of tissue into fragments that the
    # area filter then drops; specks are removed by that area filter instead.
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = _drop_small(mask.astype(bool), p.min_area_um2 / um2_per_px)
    mask = _fill_small_holes(mask, p.min_hole_area_um2 / um2_per_px)
    return mask & valid  # closing and hole filling never paint over ink or dark borders


def _hist_median(hist: np.ndarray) -> float:
    """The median of the values whose histogram is ``hist`` (bin ``i`` counts value ``i``), as
    ``np.median`` gives it: the middle value, or the mean of the middle two."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    lo, hi = np.searchsorted(cum, [(n - 1) // 2 + 1, n // 2 + 1])  # the middle one or two values
    return 0.5 * (float(lo) + float(hi))


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (H, W) int32 of a bool mask's components (0: outside) and each label's area."""
    _n, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity)
    return labels, np.bincount(labels.ravel())


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, area = _components(mask, 8)
    keep = area >= min_px
    keep[0] = False
    if keep[1:].all():
        return mask
    return np.take(keep, labels)


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    # Holes are background components that do not touch the image border.
    labels, area = _components(~mask, 4)
    fill = area < max_px
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        fill[edge] = False
    fill[0] = False  # label 0 is the tissue itself
    if not fill.any():
        return mask
    return mask | np.take(fill, labels)


def tissue_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer and hole contours of a mask, as OpenCV point arrays (for QC drawings)."""
    return tissue_contour_tree(mask)[0]


def tissue_contour_tree(mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`tissue_contours` and their two-level hierarchy (n, 4): next, previous, first hole,
    parent (``-1`` for a component's outer contour; a hole's parent is its component's)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours), (hierarchy[0] if hierarchy is not None else np.zeros((0, 4), np.int32))
