"""Open whole-slide images through OpenSlide and resolve their resolution (µm per pixel).

Every format OpenSlide reads works (.svs, .ndpi, .mrxs, .scn, .bif, DICOM, generic tiled TIFF …).
The level-0 mpp is resolved in this order, and where it came from is recorded in ``mpp_source``:

1. an explicit override (manifest column ``mpp`` or ``cohort.mpp_override``),
2. OpenSlide's normalised ``openslide.mpp-x``/``-y`` (vendor metadata),
3. vendor keys OpenSlide does not normalise (``aperio.MPP``),
4. TIFF resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit`` cm or inch),
5. the objective power (``openslide.objective-power``: 10 / power µm/px, 40x → 0.25), a last resort.

No mpp anywhere is a one-line :class:`~her2lab.errors.SlideError` naming the override to set, and
so is an mpp outside :data:`MPP_RANGE`: generic TIFF writers put 72 dpi (353 µm/px) in the
resolution tags of whatever they save, which would otherwise tile the slide into 0-pixel tiles.
An override gets the same range: it is a number typed by hand, and one outside the range is a
unit mistake (mm, nm or dpi for µm/px); a real whole-slide image is never that fine or coarse.

A file OpenSlide refuses is told apart by its header: a TIFF (or DICOM, SQLite) file whose pages
run past its end is truncated or corrupt (re-copy it), a complete one is in a layout OpenSlide does
not read (convert it), anything else is not a slide format.
"""

from __future__ import annotations

import logging
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

#: Plausible level-0 µm/px of a slide: a 100x objective gives ~0.1, a 1.25x overview ~8.
MPP_RANGE = (0.05, 20.0)

_OVERRIDE_HINT = "set the manifest's `mpp` column or cohort.mpp_override=<µm per pixel> (0.25 at 40x, 0.5 at 20x)"


@dataclass(frozen=True)
class MPP:
    """Level-0 resolution in µm per pixel and where it came from."""

    x: float
    y: float
    source: str
    detail: str = ""  # the raw value it came from, for messages, e.g. "tiff.XResolution 72 per inch"

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
    """Resolve level-0 µm/px from OpenSlide properties; ``None`` when nothing says it.

    The value is not range-checked here (see :func:`check_mpp`).
    """
    if override is not None:
        v = _positive_float(override)
        if v is None:
            raise SlideError(f"mpp override {override!r} is not a positive number")
        return MPP(v, v, "override", "manifest `mpp` column or cohort.mpp_override")
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    rx = _positive_float(properties.get("tiff.XResolution"))
    ry = _positive_float(properties.get("tiff.YResolution")) or rx
    tiff_detail = f"tiff.XResolution {rx:g} per {unit}" if rx else ""
    mx = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
    my = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    if mx and my:
        # For generic TIFFs OpenSlide derives its mpp from the resolution tags: say so.
        return MPP(mx, my, "openslide", tiff_detail or "openslide.mpp-x/-y")
    v = _positive_float(properties.get("aperio.MPP"))
    if v:
        return MPP(v, v, "aperio.MPP", f"aperio.MPP {v:g}")
    if rx and ry and unit in ("centimeter", "inch"):
        um_per_unit = 1e4 if unit == "centimeter" else 25_400.0
        return MPP(um_per_unit / rx, um_per_unit / ry, "tiff-resolution", tiff_detail)
    power = _positive_float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power:
        return MPP(10.0 / power, 10.0 / power, "objective-power", f"objective power {power:g}x")
    return None


def check_mpp(mpp: MPP, where: str | os.PathLike) -> None:
    """Raise a one-line :class:`SlideError` when ``mpp`` is outside :data:`MPP_RANGE`.

    Args:
        mpp: resolved level-0 resolution.
        where: the slide, named in the message.
    """
    lo, hi = MPP_RANGE
    bad = [v for v in (mpp.x, mpp.y) if not lo <= v <= hi]
    if not bad:
        return
    v = bad[0]
    if mpp.source == "override":
        raise SlideError(
            f"{where}: mpp override {v:g} µm/px ({mpp.detail}) is outside the {lo:g}–{hi:g} µm/px of "
            "any slide; give level-0 µm per pixel (0.25 at 40x, 0.5 at 20x), not mm, nm or dpi"
        )
    raise SlideError(
        f"{where}: level-0 resolution {v:.4g} µm/px from {mpp.source} ({mpp.detail}) is not plausible "
        f"for a slide ({lo:g}–{hi:g} µm/px; a default tag of the software that wrote it?); {_OVERRIDE_HINT}"
    )


