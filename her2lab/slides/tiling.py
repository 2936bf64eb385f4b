"""Tile grids at an exact resolution, and reading those tiles back.

A tiling is ``patch_px`` pixels at ``target_mpp`` µm/px with ``overlap_px`` overlap (both at the
target resolution). Coordinates are level-0 top-left pixels. Tiles are read from the coarsest
pyramid level that is at least as fine as the target and resized only when that level does not
match the target (e.g. a 0.25 µm/px slide tiled at 0.5 µm/px with no 0.5 level).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from her2lab.errors import SlideError
from her2lab.slides.reader import MPP_REL_TOL, Slide


@dataclass(frozen=True)
class TilingParams:
    """Tile grid settings (``conf/tiling/*.yaml``)."""

    target_mpp: float = 0.5
    patch_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.5  # minimum tissue fraction of a tile

    def __post_init__(self) -> None:
        if self.patch_px <= 0 or not 0 <= self.overlap_px < self.patch_px:
            raise ValueError(
                f"tiling: need patch_px > 0 and 0 <= overlap_px < patch_px, got "
                f"patch_px={self.patch_px}, overlap_px={self.overlap_px}"
            )
        if self.target_mpp <= 0 or not 0 <= self.min_tissue <= 1:
            raise ValueError(
                f"tiling: need target_mpp > 0 and 0 <= min_tissue <= 1, got "
                f"target_mpp={self.target_mpp}, min_tissue={self.min_tissue}"
            )

    @property
    def name(self) -> str:
        """Folder name that states the parameters, e.g. ``0.5mpp_224px_0px_overlap``."""
        return f"{self.target_mpp:g}mpp_{self.patch_px}px_{self.overlap_px}px_overlap"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TileGeometry:
    """How a tiling maps onto one slide."""

    patch_px: int  # output tile size
    patch_px_level0: int  # tile side in level-0 pixels (rounded)
    stride_level0: float  # grid step in level-0 pixels (exact)
    read_level: int  # pyramid level the pixels come from
    read_px: int  # tile side at ``read_level`` before resizing to ``patch_px``
    level0_mpp: float

    @property
    def needs_resize(self) -> bool:
        return self.read_px != self.patch_px


def tile_geometry(slide: Slide, params: TilingParams) -> TileGeometry:
    """Where a tiling's pixels come from on ``slide``.

    Raises:
        SlideError: a tile would be less than one level-0 pixel (the slide's mpp is wrong, or
            the tiling far finer than the scan).
    """
    scale = params.target_mpp / slide.level0_mpp  # level-0 px per target px
    level = slide.level_for_mpp(params.target_mpp)
    ds = slide.level_downsamples[level]
    read_px = round(params.patch_px * scale / ds)
    if abs(read_px - params.patch_px) <= params.patch_px * MPP_REL_TOL / 2:
        read_px = params.patch_px  # the level is at the target: no resampling
    p0 = params.patch_px * scale
    if round(p0) < 1 or read_px < 1:
        raise SlideError(
            f"{slide.path}: a {params.patch_px}px tile at {params.target_mpp:g} µm/px is {p0:.2g} "
            f"pixels of this {slide.level0_mpp:.4g} µm/px slide (mpp from {slide.mpp.source}), less "
            "than one; check the slide's mpp (manifest `mpp` column or cohort.mpp_override) or "
            "use a coarser tiling.target_mpp"
        )
    return TileGeometry(
        patch_px=params.patch_px,
        patch_px_level0=round(p0),
        stride_level0=(params.patch_px - params.overlap_px) * scale,
        read_level=level,
        read_px=read_px,
        level0_mpp=slide.level0_mpp,
    )


def tile_grid(
    slide_size: tuple[int, int],
    geom: TileGeometry,
    mask: np.ndarray,
    mask_mpp: float,
    min_tissue: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid tiles over the slide and keep those with enough tissue.

    Args:
        slide_size: level-0 (width, height).
        geom: from :func:`tile_geometry`.
        mask: boolean tissue mask at ``mask_mpp`` µm/px, covering the whole slide.
        mask_mpp: resolution of ``mask``.
        min_tissue: minimum tissue fraction of a kept tile.

    Returns:
        ``coords`` (N, 2) int64 level-0 top-left (x, y), row-major; ``tissue`` (N,) float32
        tissue fraction of each tile, measured on the mask.
    """
    w0, h0 = slide_size
    p0 = geom.patch_px_level0
    nx = int((w0 - p0) // geom.stride_level0) + 1 if w0 >= p0 else 0
    ny = int((h0 - p0) // geom.stride_level0) + 1 if h0 >= p0 else 0
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    xs = np.round(np.arange(nx) * geom.stride_level0).astype(np.int64)  # (nx,)
    ys = np.round(np.arange(ny) * geom.stride_level0).astype(np.int64)  # (ny,)
    # Tissue fraction per tile from a summed-area table of the mask.
    s = geom.level0_mpp / mask_mpp  # mask px per level-0 px
    mh, mw = mask.shape
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)  # (mh+1, mw+1)
    x0 = np.clip(np.round(xs * s), 0, mw).astype(np.int64)
    x1 = np.clip(np.round((xs + p0) * s), 0, mw).astype(np.int64)
    y0 = np.clip(np.round(ys * s), 0, mh).astype(np.int64)
    y1 = np.clip(np.round((ys + p0) * s), 0, mh).astype(np.int64)
    x1 = np.maximum(
        x1, np.minimum(x0 + 1, mw)
    )  # a tile smaller than a mask pixel still samples one
    y1 = np.maximum(y1, np.minimum(y0 + 1, mh))
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")  # (ny, nx)
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    inside = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    area = np.maximum((Y1 - Y0) * (X1 - X0), 1)
    frac = (inside / area).astype(np.float32)  # (ny, nx)
    keep = frac >= max(min_tissue, 1e-6)
    gy, gx = np.nonzero(keep)
    coords = np.stack([xs[gx], ys[gy]], axis=1).astype(np.int64)  # (N, 2)
    return coords, frac[gy, gx]


class TileReader:
    """Reads tiles of one tiling from one slide as RGB uint8 (patch_px, patch_px, 3).

    One reader per slide handle; in DataLoader workers each worker makes its own.

    Raises:
        SlideError: ``geom`` does not fit ``slide`` (a tiles file from an older or foreign
            prepare, or a slide whose mpp has changed since it was tiled). OpenSlide would
            return blank tiles for a level it lacks, not an error.
    """

    def __init__(self, slide: Slide, geom: TileGeometry) -> None:
        why = _misfit(slide, geom)
        if why:
            raise SlideError(
                f"{slide.path}: its tiles do not fit the slide ({why}); re-run prepare with "
                "prepare.overwrite=true"
            )
        self.slide = slide
        self.geom = geom
        self._interp = cv2.INTER_AREA if geom.read_px > geom.patch_px else cv2.INTER_LINEAR

    def read(self, xy: tuple[int, int] | np.ndarray) -> np.ndarray:
        g = self.geom
        img = self.slide.read_region((int(xy[0]), int(xy[1])), g.read_level, (g.read_px, g.read_px))
        if g.needs_resize:
            img = cv2.resize(img, (g.patch_px, g.patch_px), interpolation=self._interp)
        return img


def _misfit(slide: Slide, geom: TileGeometry) -> str:
    """Why ``geom`` cannot be read from ``slide``, or ``""``."""
    if min(geom.patch_px, geom.patch_px_level0, geom.read_px) < 1 or not geom.stride_level0 > 0:
        return (
            f"tiles of {geom.patch_px_level0} level-0 px, read as {geom.read_px} px, "
            f"stride {geom.stride_level0:g}"
        )
    if not 0 <= geom.read_level < slide.level_count:
        return f"pyramid level {geom.read_level} asked for, the slide has {slide.level_count}"
    if abs(geom.level0_mpp - slide.level0_mpp) > MPP_REL_TOL * slide.level0_mpp:
        return (
            f"tiled at {geom.level0_mpp:.4g} µm/px, the slide is now {slide.level0_mpp:.4g} µm/px "
            f"from {slide.mpp.source}"
        )
    return ""


class ReaderPool:
    """Open :class:`TileReader` s by key, at most ``max_open`` slides at once (least recently used
    closes first). A pool pickled into a DataLoader worker arrives empty: each worker opens its
    own slide handles.
    """

    def __init__(self, max_open: int = 4) -> None:
        self.max_open = max_open
        self._open: OrderedDict[int, TileReader] = OrderedDict()
        self._failed: dict[int, str] = {}  # a slide that failed to open is not retried per tile

    def get(self, key: int, slide_path: str, mpp: float | None, geom: TileGeometry) -> TileReader:
        """The reader of slide ``key``; a :class:`SlideError` when it cannot be opened or read."""
        if key in self._failed:
            raise SlideError(self._failed[key])
        r = self._open.get(key)
        if r is None:
            try:
                slide = Slide(slide_path, mpp_override=mpp)
            except SlideError as exc:
                self._failed[key] = str(exc)
                raise
            try:
                r = TileReader(slide, geom)
            except SlideError as exc:
                slide.close()
                self._failed[key] = str(exc)
                raise
            self._open[key] = r
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.slide.close()
        else:
            self._open.move_to_end(key)
        return r

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open, "_open": OrderedDict(), "_failed": {}}
