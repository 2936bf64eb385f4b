"""Open whole-slide images through OpenSlide and resolve their resolution (µm per pixel).

Every format OpenSlide reads works (.svs, .ndpi, .mrxs, .scn, .bif, DICOM, generic tiled TIFF …).
The level-0 mpp is resolved in this order, and where it came from is recorded in ``mpp_source``:

1. an explicit override (manifest column ``mpp`` or ``cohort.mpp_override``),
2. OpenSlide's normalised ``openslide.mpp-x``/``-y`` (vendor metadata),
3. vendor keys OpenSlide does not normalise (``aperio.MPP``),
4. TIFF resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit`` cm or inch),
5. the objective power (``openslide.objective-power``: 10 / power µm/px, 40x → 0.25), a last resort.

No mpp anywhere is a one-line :class:`~her2lab.errors.SlideError` naming the override to set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from her2lab.errors import SlideError

#: A level counts as "at" a target mpp when it is within this relative tolerance.
MPP_REL_TOL = 0.02


@dataclass(frozen=True)
class MPP:
    """Level-0 resolution in µm per pixel and where it came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def _positive_float(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def resolve_mpp(properties: dict[str, str], override: float | None = None) -> MPP | None:
    """Resolve level-0 µm/px from OpenSlide properties; ``None`` when nothing says it."""
    if override is not None:
        v = _positive_float(override)
        if v is None:
            raise SlideError(f"mpp override {override!r} is not a positive number")
        return MPP(v, v, "override")
    mx = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
    my = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    if mx and my:
        return MPP(mx, my, "openslide")
    v = _positive_float(properties.get("aperio.MPP"))
    if v:
        return MPP(v, v, "aperio.MPP")
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    rx = _positive_float(properties.get("tiff.XResolution"))
    ry = _positive_float(properties.get("tiff.YResolution")) or rx
    if rx and ry and unit in ("centimeter", "inch"):
        um_per_unit = 1e4 if unit == "centimeter" else 25_400.0
        return MPP(um_per_unit / rx, um_per_unit / ry, "tiff-resolution")
    power = _positive_float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power:
        return MPP(10.0 / power, 10.0 / power, "objective-power")
    return None


class Slide:
    """A whole-slide image opened through OpenSlide, with its resolution resolved.

    Args:
        path: slide file.
        mpp_override: level-0 µm/px that wins over the slide's metadata.
        slide_id: name used in messages and outputs (default: file stem).

    Raises:
        SlideError: missing file, a format OpenSlide cannot read, a truncated or corrupt file,
            or no mpp in the metadata and no override.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mpp_override: float | None = None,
        slide_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        if not self.path.exists():
            raise SlideError(f"{self.path}: slide file not found; fix the path in the manifest")
        if not self.path.is_file():
            raise SlideError(f"{self.path}: not a file; point the manifest at the slide file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"{self.path}: not a slide format OpenSlide reads; convert it to a tiled pyramidal "
                "TIFF or remove it from the manifest"
            ) from None
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: unreadable slide ({_first_line(exc)}); re-copy or re-export the file"
            ) from None
        mpp = resolve_mpp(dict(self._osr.properties), mpp_override)
        if mpp is None:
            self._osr.close()
            raise SlideError(
                f"{self.path}: no mpp in metadata; set an `mpp` column in the manifest or "
                "cohort.mpp_override=<µm per pixel>"
            )
        self.mpp = mpp

    # --- geometry -------------------------------------------------------------------------
    @property
    def level0_mpp(self) -> float:
        return self.mpp.mean

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def level_mpp(self, level: int) -> float:
        return self.level0_mpp * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level that is at least as fine as ``target_mpp`` (read it, then downscale).

        Falls back to level 0 when the target is finer than the slide: callers that must not
        upsample check :meth:`level_mpp` themselves.
        """
        best = 0
        for lvl in range(self.level_count):
            if self.level_mpp(lvl) <= target_mpp * (1 + MPP_REL_TOL):
                best = lvl
        return best

    # --- pixels ---------------------------------------------------------------------------
    def read_region(
        self, xy_level0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 array (H, W, 3) of ``size`` (w, h) at ``level``, top-left in level-0 pixels.

        Transparent (unscanned) pixels come back white, as a scanner's background would.
        """
        try:
            region = self._osr.read_region((int(xy_level0[0]), int(xy_level0[1])), level, size)
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: unreadable region at {xy_level0} level {level} ({_first_line(exc)}); "
                "the file may be truncated: re-copy it"
            ) from None
        if region.getchannel(3).getextrema()[0] == 255:  # opaque: PIL's C conversion is fastest
            return np.asarray(region.convert("RGB"))
        return _rgba_to_rgb(np.asarray(region))

    def read_at_mpp(self, target_mpp: float) -> np.ndarray:
        """The whole slide as one RGB image at ``target_mpp`` µm/px (downscaled from a finer level).

        Meant for low resolutions (tissue masks, thumbnails). A target finer than the slide is
        returned at level-0 resolution resized up; callers usually avoid that.
        """
        level = self.level_for_mpp(target_mpp)
        lw, lh = self.level_dimensions[level]
        img = self.read_region((0, 0), level, (lw, lh))
        w0, h0 = self.dimensions
        scale = self.level0_mpp / target_mpp
        out_w, out_h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        if (out_w, out_h) != (lw, lh):
            interp = cv2.INTER_AREA if out_w < lw else cv2.INTER_LINEAR
            img = cv2.resize(img, (out_w, out_h), interpolation=interp)
        return img

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({self.slide_id!r}, {w}x{h}px, {self.level0_mpp:.4g} µm/px from {self.mpp.source}, "
            f"{self.level_count} levels)"
        )


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Premultiplied RGBA → RGB composited on white (unscanned areas read as glass)."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) + 255.0 * (1.0 - alpha)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