class Slide:
    """A whole-slide image opened through OpenSlide, with its resolution resolved.

    Args:
        path: slide file.
        mpp_override: level-0 µm/px that wins over the slide's metadata.
        slide_id: name used in messages and outputs (default: file stem).
        tile_cache: keep decoded tiles in OpenSlide's tile cache; ``False`` for a handle that
            reads each tile once (a whole level for a mask or thumbnail), where caching costs
            about a sixth of the decode.

    Raises:
        SlideError: missing file, a format OpenSlide cannot read, a truncated or corrupt file,
            no mpp in the metadata and no override, or an mpp outside :data:`MPP_RANGE`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mpp_override: float | None = None,
        slide_id: str | None = None,
        tile_cache: bool = True,
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
            raise SlideError(_refused_file_message(self.path)) from None
        except openslide.OpenSlideError as exc:
            damage = _damage(self.path)
            raise SlideError(
                f"{self.path}: unreadable slide ({damage or _first_line(exc)}); "
                + ("the file is truncated or corrupt: re-copy it" if damage else "re-copy or re-export the file")
            ) from None
        try:
            mpp = resolve_mpp(dict(self._osr.properties), mpp_override)
            if mpp is None:
                raise SlideError(
                    f"{self.path}: no mpp in metadata; set an `mpp` column in the manifest or "
                    "cohort.mpp_override=<µm per pixel>"
                )
            check_mpp(mpp, self.path)
        except SlideError as exc:
            self._osr.close()
            msg = str(exc)
            raise SlideError(msg if msg.startswith(str(self.path)) else f"{self.path}: {msg}") from None
        self.mpp = mpp
        if not tile_cache:
            self._osr.set_cache(openslide.OpenSlideCache(0))

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
        rgba = np.asarray(region)
        if rgba.size and rgba[..., 3].min() == 255:  # opaque: drop alpha (cheaper than PIL)
            return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        return _rgba_to_rgb(rgba)

    def read_at_mpp(self, target_mpp: float) -> np.ndarray:
        """The whole slide as one RGB image (H, W, 3) at ``target_mpp`` µm/px.

        Meant for low resolutions (tissue masks, thumbnails): read from the coarsest level at
        least as fine as the target, then downscaled. Never upsampled past level 0 (memory stays
        bounded by the slide's own pixels): a target finer than level 0 is a :class:`SlideError`;
        use :meth:`read_lowres` to take the slide's own resolution instead.
        """
        if target_mpp < self.level0_mpp * (1 - MPP_REL_TOL):
            raise SlideError(
                f"{self.path}: an image at {target_mpp:g} µm/px is finer than the slide's level 0 "
                f"({self.level0_mpp:.3g} µm/px) from {self.mpp.source}; slides are never upsampled: "
                "ask for a coarser resolution or check the slide's mpp"
            )
        level = self.level_for_mpp(target_mpp)
        lw, lh = self.level_dimensions[level]
        img = self.read_region((0, 0), level, (lw, lh))
        w0, h0 = self.dimensions
        scale = self.level0_mpp / target_mpp
        out_w, out_h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        if level == 0:  # within the tolerance of level 0: its own pixels, not a few % more
            out_w, out_h = min(out_w, lw), min(out_h, lh)
        if (out_w, out_h) != (lw, lh):
            interp = cv2.INTER_AREA if out_w < lw else cv2.INTER_LINEAR
            img = cv2.resize(img, (out_w, out_h), interpolation=interp)
        return img

    def read_lowres(self, target_mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at ``target_mpp``, or at level 0 when the slide is coarser than that.

        Returns:
            RGB uint8 (H, W, 3) and its actual µm/px (``max(target_mpp, level-0 mpp)``).
        """
        if target_mpp < self.level0_mpp * (1 - MPP_REL_TOL):
            w0, h0 = self.dimensions
            return self.read_region((0, 0), 0, (w0, h0)), self.level0_mpp
        img = self.read_at_mpp(target_mpp)
        return img, max(target_mpp, self.level0_mpp)

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


_MAGIC = {  # headers of slide containers OpenSlide reads (and what to call them)
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "BigTIFF", b"MM\x00+": "BigTIFF",
    b"SQLite format 3\x00": "SQLite (Sakura)",
}


def _container(head: bytes) -> str | None:
    """Which slide container a file's first bytes announce, if any."""
    if head[128:132] == b"DICM":
        return "DICOM"
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _damage(path: Path) -> str | None:
    """Why a file with a TIFF header is incomplete, or ``None`` (whole, or not a TIFF)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if not (_container(head) or "").endswith("TIFF"):
        return None
    import tifffile

    size = path.stat().st_size
    warnings: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    tlog = logging.getLogger("tifffile")  # it logs a broken IFD chain instead of raising
    handler, propagate = _Keep(logging.WARNING), tlog.propagate
    tlog.addHandler(handler)
    tlog.propagate = False
    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)), default=0)
                if end > size:
                    return f"image data runs to byte {end} but the file has {size}"
    except Exception as exc:  # any parse failure of a file that says TIFF is damage
        return f"broken TIFF structure: {_first_line(exc)}"
    finally:
        tlog.removeHandler(handler)
        tlog.propagate = propagate
    return f"broken TIFF structure: {warnings[0].split('> ', 1)[-1]}" if warnings else None


def _refused_file_message(path: Path) -> str:
    """The message for a file OpenSlide does not recognise: damaged, or another format."""
    size = path.stat().st_size
    if size == 0:
        return f"{path}: empty file (0 bytes), truncated when copied; re-copy it"
    with open(path, "rb") as f:
        kind = _container(f.read(132))
    if kind is None:
        return (
            f"{path}: not a slide format OpenSlide reads; convert it to a tiled pyramidal TIFF or "
            "remove it from the manifest"
        )
    if not kind.endswith("TIFF"):
        return f"{path}: a {kind} file OpenSlide cannot open ({size} bytes): truncated or corrupt; re-copy it"
    damage = _damage(path)
    if damage:
        return f"{path}: {kind} file truncated or corrupt ({damage}); re-copy it"
    return (
        f"{path}: a complete {kind} that OpenSlide cannot read as a slide (strips instead of tiles, or "
        "an unsupported layout); convert it to a tiled pyramidal TIFF or remove it from the manifest"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
