"""The tiles file: one slide's tile grid, tissue mask and what made them (the one module that
reads and writes it).

``tiles/{tiling}/{slide}.h5`` holds ``coords`` (N, 2) int64 level-0 top-left pixels,
``tissue_fraction`` (N,), ``tissue_mask`` (at ``mask_mpp``) and attributes: the tile geometry
(:data:`TILES_KEYS`), the slide's identity (path, size in bytes and pixels, level-0 mpp and its
source), the tissue and tiling parameters (``params_json``) and their hash with the slide's size
and mpp (``param_hash``): a file whose hash differs was made for something else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from her2lab import __version__
from her2lab.errors import SlideError, StaleCacheError
from her2lab.io import param_hash, write_h5
from her2lab.slides.reader import Slide
from her2lab.slides.tiling import TileGeometry, TilingParams

#: Attributes a tiles file from ``python -m her2lab.prepare`` always has.
TILES_KEYS = (
    "patch_px", "patch_px_level0", "stride_level0", "read_level", "read_px", "level0_mpp",
    "target_mpp", "mpp_source", "tiling", "param_hash",
)


def tiles_params_hash(params: dict, level0_mpp: float, slide_size: tuple[int, int]) -> str:
    """The hash a current tiles file carries: its parameters, the slide's level-0 mpp and size."""
    return param_hash({**params, "level0_mpp": round(level0_mpp, 6), "slide_size": list(slide_size)})


def check_stale(path: Path, params: dict) -> None:
    """Raise :class:`StaleCacheError` if ``path`` exists with other tiling/tissue parameters.

    An unreadable file is not stale: it is simply rebuilt.
    """
    if not path.exists():
        return
    try:
        with h5py.File(path, "r") as f:
            stored = json.loads(f.attrs["params_json"])
    except (OSError, KeyError, ValueError):
        return
    diffs = [
        f"{group}.{k}={stored.get(group, {}).get(k)!r} (now {v!r})"
        for group, values in params.items()
        for k, v in values.items()
        if stored.get(group, {}).get(k) != v
    ]
    if diffs:
        raise StaleCacheError(
            f"{path}: made with {', '.join(diffs)}; set prepare.overwrite=true to rebuild, "
            "or use another cohort.cache_dir"
        )


def is_current(path: Path, params: dict, mpp: float | None = None) -> bool:
    """``path`` exists and was made with ``params`` for the slide it describes (hash matches).

    With ``mpp`` (the manifest's override), also at that level-0 mpp: correcting a slide's mpp
    re-prepares it instead of keeping tiles cut at the old one.
    """
    try:
        with h5py.File(path, "r") as f:
            h = f.attrs["param_hash"]
            level0_mpp = float(f.attrs["level0_mpp"])
            size = tuple(int(v) for v in f.attrs["slide_size"])
    except (OSError, KeyError, ValueError):
        return False
    if mpp is not None and abs(level0_mpp - mpp) > 1e-6 * mpp:
        return False
    return h == tiles_params_hash(params, level0_mpp, size)


def write_tiles_h5(
    path: Path,
    slide: Slide,
    tiling: TilingParams,
    params: dict,
    geom: TileGeometry,
    coords: np.ndarray,
    frac: np.ndarray,
    mask: np.ndarray,
    mask_mpp: float,
) -> None:
    """Tiles file: coords (N, 2) + tissue fraction (N,) + mask, attributes say what made it.

    ``params`` are the tiling and tissue parameters (their hash, with the slide's size and mpp,
    decides whether the file is current); ``mask_mpp`` is the mask's actual µm/px
    (``tissue.seg_mpp``, or coarser for a slide coarser than that).
    """
    stat = slide.path.stat()
    attrs = {
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path.resolve()),
        "slide_bytes": stat.st_size,
        "slide_size": list(slide.dimensions),
        "level0_mpp": slide.level0_mpp,
        "mpp_source": slide.mpp.source,
        "target_mpp": tiling.target_mpp,
        "patch_px": tiling.patch_px,
        "overlap_px": tiling.overlap_px,
        "min_tissue": tiling.min_tissue,
        "patch_px_level0": geom.patch_px_level0,
        "stride_level0": geom.stride_level0,
        "read_level": geom.read_level,
        "read_px": geom.read_px,
        "mask_mpp": float(mask_mpp),
        "tiling": tiling.name,
        "params_json": json.dumps(params, sort_keys=True),
        "param_hash": tiles_params_hash(params, slide.level0_mpp, slide.dimensions),
        "her2lab_version": __version__,
    }
    datasets = {
        "coords": coords.astype(np.int64),
        "tissue_fraction": frac.astype(np.float32),
        "tissue_mask": (mask.astype(np.uint8), {"compression": "gzip", "compression_opts": 4}),
    }
    write_h5(path, datasets, attrs)


