"""Attention maps of an evaluated MIL run: per slide a heatmap and per-class evidence over the
thumbnail, a montage of the most/least attended tiles, a QuPath GeoJSON and, where the cohort
has ground-truth masks (the demo), ``localisation.csv``.

Works from features made elsewhere too (TRIDENT/CLAM files carry no her2lab attributes): the
tile size comes from the file's ``coords`` attributes (TRIDENT's ``patch_size_level0``) or the
spacing of the tile grid, the slide and its µm/px from the cohort's manifest, and the thumbnail
is made from the slide when the cohort was never prepared. What cannot be drawn for a slide
(its file unreachable, say) is left out with a warning naming the slide and the reason; what
cannot be scored for localisation is listed in ``localisation.csv`` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from her2lab.data.cohort import load_manifest
from her2lab.errors import Her2labError
from her2lab.explain.heatmaps import (
    SlideAttention,
    bag_attention,
    evidence_png,
    geojson,
    heatmap_png,
    localisation_auroc,
    montage_png,
    tiles_inside,
)
from her2lab.io import atomic_path
from her2lab.models.base import MILNet
from her2lab.slides.prepare import PrepareSettings
from her2lab.slides.reader import Slide
from her2lab.slides.thumbnails import save_png

log = logging.getLogger(__name__)


def attention_maps(module, dataset, rcfg: DictConfig, out: Path, limit: int | None = 16, top_k: int = 8,
                   chunk: int = 8192) -> pd.DataFrame | None:
    """Maps of the first ``limit`` slides of ``dataset`` into ``out``; with ground-truth positive
    masks, the localisation table (also ``out/localisation.csv``): per slide the AUROC of attention
    and of the tile score for tiles inside the positive region, or why the slide was not scored."""
    if not isinstance(module.net, MILNet):  # the maps need the MIL-net face; the rest of the evaluation does not
        log.warning("attention maps left out: %s is not a MILNet (her2lab.models.base.MILNet)", type(module.net).__name__)
        return None
    out.mkdir(parents=True, exist_ok=True)
    prep = PrepareSettings.from_config(rcfg)
    masks = Path(str(rcfg.cohort.get("root") or "")) / "masks" if rcfg.cohort.get("synthetic") else None
    mask_mpp = float((rcfg.cohort.get("synthetic") or {}).get("mask_mpp", 8.0))
    classes = [str(c) for c in rcfg.labels.classes]
    slides = _manifest_slides(rcfg)
    rows = []
    records = dataset.records[:limit]
    for rec in records:
        att = bag_attention(module.net, rec.features_path, module.probs, chunk=chunk)
        path, mpp = slides.get(rec.slide_id, (att.slide_path, None))
        att, thumb, problem = _placed(att, rec.features_path, path, mpp, prep)
        label = classes[rec.label] if rec.label >= 0 else "unknown"
        title = f"{rec.slide_id}: label {label}, predicted {classes[int(att.probs.argmax())]} ({att.probs.max():.2f})"
        if att.patch_px_level0 > 0:
            geojson(att, out / f"{rec.slide_id}.geojson", classes)
        if problem is None:
            heatmap_png(att, thumb, prep.thumb_mpp, out / f"{rec.slide_id}_heatmap.png", title, classes)
            evidence_png(att, thumb, prep.thumb_mpp, out / f"{rec.slide_id}_evidence.png", title, classes)
            montage_png(att, out / f"{rec.slide_id}_tiles.png", k=top_k, mpp=mpp)
        else:
            log.warning("heatmaps of slide %s left out: %s%s", rec.slide_id, problem,
                        " (its GeoJSON is written)" if att.patch_px_level0 > 0 else "")
        if masks is not None:
            rows.append({"slide_id": rec.slide_id, "label": label, "n_tiles": len(att.attention),
                         **_localisation(att, masks / f"{rec.slide_id}_positive.png", mask_mpp)})
    log.info("attention maps of %d slide(s) → %s", len(records), out)
    if not rows:
        return None
    loc = pd.DataFrame(rows)
    with atomic_path(out / "localisation.csv") as tmp:
        loc.to_csv(tmp, index=False)
    left = loc[loc.skipped != ""]
    if len(left):
        log.warning("localisation: %d of %d slide(s) not scored (listed in localisation.csv): %s", len(left), len(loc),
                    "; ".join(f"{r.slide_id} ({r.skipped})" for r in left.head(10).itertuples()))
    return loc


def _localisation(att: SlideAttention, mask_file: Path, mask_mpp: float) -> dict:
    """AUROCs of attention and tile score for 'tile in the positive mask', or why there are none."""
    none = {"attention_auroc": float("nan"), "tile_score_auroc": float("nan")}
    if not mask_file.is_file():
        return {**none, "skipped": f"no ground-truth mask {mask_file.name}"}
    if att.patch_px_level0 <= 0 or att.level0_mpp <= 0:
        return {**none, "skipped": "tile size or level-0 µm/px unknown"}
    mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        return {**none, "skipped": f"ground-truth mask {mask_file.name} is not a readable image"}
    inside = tiles_inside(att, mask, mask_mpp)
    if not inside.any():
        return {**none, "skipped": "no positive tissue under any tile"}
    if inside.all():
        return {**none, "skipped": "every tile lies in positive tissue"}
    return {"attention_auroc": localisation_auroc(att, mask, mask_mpp),
            "tile_score_auroc": localisation_auroc(att, mask, mask_mpp, att.tile_score), "skipped": ""}


def _manifest_slides(rcfg: DictConfig) -> dict[str, tuple[str, float | None]]:
    """slide_id → (slide path, level-0 µm/px from the manifest or the override, else None)."""

    try:
        table = load_manifest(str(rcfg.cohort.manifest), mpp_override=rcfg.cohort.get("mpp_override"))
    except Her2labError as exc:  # the maps then rely on what the features files say
        log.warning("heatmaps: cohort manifest unreadable (%s); slide paths from the features files", exc)
        return {}
    return {str(r.slide_id): (str(r.path), None if pd.isna(r.mpp) else float(r.mpp)) for r in table.itertuples()}


def _placed(att: SlideAttention, features_path: str, slide_path: str, mpp: float | None, prep):
    """``att`` with its tile size, level-0 µm/px and slide path filled in where the features file
    lacks them; the thumbnail (RGB) to draw on; and the reason there is none (else None)."""

    patch = att.patch_px_level0 or tile_px_level0(features_path, att.coords)
    att = dataclasses.replace(att, patch_px_level0=patch, slide_path=slide_path or att.slide_path,
                              level0_mpp=att.level0_mpp or (mpp or 0.0))
    try:
        slide = Slide(att.slide_path, mpp_override=mpp, slide_id=att.slide_id)
    except Her2labError as exc:  # unreachable, unreadable, no µm/px: the maps need the slide's pixels
        return att, None, str(exc)
    with slide:
        att = dataclasses.replace(att, level0_mpp=att.level0_mpp or slide.level0_mpp)
        if patch <= 0:
            return att, None, "tile size unknown (a single tile, and no patch_size_level0 in the features file)"
        thumb_file = prep.thumb_path(att.slide_id)
        img = cv2.imread(str(thumb_file)) if thumb_file.is_file() else None
        if img is not None:
            return att, cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None
        if prep.thumb_mpp < slide.level0_mpp * 0.999:
            return att, None, (f"thumbnail at {prep.thumb_mpp:g} µm/px is finer than the slide's level 0 "
                               f"({slide.level0_mpp:.3g} µm/px); set prepare.thumb_mpp coarser")
        thumb = slide.read_at_mpp(prep.thumb_mpp)  # (h, w, 3) RGB: the cohort was never prepared
    try:  # cached where prepare would put it; a read-only cohort folder just means no cache
        save_png(thumb_file, thumb)
    except OSError as exc:
        log.info("thumbnail of %s not cached (%s)", att.slide_id, exc)
    return att, thumb, None


def tile_px_level0(features_path: str | Path, coords: np.ndarray) -> int:
    """Side of a tile in level-0 pixels for a features file without her2lab's attributes:
    TRIDENT's ``coords.attrs['patch_size_level0']``, CLAM's ``patch_size`` at ``patch_level`` 0,
    else the step of the tile grid (the smallest gap between distinct x or y corners); 0 if unknown."""
    try:
        with h5py.File(features_path, "r") as f:
            attrs = dict(f["coords"].attrs) if "coords" in f else {}
    except OSError:
        attrs = {}
    if float(attrs.get("patch_size_level0", 0)) > 0:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and int(attrs.get("patch_level", -1)) == 0 and float(attrs["patch_size"]) > 0:
        return int(attrs["patch_size"])
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)] if len(coords) > 1 else []
    steps = [s[s > 0].min() for s in steps if (s > 0).any()]
    if steps:
        log.info("%s: tile size taken from the tile grid's step (%d px at level 0)", features_path, min(steps))
    return int(min(steps)) if steps else 0
