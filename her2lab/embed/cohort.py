"""A cohort's features: tiles at the encoder's input size (made when missing), then embeddings.

Beside the features: ``extract_report{shard}.csv`` (one row per slide) and ``failures{shard}.csv``
(``slide_id, path, stage, error`` for each slide that failed in prepare or extraction). A failed
slide never stops the others; training then applies its missing-features policy to it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2lab.embed.backbones import BackboneSpec, Encoder
from her2lab.embed.extract import ExtractSettings, extract_cohort, shard_of
from her2lab.embed.features_file import features_dir
from her2lab.errors import Her2labError
from her2lab.io import atomic_path, ensure_writable_dir, write_error
from her2lab.slides.prepare import PrepareSettings, prepare_cohort, tiling_params

log = logging.getLogger(__name__)


def backbone_spec(node: DictConfig) -> BackboneSpec:
    """:class:`BackboneSpec` from the ``backbone`` config group."""
    return BackboneSpec(**OmegaConf.to_container(node, resolve=True))


def cohort_features_dir(cfg: DictConfig) -> Path:
    """Where the configured cohort's features from the configured backbone and tiling live."""
    return features_dir(cfg.cohort.cache_dir, tiling_params(cfg.tiling), backbone_spec(cfg.backbone).label,
                        augment_views(cfg))


def augment_views(cfg: DictConfig) -> int:
    """``extract.augment_views`` (0 when the config has none)."""
    return int((cfg.get("extract") or {}).get("augment_views") or 0)


def embed_manifest(cfg: DictConfig, manifest: pd.DataFrame, encoder: Encoder) -> pd.DataFrame:
    """Prepare (if needed) and embed this process's shard of ``manifest``; returns the report.

    The shard is ``extract.shard`` of ``extract.num_shards``, or torchrun's / SLURM's rank.
    """
    spec = encoder.spec
    tiling = tiling_params(cfg.tiling)
    ex = cfg.extract
    shard, n_shards = shard_of(ex.get("shard"), ex.get("num_shards"))
    mine = manifest.iloc[shard::n_shards].reset_index(drop=True)
    if n_shards > 1:
        log.info("shard %d of %d: %d of %d slides", shard, n_shards, len(mine), len(manifest))
    suffix = f"_shard{shard}of{n_shards}" if n_shards > 1 else ""
    prep = PrepareSettings.from_config(cfg, tiling)
    prep_report = prepare_cohort(mine, prep, num_workers=cfg.num_workers, report_suffix=suffix)
    ok = set(prep_report.slide_id[prep_report.status != "failed"])
    out_dir = ensure_writable_dir(features_dir(cfg.cohort.cache_dir, tiling, spec.label, augment_views(cfg)),
                                  "features folder")
    items = [(r.slide_id, r.path, None if pd.isna(r.mpp) else float(r.mpp), prep.tiles_path(r.slide_id))
             for r in mine.itertuples() if r.slide_id in ok]
    settings = ExtractSettings(
        batch_size=int(ex.batch_size), num_workers=int(ex.num_workers), device=str(ex.device),
        precision=str(ex.precision), dtype=str(ex.dtype), overwrite=bool(ex.overwrite),
        prefetch=ex.get("prefetch"), compile=ex.get("compile", "auto"), augment_views=augment_views(cfg),
    )
    report = extract_cohort(items, encoder, out_dir, settings)
    failed_prep = prep_report[prep_report.status == "failed"][["slide_id", "error"]].assign(status="failed")
    report = pd.concat([report.assign(stage="extract"), failed_prep.assign(stage="prepare")], ignore_index=True)
    paths = dict(zip(mine.slide_id, mine.path, strict=True))
    failures = report[report.status == "failed"].assign(path=lambda d: d.slide_id.map(paths))
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