def read_tiles_h5(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Coords (N, 2) and attributes of a tiles file."""
    with h5py.File(path, "r") as f:
        return f["coords"][:], dict(f.attrs)


@dataclass
class SlideTiles:
    """One slide's tiles as the tiles file describes them."""

    slide_id: str
    slide_path: str
    mpp: float | None
    coords: np.ndarray  # (N, 2) int64
    geom: TileGeometry
    attrs: dict


def load_slide_tiles(tiles_path: Path, slide_id: str, slide_path: str, mpp: float | None) -> SlideTiles:
    """Read a tiles file and check the slide it describes is still the one at ``slide_path``.

    Raises:
        SlideError: missing, corrupt or foreign tiles file (e.g. a CLAM/TRIDENT patch file, whose
            attributes are not these), impossible geometry (an older prepare of a slide with a
            wrong mpp), or a slide that moved or changed since it was tiled.
    """
    try:
        with h5py.File(tiles_path, "r") as f:
            coords = f["coords"][:]
            attrs = dict(f.attrs)
    except FileNotFoundError:
        raise SlideError(f"{tiles_path}: tiles file missing; run python -m her2lab.prepare first") from None
    except (OSError, KeyError) as exc:
        raise SlideError(
            f"{tiles_path}: corrupt tiles file ({type(exc).__name__}); delete it and re-run prepare"
        ) from None
    missing = [k for k in TILES_KEYS if k not in attrs]
    if missing:
        raise SlideError(
            f"{tiles_path}: not a her2lab tiles file (no {', '.join(missing[:3])} attribute"
            f"{'s' if len(missing) > 1 else ''}; another tool's patch file?); run python -m her2lab.prepare "
            "for this slide"
        )
    try:
        geom = TileGeometry(
            patch_px=int(attrs["patch_px"]),
            patch_px_level0=int(attrs["patch_px_level0"]),
            stride_level0=float(attrs["stride_level0"]),
            read_level=int(attrs["read_level"]),
            read_px=int(attrs["read_px"]),
            level0_mpp=float(attrs["level0_mpp"]),
        )
    except (TypeError, ValueError) as exc:
        raise SlideError(f"{tiles_path}: corrupt tiles attributes ({exc}); re-run prepare with prepare.overwrite=true") from None
    if min(geom.patch_px, geom.patch_px_level0, geom.read_px) < 1 or not geom.stride_level0 > 0:
        raise SlideError(
            f"{tiles_path}: tiles of {geom.patch_px_level0} level-0 px (slide at {geom.level0_mpp:.4g} µm/px "
            f"from {attrs['mpp_source']}: a wrong resolution tag?); fix the slide's mpp and re-run prepare "
            "with prepare.overwrite=true"
        )
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
        raise SlideError(
            f"{tiles_path}: coords are {coords.dtype} {coords.shape}, not (N, 2) integers; re-run prepare "
            "with prepare.overwrite=true"
        )
    p = Path(slide_path)
    if not p.exists():
        raise SlideError(
            f"{p}: slide not found (tiled from {attrs.get('slide_path')}); the slide moved: fix the manifest path"
        )
    if int(attrs.get("slide_bytes", -1)) != p.stat().st_size:
        raise SlideError(
            f"{p}: not the file that was tiled ({attrs.get('slide_bytes')} bytes then, {p.stat().st_size} now); "
            "re-run prepare with prepare.overwrite=true"
        )
    return SlideTiles(slide_id, str(p), mpp, coords, geom, attrs)
