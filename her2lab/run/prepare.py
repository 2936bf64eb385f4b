"""Cohort preparation: tissue mask, tile grid, thumbnail and QC picture for every slide.

Each slide's outputs live under the cohort's cache folder, in folders that name their
parameters::

    tiles/0.5mpp_224px_0px_overlap/{slide}.h5   coords, tissue fraction, tissue mask, attributes
    thumbs/8mpp/{slide}.png                      thumbnail at a fixed µm/px
    qc/0.5mpp_224px_0px_overlap/{slide}.png      thumbnail + tissue contour + kept tiles
    prepare_report.csv, failures.csv             one row per slide / per failed slide

Every write is atomic; a slide whose outputs exist with the same parameters is skipped, so a
killed run loses at most the slides in flight, and its pool workers end with it. A bad slide is
reported and the rest finish; a full disk stops the run with one line (the slides already written
stay, and a re-run resumes). A slide coarser than ``tissue.seg_mpp`` is segmented at its own
resolution, never upsampled; the tiles file's ``mask_mpp`` says which.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from her2lab import __version__
from her2lab.errors import Her2labError, OutputError, SlideError, StaleCacheError
from her2lab.io import atomic_path, ensure_writable_dir, param_hash, write_h5
from her2lab.pool import worker_pool
from her2lab.progress import progress_bar
from her2lab.slides.reader import Slide
from her2lab.slides.thumbnails import qc_image, resize_to_mpp, save_png
from her2lab.slides.tiling import TilingParams, tile_geometry, tile_grid
from her2lab.slides.tissue import TissueParams, segment_tissue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSettings:
    """What :func:`prepare_slide` needs besides the slide."""

    cache_dir: Path
    tiling: TilingParams
    tissue: TissueParams
    thumb_mpp: float = 8.0
    qc: bool = True
    overwrite: bool = False

    def tiles_path(self, slide_id: str) -> Path:
        return self.cache_dir / "tiles" / self.tiling.name / f"{slide_id}.h5"

    def thumb_path(self, slide_id: str) -> Path:
        return self.cache_dir / "thumbs" / f"{self.thumb_mpp:g}mpp" / f"{slide_id}.png"

    def qc_path(self, slide_id: str) -> Path:
        return self.cache_dir / "qc" / self.tiling.name / f"{slide_id}.png"

    def params(self) -> dict:
        """The parameters a tiles file depends on (its hash sits in the file's attributes)."""
        return {"tiling": self.tiling.to_dict(), "tissue": self.tissue.to_dict()}


def settings_from_config(cfg, tiling: TilingParams | None = None) -> PrepareSettings:
    """Prepare settings from a Hydra config (``cohort``, ``tissue``, ``prepare``; ``tiling`` unless given)."""
    from omegaconf import OmegaConf

    return PrepareSettings(
        cache_dir=Path(cfg.cohort.cache_dir),
        tiling=tiling or TilingParams(**OmegaConf.to_container(cfg.tiling, resolve=True)),
        tissue=TissueParams(**OmegaConf.to_container(cfg.tissue, resolve=True)),
        thumb_mpp=float(cfg.prepare.thumb_mpp),
        qc=bool(cfg.prepare.qc),
        overwrite=bool(cfg.prepare.overwrite),
    )


def tiles_params_hash(
    settings: PrepareSettings, level0_mpp: float, slide_size: tuple[int, int]
) -> str:
    return param_hash(
        {**settings.params(), "level0_mpp": round(level0_mpp, 6), "slide_size": list(slide_size)}
    )


def check_stale(settings: PrepareSettings, slide_id: str) -> None:
    """Raise :class:`StaleCacheError` if a tiles file exists with other tiling/tissue parameters."""
    path = settings.tiles_path(slide_id)
    if settings.overwrite or not path.exists():
        return
    try:
        with h5py.File(path, "r") as f:
            stored = json.loads(f.attrs["params_json"])
    except (OSError, KeyError, ValueError):
        return  # unreadable: it will simply be rebuilt
    now = settings.params()
    diffs = [
        f"{group}.{k}={stored.get(group, {}).get(k)!r} (now {v!r})"
        for group, values in now.items()
        for k, v in values.items()
        if stored.get(group, {}).get(k) != v
    ]
    if diffs:
        raise StaleCacheError(
            f"{path}: made with {', '.join(diffs)}; set prepare.overwrite=true to rebuild, "
            "or use another cohort.cache_dir"
        )


def is_done(settings: PrepareSettings, slide_id: str, mpp: float | None = None) -> bool:
    """Outputs exist and were made with the same parameters (hash matches).

    With ``mpp`` (the manifest's override), also at that level-0 mpp: correcting a slide's mpp
    re-prepares it instead of keeping tiles cut at the old one.
    """
    path = settings.tiles_path(slide_id)
    if settings.overwrite or not path.exists() or not settings.thumb_path(slide_id).exists():
        return False
    if settings.qc and not settings.qc_path(slide_id).exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            h = f.attrs["param_hash"]
            level0_mpp = float(f.attrs["level0_mpp"])
            size = tuple(int(v) for v in f.attrs["slide_size"])
    except (OSError, KeyError, ValueError):
        return False
    if mpp is not None and abs(level0_mpp - mpp) > 1e-6 * mpp:
        return False
    return h == tiles_params_hash(settings, level0_mpp, size)


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_SPACE_FIX = "free space or choose another cohort.cache_dir"


def write_error(path: str | os.PathLike, exc: OSError, fix: str = _SPACE_FIX) -> OutputError:
    """A one-line :class:`OutputError` for a failed write: the file, why ("disk full") and the fix."""
    full = exc.errno in FULL_DISK_ERRNOS
    why = f"disk full: {exc.strerror or exc}" if full else (exc.strerror or f"{type(exc).__name__}: {exc}")
    return OutputError(f"{path}: could not write ({why}); {fix}")


def _write(path: Path, write) -> None:
    """Run ``write()`` for ``path`` (an atomic writer), turning an OS error into a one-line one."""
    try:
        write()
    except OSError as exc:
        raise write_error(path, exc) from None


def prepare_slide(slide_id: str, path: str, mpp: float | None, settings: PrepareSettings) -> dict:
    """Segment, tile, thumbnail and QC one slide; returns a report row.

    Raises:
        SlideError: a bad slide.
        OutputError: an output could not be written (nothing half-written is left).
    """
    t0 = time.perf_counter()
    with Slide(path, mpp_override=mpp, slide_id=slide_id) as slide:
        if settings.thumb_mpp < slide.level0_mpp * 0.999:
            raise SlideError(
                f"{slide.path}: thumbnail at {settings.thumb_mpp:g} µm/px is finer than the slide's "
                f"level 0 ({slide.level0_mpp:.3g} µm/px) from {slide.mpp.source}; thumbnails are "
                f"never upsampled: use a thumb_mpp ≥ {slide.level0_mpp:.3g} or check the slide's mpp"
            )
        # A slide coarser than seg_mpp is segmented at its own pixels; its mask says so (mask_mpp).
        seg_img, seg_mpp = slide.read_lowres(settings.tissue.seg_mpp)
        if seg_mpp != settings.tissue.seg_mpp:
            log.info("%s: coarser than tissue.seg_mpp=%g; tissue mask at its own %.3g µm/px",
                     slide_id, settings.tissue.seg_mpp, seg_mpp)
        mask = segment_tissue(seg_img, settings.tissue, mpp=seg_mpp)
        if not mask.any():
            raise SlideError(
                f"{slide.path}: no tissue found; check the slide or relax tissue.min_saturation "
                f"({settings.tissue.min_saturation}) / tissue.min_area_um2 ({settings.tissue.min_area_um2:g})"
            )
        geom = tile_geometry(slide, settings.tiling)
        coords, frac = tile_grid(slide.dimensions, geom, mask, seg_mpp, settings.tiling.min_tissue)
        if len(coords) == 0:
            raise SlideError(
                f"{slide.path}: tissue found but no {settings.tiling.patch_px}px tile at "
                f"{settings.tiling.target_mpp:g} µm/px has ≥{settings.tiling.min_tissue:g} tissue; "
                "lower tiling.min_tissue or tiling.patch_px"
            )
        tiles_path = settings.tiles_path(slide_id)
        _write(tiles_path, lambda: write_tiles_h5(tiles_path, slide, settings, geom, coords, frac, mask, seg_mpp))
        thumb = (
            resize_to_mpp(seg_img, seg_mpp, settings.thumb_mpp)
            if settings.thumb_mpp >= seg_mpp
            else slide.read_at_mpp(settings.thumb_mpp)
        )
        _write(settings.thumb_path(slide_id), lambda: save_png(settings.thumb_path(slide_id), thumb))
        if settings.qc:
            title = (
                f"{slide_id}  {len(coords)} tiles {settings.tiling.name}  "
                f"{slide.level0_mpp:.3g} um/px ({slide.mpp.source})"
            )
            qc = qc_image(
                thumb,
                settings.thumb_mpp,
                mask,
                coords,
                geom.patch_px_level0,
                slide.level0_mpp,
                title,
            )
            _write(settings.qc_path(slide_id), lambda: save_png(settings.qc_path(slide_id), qc))
        return {
            "slide_id": slide_id,
            "status": "done",
            "n_tiles": len(coords),
            "tissue_mm2": round(float(mask.sum()) * seg_mpp**2 / 1e6, 4),
            "level0_mpp": slide.level0_mpp,
            "mpp_source": slide.mpp.source,
            "seconds": round(time.perf_counter() - t0, 3),
            "error": "",
        }


def write_tiles_h5(
    path: Path,
    slide: Slide,
    settings: PrepareSettings,
    geom,
    coords: np.ndarray,
    frac: np.ndarray,
    mask: np.ndarray,
    mask_mpp: float | None = None,
) -> None:
    """Tiles file: coords + tissue fraction + mask, attributes say what made it.

    ``mask_mpp`` is the mask's actual µm/px (default ``tissue.seg_mpp``; coarser for a slide
    coarser than that).
    """
    stat = slide.path.stat()
    attrs = {
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path.resolve()),
        "slide_bytes": stat.st_size,
        "slide_size": list(slide.dimensions),
        "level0_mpp": slide.level0_mpp,
        "mpp_source": slide.mpp.source,
        "target_mpp": settings.tiling.target_mpp,
        "patch_px": settings.tiling.patch_px,
        "overlap_px": settings.tiling.overlap_px,
        "min_tissue": settings.tiling.min_tissue,
        "patch_px_level0": geom.patch_px_level0,
        "stride_level0": geom.stride_level0,
        "read_level": geom.read_level,
        "read_px": geom.read_px,
        "mask_mpp": float(mask_mpp or settings.tissue.seg_mpp),
        "tiling": settings.tiling.name,
        "params_json": json.dumps(settings.params(), sort_keys=True),
        "param_hash": tiles_params_hash(settings, slide.level0_mpp, slide.dimensions),
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


def _prepare_job(args: tuple) -> dict:
    slide_id, path, mpp, settings = args
    try:
        return prepare_slide(slide_id, path, mpp, settings)
    except OutputError as exc:  # not the slide's fault: the run stops (``_stop``)
        return {"slide_id": slide_id, "status": "failed", "error": str(exc), "_stop": True}
    except Her2labError as exc:
        return {"slide_id": slide_id, "status": "failed", "error": str(exc)}
    except Exception as exc:  # a bad slide must not stop the cohort; the reason is reported
        log.debug("unexpected error on %s", slide_id, exc_info=True)
        return {
            "slide_id": slide_id,
            "status": "failed",
            "error": f"{path}: {type(exc).__name__}: {exc}",
        }


def _write_report(df: pd.DataFrame, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    except OSError as exc:
        raise write_error(path, exc, f"{_SPACE_FIX}; the prepared slides are intact") from None


def prepare_cohort(
    manifest: pd.DataFrame, settings: PrepareSettings, num_workers: int = 1, report_suffix: str = ""
) -> pd.DataFrame:
    """Prepare every slide of a validated manifest; returns the report (one row per slide).

    Writes ``prepare_report{suffix}.csv`` and ``failures{suffix}.csv`` into ``settings.cache_dir``
    (a suffix keeps concurrent shards from overwriting each other's reports).

    Raises:
        StaleCacheError: outputs exist with other parameters.
        OutputError: the cache folder is not writable, or fills up: slides in flight finish,
            the others are left ``not run``, the reports are written if they can be.
    """
    ensure_writable_dir(settings.cache_dir, "cohort cache folder")
    for sid in manifest["slide_id"]:
        check_stale(settings, sid)
    rows: list[dict] = []
    todo = []
    for r in manifest.itertuples():
        mpp = None if pd.isna(r.mpp) else float(r.mpp)
        if is_done(settings, r.slide_id, mpp):
            rows.append({"slide_id": r.slide_id, "status": "skipped", "error": ""})
        else:
            todo.append((r.slide_id, r.path, mpp, settings))
    if rows:
        log.info("%d slide(s) already prepared with the same parameters: skipped", len(rows))
    stop = ""
    if todo:
        with progress_bar(
            f"preparing {len(todo)} slides ({settings.tiling.name})", len(todo)
        ) as advance:
            if num_workers > 1 and len(todo) > 1:
                with worker_pool(min(num_workers, len(todo))) as pool:
                    futures = [pool.submit(_prepare_job, job) for job in todo]
                    for fut in as_completed(futures):
                        if fut.cancelled():
                            continue
                        rows.append(fut.result())
                        advance()
                        if rows[-1].pop("_stop", False) and not stop:
                            stop = rows[-1]["error"]
                            for f in futures:  # slides in flight finish, the others wait
                                f.cancel()
            else:
                for job in todo:
                    rows.append(_prepare_job(job))
                    advance()
                    if rows[-1].pop("_stop", False):
                        stop = rows[-1]["error"]
                        break
    seen = {r["slide_id"] for r in rows}
    rows += [{"slide_id": sid, "status": "not run", "error": ""} for sid, *_ in todo if sid not in seen]
    order = {sid: i for i, sid in enumerate(manifest["slide_id"])}
    report = (
        pd.DataFrame(rows)
        .sort_values("slide_id", key=lambda s: s.map(order))
        .reset_index(drop=True)
    )
    report = report.merge(manifest[["slide_id", "path"]], on="slide_id", how="left")
    failures = report[report["status"] == "failed"][["slide_id", "path", "error"]]
    for r in failures.itertuples():  # logged first: the reports below may not get written
        log.warning("failed: %s", r.error)
    report_path = settings.cache_dir / f"prepare_report{report_suffix}.csv"
    try:
        _write_report(report, report_path)
        _write_report(failures, settings.cache_dir / f"failures{report_suffix}.csv")
    except OutputError as exc:
        if not stop:
            raise
        log.warning("%s", exc)  # the write error that stopped the run is the one to report
    counts = report["status"].value_counts().to_dict()
    log.info(
        "prepared %d, skipped %d, failed %d of %d slides; report: %s",
        counts.get("done", 0),
        counts.get("skipped", 0),
        counts.get("failed", 0),
        len(report),
        report_path,
    )
    if stop:
        raise OutputError(
            f"{stop}; {counts.get('done', 0) + counts.get('skipped', 0)} prepared slides are intact "
            "and a re-run resumes"
        )
    return report
