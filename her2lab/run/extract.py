"""Extraction task: tiles at the encoder's input size (made if missing), then features."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2lab.embed.backbones import BackboneSpec, build_encoder
from her2lab.embed.extract import ExtractSettings, extract_cohort, shard_of
from her2lab.errors import Her2labError
from her2lab.io import atomic_path, ensure_writable_dir
from her2lab.run.cohort import resolve_cohort
from her2lab.run.prepare import prepare_cohort, settings_from_config
from her2lab.slides.tiling import TilingParams

log = logging.getLogger(__name__)


def backbone_spec(cfg: DictConfig) -> BackboneSpec:
    return BackboneSpec(**OmegaConf.to_container(cfg, resolve=True))


def features_dir(cache_dir: str | Path, tiling: TilingParams, spec: BackboneSpec) -> Path:
    """``{cache}/features/{tiling}/{backbone}/``: the folder names its parameters."""
    return Path(cache_dir) / "features" / tiling.name / spec.label


def run_extract(cfg: DictConfig, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """Prepare (if needed) and embed this process's shard of the cohort; returns the report."""
    spec = backbone_spec(cfg.backbone)
    encoder = build_encoder(spec)  # fails fast on missing weights, before any slide work
    tiling = TilingParams(**OmegaConf.to_container(cfg.tiling, resolve=True))
    if manifest is None:
        manifest = resolve_cohort(cfg.cohort, num_workers=cfg.num_workers)
    ex = cfg.extract
    shard, n_shards = shard_of(ex.get("shard"), ex.get("num_shards"))
    mine = manifest.iloc[shard::n_shards].reset_index(drop=True)
    if n_shards > 1:
        log.info("shard %d of %d: %d of %d slides", shard, n_shards, len(mine), len(manifest))
    prep = settings_from_config(cfg, tiling)
    prep_report = prepare_cohort(mine, prep, num_workers=cfg.num_workers, report_suffix=_suffix(shard, n_shards))
    ok = set(prep_report.slide_id[prep_report.status != "failed"])
    out_dir = ensure_writable_dir(features_dir(cfg.cohort.cache_dir, tiling, spec), "features folder")
    items = [(r.slide_id, r.path, None if pd.isna(r.mpp) else float(r.mpp), prep.tiles_path(r.slide_id))
             for r in mine.itertuples() if r.slide_id in ok]
    settings = ExtractSettings(
        batch_size=int(ex.batch_size), num_workers=int(ex.num_workers), device=str(ex.device),
        precision=str(ex.precision), dtype=str(ex.dtype), overwrite=bool(ex.overwrite),
        prefetch=ex.get("prefetch"),
    )
    report = extract_cohort(items, encoder, out_dir, settings)
    failed_prep = prep_report[prep_report.status == "failed"][["slide_id", "error"]].assign(status="failed")
    report = pd.concat([report, failed_prep], ignore_index=True)
    with atomic_path(out_dir / f"extract_report{_suffix(shard, n_shards)}.csv") as tmp:
        report.to_csv(tmp, index=False)
    counts = report.status.value_counts().to_dict()
    log.info(
        "%s: embedded %d, skipped %d, failed %d slides → %s", spec.label, counts.get("done", 0),
        counts.get("skipped", 0), counts.get("failed", 0), out_dir,
    )
    if len(report) and (report.status == "failed").all():
        raise Her2labError(f"every slide failed; see {out_dir / 'extract_report.csv'}")
    return report


def _suffix(shard: int, n_shards: int) -> str:
    return f"_shard{shard}of{n_shards}" if n_shards > 1 else ""
