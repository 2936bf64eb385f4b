"""Slide preparation: tissue mask, tile grid, thumbnail and QC picture for every slide.

Each slide's outputs live under the cohort's cache folder, in folders that name their
parameters::

    tiles/0.5mpp_224px_0px_overlap/{slide}.h5   coords, tissue fraction, tissue mask, attributes
    thumbs/8mpp/{slide}.png                      thumbnail at a fixed µm/px
    qc/0.5mpp_224px_0px_overlap/{slide}.png      thumbnail + tissue contour + kept tiles (+ ROI)
    outlines/0.5mpp_224px_0px_overlap/{slide}.geojson  tissue outline for QuPath (level-0 px)
    prepare_report.csv, failures.csv             one row per slide / per failed slide

Every write is atomic; a slide whose outputs exist with the same parameters is skipped, so a
killed run loses at most the slides in flight, and its pool workers end with it. A bad slide is
reported and the rest finish; a full disk stops the run with one line (the slides already written
stay, and a re-run resumes). A slide coarser than ``tissue.seg_mpp`` is segmented at its own
resolution, never upsampled; the tiles file's ``mask_mpp`` says which. With ``cohort.roi_dir``, a
slide with a QuPath export ``{roi_dir}/{slide}.geojson`` keeps only the tiles whose centre lies
inside its polygons; the file's hash is one of the tiles file's parameters.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from her2lab.config import plain
from her2lab.errors import Her2labError, OutputError, SlideError
from her2lab.io import SPACE_FIX, atomic_path, ensure_writable_dir, write_error
from her2lab.pool import worker_pool
from her2lab.progress import progress_bar
from her2lab.slides.reader import Slide
from her2lab.slides.roi import Roi, file_digest, read_roi, tissue_polygons, write_outline
from her2lab.slides.thumbnails import qc_image, resize_to_mpp, save_png
from her2lab.slides.tiles_file import check_stale, is_current, write_tiles_h5
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
    roi_dir: Path | None = None  # QuPath GeoJSON exports, {slide_id}.geojson (optional per slide)

    def tiles_path(self, slide_id: str) -> Path:
        return self.cache_dir / "tiles" / self.tiling.name / f"{slide_id}.h5"

    def thumb_path(self, slide_id: str) -> Path:
        return self.cache_dir / "thumbs" / f"{self.thumb_mpp:g}mpp" / f"{slide_id}.png"

    def qc_path(self, slide_id: str) -> Path:
        return self.cache_dir / "qc" / self.tiling.name / f"{slide_id}.png"

    def outline_path(self, slide_id: str) -> Path:
        """The tissue outline; beside the tiles of the same name, made with the same tissue params."""
        return self.cache_dir / "outlines" / self.tiling.name / f"{slide_id}.geojson"

    def roi_path(self, slide_id: str) -> Path | None:
        """The slide's ROI file, or None (no ``roi_dir``, or no file for this slide)."""
        if self.roi_dir is None:
            return None
        path = self.roi_dir / f"{slide_id}.geojson"
        return path if path.is_file() else None

    def params(self, roi_digest: str | None = None) -> dict:
        """The parameters a tiles file depends on (its hash sits in the file's attributes): the
        tiling and tissue settings the cohort shares, and the slide's ROI file hash if it has one."""
        params = {"tiling": self.tiling.to_dict(), "tissue": self.tissue.to_dict()}
        return {**params, "roi": {"sha1": roi_digest}} if roi_digest else params

    def slide_params(self, slide_id: str) -> dict:
        """:meth:`params` of one slide (hashing its ROI file, if any).

        Raises:
            SlideError: the ROI file cannot be read.
        """
        roi = self.roi_path(slide_id)
        return self.params(file_digest(roi) if roi is not None else None)

    @classmethod
    def from_config(cls, cfg, tiling: TilingParams | None = None) -> PrepareSettings:
        """From a Hydra config (``cohort``, ``tissue``, ``prepare``; ``tiling`` unless given)."""
        return cls(
            cache_dir=Path(cfg.cohort.cache_dir),
            tiling=tiling or tiling_params(cfg.tiling),
            tissue=TissueParams(**plain(cfg.tissue)),
            thumb_mpp=float(cfg.prepare.thumb_mpp),
            qc=bool(cfg.prepare.qc),
            overwrite=bool(cfg.prepare.overwrite),
            roi_dir=Path(roi).expanduser() if (roi := cfg.cohort.get("roi_dir")) else None,  # older configs lack it
        )


def tiling_params(node) -> TilingParams:
    """:class:`TilingParams` from the ``tiling`` config group (or any mapping of its keys)."""
    return TilingParams(**plain(node))


