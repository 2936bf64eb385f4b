"""Extraction task: tiles at the encoder's input size (made if missing), then features.

Beside the features: ``extract_report{shard}.csv`` (one row per slide) and ``failures{shard}.csv``
(``slide_id, path, stage, error`` for each slide that failed in prepare or extraction). A failed
slide never stops the others; training then applies its missing-features policy to it.
"""

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
from her2lab.run.prepare import prepare_cohort, settings_from_config, write_error
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
    report = pd.concat([report.assign(stage="extract"), failed_prep.assign(stage="prepare")], ignore_index=True)
    paths = dict(zip(mine.slide_id, mine.path, strict=True))
    failures = report[report.status == "failed"].assign(path=lambda d: d.slide_id.map(paths))
    suffix = _suffix(shard, n_shards)
    _write_csv(report, out_dir / f"extract_report{suffix}.csv")
    _write_csv(failures[["slide_id", "path", "stage", "error"]], out_dir / f"failures{suffix}.csv")
    counts = report.status.value_counts().to_dict()
    log.info(
        "%s: embedded %d, skipped %d, failed %d slides → %s", spec.label, counts.get("done", 0),
        counts.get("skipped", 0), counts.get("failed", 0), out_dir,
    )
    if len(report) and (report.status == "failed").all():
        raise Her2labError(f"every slide failed; see {out_dir / f'failures{suffix}.csv'}")
    return report


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
    except OSError as exc:
        raise write_error(path, exc, "free space or move paths.data_dir; the features written are intact") from None


def _suffix(shard: int, n_shards: int) -> str:
    return f"_shard{shard}of{n_shards}" if n_shards > 1 else ""
