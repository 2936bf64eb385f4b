"""Slide thumbnails at a fixed resolution, and QC pictures: tissue contour and tile grid."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from her2lab.io import atomic_path
from her2lab.slides.tissue import tissue_contours

QC_MIN_LONG_SIDE = 1200  # QC pictures are upscaled to at least this, so tile outlines are visible
QC_ROI_RGB = (255, 140, 0)  # the ROI outline: orange, apart from the green tissue and blue tiles


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB (or grey) uint8 image atomically as PNG."""
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise OSError(f"{path}: PNG encoding failed")
        tmp.write_bytes(buf.tobytes())


def resize_to_mpp(img: np.ndarray, img_mpp: float, target_mpp: float) -> np.ndarray:
    """Downscale an image from ``img_mpp`` to ``target_mpp`` µm/px.

    Raises:
        ValueError: ``target_mpp`` is finer than ``img_mpp`` (images are never upsampled: read
            them from the slide at the finer resolution instead).
    """
    if abs(img_mpp - target_mpp) <= 1e-9 * target_mpp:
        return img
    if target_mpp < img_mpp:
        raise ValueError(f"resize_to_mpp: {img_mpp:g} → {target_mpp:g} µm/px would upsample")
    s = img_mpp / target_mpp
    h, w = img.shape[:2]
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def qc_image(
    thumb: np.ndarray,
    thumb_mpp: float,
    mask: np.ndarray,
    coords: np.ndarray,
    patch_px_level0: int,
    level0_mpp: float,
    title: str,
    roi=None,
) -> np.ndarray:
    """Thumbnail with the tissue contour (green), kept tiles (blue outlines), the region of
    interest (orange; ``roi`` a shapely polygon or multipolygon in level-0 px) and a caption."""
    h, w = thumb.shape[:2]
    up = max(1.0, QC_MIN_LONG_SIDE / max(h, w))
    img = (
        cv2.resize(thumb, (round(w * up), round(h * up)), interpolation=cv2.INTER_LINEAR)
        if up > 1
        else thumb.copy()
    )
    H, W = img.shape[:2]
    m = cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
    s = level0_mpp / thumb_mpp * up  # QC px per level-0 px
    tile = patch_px_level0 * s
    overlay = img.copy()
    if len(coords):
        xy = np.round(coords * s).astype(np.int32)
        t = max(1, round(tile))
        for x, y in xy:
            cv2.rectangle(
                overlay,
                (int(x), int(y)),
                (int(x) + t - 1, int(y) + t - 1),
                (40, 90, 220),
                1 if t >= 6 else -1,
            )
        img = cv2.addWeighted(overlay, 0.55, img, 0.45, 0)
    cv2.drawContours(img, tissue_contours(m), -1, (0, 170, 0), max(1, round(H / 600)))
    if roi is not None:
        rings = [r for p in getattr(roi, "geoms", [roi]) for r in (p.exterior, *p.interiors)]
        pts = [np.round(np.asarray(r.coords) * s).astype(np.int32) for r in rings]
        cv2.polylines(img, pts, True, QC_ROI_RGB, max(2, round(H / 400)), cv2.LINE_AA)
    bar = np.full((max(22, H // 30), W, 3), 255, np.uint8)
    scale = bar.shape[0] / 40
    cv2.putText(
        bar,
        title,
        (6, int(bar.shape[0] * 0.72)),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return np.vstack([bar, img])