def is_done(settings: PrepareSettings, slide_id: str, mpp: float | None = None) -> bool:
    """The slide's outputs exist and its tiles file is current (see :func:`is_current`): made
    with the same parameters, inside the same ROI file (or without one, if it has none)."""
    path = settings.tiles_path(slide_id)
    if settings.overwrite or not path.exists() or not settings.thumb_path(slide_id).exists():
        return False
    if not settings.outline_path(slide_id).exists():
        return False  # a cache from before outlines: re-prepared (same tiles, same hash)
    if settings.qc and not settings.qc_path(slide_id).exists():
        return False
    try:
        params = settings.slide_params(slide_id)
    except SlideError:
        return False  # prepare_slide reports it
    return is_current(path, params, mpp)


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
    roi_file = settings.roi_path(slide_id)
    roi = read_roi(roi_file) if roi_file is not None else None
    params = settings.params(roi.digest if roi else None)
    # Its tiles are read once (one low-resolution read), so OpenSlide need not cache them.
    with Slide(path, mpp_override=mpp, slide_id=slide_id, tile_cache=False) as slide:
        if settings.thumb_mpp < slide.level0_mpp * 0.999:
            raise SlideError(
                f"{slide.path}: thumbnail at {settings.thumb_mpp:g} µm/px is finer than the slide's "
                f"level 0 ({slide.level0_mpp:.3g} µm/px) from {slide.mpp.source}; thumbnails are "
                f"never upsampled: use a thumb_mpp ≥ {slide.level0_mpp:.3g} or check the slide's mpp"
            )
        # One low-resolution read serves the mask and the thumbnail: at the finer of the two
        # resolutions, the other one downscaled from it. A slide coarser than seg_mpp is
        # segmented at its own pixels; its mask says so (mask_mpp).
        img, img_mpp = slide.read_lowres(min(settings.tissue.seg_mpp, settings.thumb_mpp))
        seg_mpp = max(settings.tissue.seg_mpp, img_mpp)
        seg_img = resize_to_mpp(img, img_mpp, seg_mpp)
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
        if roi is not None:
            coords, frac = _inside_roi(roi, coords, frac, geom.patch_px_level0, slide)
        tiles_path = settings.tiles_path(slide_id)
        _write(tiles_path, lambda: write_tiles_h5(tiles_path, slide, settings.tiling, params, geom,
                                                  coords, frac, mask, seg_mpp))
        outline = tissue_polygons(mask, seg_mpp / slide.level0_mpp)
        outline_path = settings.outline_path(slide_id)
        _write(outline_path, lambda: _atomic(outline_path, lambda tmp: write_outline(tmp, outline)))
        thumb = (
            resize_to_mpp(img, img_mpp, settings.thumb_mpp)
            if settings.thumb_mpp >= img_mpp
            else slide.read_at_mpp(settings.thumb_mpp)  # within 0.1 % of level 0: its own pixels
        )
        _write(settings.thumb_path(slide_id), lambda: save_png(settings.thumb_path(slide_id), thumb))
        if settings.qc:
            title = (
                f"{slide_id}  {len(coords)} tiles {settings.tiling.name}  "
                f"{slide.level0_mpp:.3g} um/px ({slide.mpp.source})"
                + (f"  inside {roi.path.name}" if roi else "")
            )
            qc = qc_image(
                thumb,
                settings.thumb_mpp,
                mask,
                coords,
                geom.patch_px_level0,
                slide.level0_mpp,
                title,
                roi=roi.area if roi else None,
            )
            _write(settings.qc_path(slide_id), lambda: save_png(settings.qc_path(slide_id), qc))
        return {
            "slide_id": slide_id,
            "status": "done",
            "n_tiles": len(coords),
            "tissue_mm2": round(float(mask.sum()) * seg_mpp**2 / 1e6, 4),
            "level0_mpp": slide.level0_mpp,
            "mpp_source": slide.mpp.source,
            "roi": roi.path.name if roi else "",
            "seconds": round(time.perf_counter() - t0, 3),
            "error": "",
        }


def _inside_roi(roi: Roi, coords, frac, patch_px_level0: int, slide: Slide):
    """The tiles (and their tissue fractions) whose centre lies inside ``roi``.

    Raises:
        SlideError: none does.
    """
    keep = roi.contains_tiles(coords, patch_px_level0)
    if not keep.any():
        x0, y0, x1, y1 = roi.area.bounds
        w, h = slide.dimensions
        raise SlideError(
            f"{slide.path}: no tiles inside ROI {roi.path} (its polygons span x {x0:.0f}–{x1:.0f}, "
            f"y {y0:.0f}–{y1:.0f} px; the slide is {w}×{h} px, {len(coords)} tissue tiles); draw the ROI "
            "over tissue, export it in full-resolution pixel coordinates, or remove the file"
        )
    log.info("%s: %d of %d tissue tiles inside ROI %s", slide.slide_id, keep.sum(), len(keep), roi.path.name)
    return coords[keep], frac[keep]


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file renamed onto ``path`` when it succeeds."""
    with atomic_path(path) as tmp:
        write(tmp)


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
        raise write_error(path, exc, f"{SPACE_FIX}; the prepared slides are intact") from None


def prepare_cohort(
    manifest: pd.DataFrame, settings: PrepareSettings, num_workers: int = 1, report_suffix: str = ""
) -> pd.DataFrame:
    """Prepare every slide of a validated manifest; returns the report (one row per slide).

    Writes ``prepare_report{suffix}.csv`` and ``failures{suffix}.csv`` into ``settings.cache_dir``
    (a suffix keeps concurrent shards from overwriting each other's reports).

    Raises:
        StaleCacheError: outputs exist with other tiling or tissue parameters (a slide whose ROI
            file changed is simply prepared again).
        Her2labError: ``settings.roi_dir`` is not a folder.
        OutputError: the cache folder is not writable, or fills up: slides in flight finish,
            the others are left ``not run``, the reports are written if they can be.
    """
    ensure_writable_dir(settings.cache_dir, "cohort cache folder")
    if settings.roi_dir is not None:
        if not settings.roi_dir.is_dir():
            raise Her2labError(
                f"cohort.roi_dir={settings.roi_dir}: no such folder; point it at the QuPath GeoJSON "
                "exports ({slide_id}.geojson) or set cohort.roi_dir=null"
            )
        n = sum(settings.roi_path(sid) is not None for sid in manifest["slide_id"])
        (log.warning if n == 0 else log.info)(
            "%d of %d slides have a ROI file (%s/{slide_id}.geojson); the others are tiled whole",
            n, len(manifest), settings.roi_dir)
    if not settings.overwrite:
        for sid in manifest["slide_id"]:
            check_stale(settings.tiles_path(sid), settings.params())
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
