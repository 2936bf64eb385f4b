"""What a run learns from, one class per kind of data, named by the ``data`` config's ``_target_``.

Each class turns the run's config into a LightningDataModule: the cohort split into patient-grouped
folds (``splits.csv`` in the run folder), whatever the data need on disk made when missing (tiles,
thumbnails, features), slides that could not be made left out by the ``data.missing_slides``
policy, and the datamodule of ``data.module``. It also says which explainer suits its models
(``explainer``: a name in :mod:`her2lab.explain`) and whether it needs the backbone's weights
(``needs_encoder``), so the tasks never switch on the kind of data.

A new kind of data is one subclass here (or anywhere importable) and one ``conf/data/`` file
naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytorch_lightning as pl
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities import rank_zero_only

from her2lab.config import build
from her2lab.data.bags import BagRecord
from her2lab.data.cohort_config import resolve_cohort
from her2lab.data.labels import label_scheme
from her2lab.data.patches import NORM_TILES_PER_SLIDE, SlideRecord, folder_stats, tile_stats
from her2lab.data.splits import save_splits, split_for_fold
from her2lab.data.thumbnails import ThumbRecord
from her2lab.embed.backbones import build_encoder
from her2lab.embed.cohort import backbone_spec, cohort_features_dir, embed_manifest
from her2lab.embed.features_file import features_identity
from her2lab.errors import Her2labError
from her2lab.io import atomic_path
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.tiling import TilingParams

log = logging.getLogger(__name__)


class Inputs:
    """The data of one run, built from its whole config (``cfg.data`` says which subclass)."""

    #: Name of the explainer for models trained on these inputs (:mod:`her2lab.explain`), if any.
    explainer: ClassVar[str | None] = None
    #: Slides of a cohort (False: a folder of labelled patches, with nothing to replace by a new cohort).
    has_cohort: ClassVar[bool] = True

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    @property
    def needs_encoder(self) -> bool:
        """True when the backbone's weights must exist before the data can be made."""
        return False

    def datamodule(self, run_dir: Path) -> pl.LightningDataModule:
        """The datamodule, after making what it reads; files about the split go to ``run_dir``."""
        raise NotImplementedError

    # -- shared steps -------------------------------------------------------------------------

    def split_cohort(self, run_dir: Path) -> pd.DataFrame:
        """Manifest with ``label`` and ``split`` columns (``data.cv_protocol``: patient-grouped
        folds by default, or the study's protocol; :mod:`her2lab.data.splits`), saved to the run.

        ``external_cohort=true`` (evaluation on a new cohort): every slide is in the ``test`` split.
        """
        cfg = self.cfg
        manifest = resolve_cohort(cfg.cohort, num_workers=cfg.get("num_workers", 1),
                                  allow_unlabelled=bool(cfg.get("external_cohort")))
        labels = label_scheme(cfg.labels.name, cfg.labels.get("classes")).encode(manifest)
        if cfg.get("external_cohort"):
            split = pd.Series("test", index=manifest.index)
        else:
            split = split_for_fold(manifest, labels, int(cfg.fold), int(cfg.data.n_folds), int(cfg.seed),
                                   str(cfg.data.get("cv_protocol") or "patient_grouped"),
                                   float(cfg.data.get("test_fraction") or 0.2))
        save_splits(run_dir / "splits.csv", manifest, labels, split)
        return manifest.assign(label=labels.values, split=split.values)

    def by_split(self, table: pd.DataFrame, make) -> dict[str, list]:
        """``make(row)`` for every row, grouped by split; an empty split the run needs is an error."""
        cfg = self.cfg
        out: dict[str, list] = {"train": [], "val": [], "test": []}
        for r in table.itertuples():
            out[r.split].append(make(r))
        if cfg.get("external_cohort") and not out["test"]:
            raise Her2labError(f"cohort {cfg.cohort.name}: no slide left to evaluate")
        for s in () if cfg.get("external_cohort") else ("train", "val"):
            if not out[s]:
                raise Her2labError(f"the {s} split is empty (fold={cfg.fold}, data.n_folds={cfg.data.n_folds}); "
                                   "use more slides or fewer folds")
        return out

    def exclude(self, table: pd.DataFrame, missing: dict[str, str], folder: Path, run_dir: Path,
                what: str = "features") -> pd.DataFrame:
        """Slides of the manifest without input (features, a thumbnail): an error, or
        (``data.missing_slides=drop``) left out and listed in ``excluded_slides.csv``, never silently."""
        if not missing:
            return table
        ids = sorted(missing)
        policy = self.cfg.data.get("missing_slides", "error")
        if policy not in ("error", "drop"):
            raise Her2labError(f"data.missing_slides={policy!r}: use error or drop")
        if policy == "error":
            raise Her2labError(
                f"{len(ids)} slide(s) of the manifest have no {what} in {folder} ({', '.join(ids[:5])}"
                f"{', …' if len(ids) > 5 else ''}: {missing[ids[0]]}); fix them, or set "
                "data.missing_slides=drop to train without them"
            )
        with atomic_path(run_dir / "excluded_slides.csv") as tmp:
            pd.DataFrame({"slide_id": ids, "reason": [missing[i] for i in ids]}).to_csv(tmp, index=False)
        log.warning("%d slide(s) left out (no %s; listed in excluded_slides.csv): %s", len(ids), what, ", ".join(ids[:10]))
        return table[~table.slide_id.isin(missing)]

    def prepare(self, table: pd.DataFrame, prep: PrepareSettings) -> dict[str, str]:
        """Tiles, thumbnails and QC of the split cohort (made when missing); failed slide → reason."""
        report = prepare_cohort(table, prep, num_workers=self.cfg.get("num_workers", 1))
        failed = report[report.status == "failed"]
        return dict(zip(failed.slide_id, failed.error.astype(str), strict=True))


def _set_normalisation(cfg: DictConfig, mean: tuple[float, ...], std: tuple[float, ...], source: str) -> None:
    """``backbone.mean``/``std`` (null in the preset) set to the statistics of the run's own
    training data: the config, and so an exported encoder, records them."""
    with open_dict(cfg):
        cfg.backbone.mean = [round(v, 6) for v in mean]
        cfg.backbone.std = [round(v, 6) for v in std]
    log.info("backbone.mean=%s backbone.std=%s: from %s", list(cfg.backbone.mean), list(cfg.backbone.std), source)


def bag_sampling(cfg: DictConfig) -> dict | None:
    """``eval.bag_sampling`` when enabled (n_bags, bag_size, seed), else None."""
    node = (cfg.get("eval") or {}).get("bag_sampling") or {}
    if not node.get("enabled", False):
        return None
    return {k: int(node.get(k, default)) for k, default in (("n_bags", 1600), ("bag_size", 100), ("seed", 123))}


def first_record(splits: dict[str, list]):
    """The first record of the first non-empty split."""
    return next(recs[0] for recs in splits.values() if recs)


class BagInputs(Inputs):
    """Bags of tile embeddings: features extracted with ``backbone`` when missing, or read from
    ``data.features_dir`` (TRIDENT/CLAM-style files). Writes ``features.json`` (what made them)."""

    explainer = "attention_maps"

    @property
    def needs_encoder(self) -> bool:
        return not self.cfg.data.get("features_dir")

    def splits(self, run_dir: Path) -> dict[str, list[BagRecord]]:
        cfg = self.cfg
        table = self.split_cohort(run_dir)
        if cfg.data.get("features_dir"):
            folder = Path(cfg.data.features_dir)
            missing = {s: "no features file" for s in table.slide_id if not (folder / f"{s}.h5").exists()}
        else:
            encoder = build_encoder(backbone_spec(cfg.backbone))
            if cfg.backbone.get("mean") is None:  # stored with the weights: the run's config says what they were
                with open_dict(cfg):
                    cfg.backbone.mean, cfg.backbone.std = list(encoder.spec.mean), list(encoder.spec.std)
            report = embed_manifest(cfg, table, encoder)
            folder = cohort_features_dir(cfg)
            failed = report[report.status == "failed"]
            missing = dict(zip(failed.slide_id, failed.get("error", pd.Series("failed", index=failed.index)).astype(str),
                               strict=True))
        table = self.exclude(table, missing, folder, run_dir)
        splits = self.by_split(table, lambda r: BagRecord(r.slide_id, str(folder / f"{r.slide_id}.h5"), int(r.label)))
        if _is_rank_zero():  # what made the features, so that evaluation on other slides can check it
            with atomic_path(run_dir / "features.json") as tmp:
                tmp.write_text(json.dumps({"folder": str(folder), **features_identity(first_record(splits).features_path)},
                                          indent=2))
        return splits

    def datamodule(self, run_dir: Path) -> pl.LightningDataModule:
        cfg = self.cfg
        splits = self.splits(run_dir)
        bb, given = cfg.backbone, cfg.data.get("features_dir")
        if bb.embed_dim is None or given:  # a timm model by name, or features from elsewhere: they say their size
            dim = int(features_identity(first_record(splits).features_path)["dim"])  # the header: no read of the bag
            if given and bb.embed_dim not in (None, dim):
                log.info("features in %s are %d-d: backbone.embed_dim=%d (the %s preset says %s)",
                         given, dim, dim, bb.get("preset") or bb.name, bb.embed_dim)
            with open_dict(cfg):
                cfg.backbone.embed_dim = dim
        return build(cfg.data.module, splits=splits, embed_dim=cfg.backbone.embed_dim,
                     nonfinite=cfg.data.get("nonfinite", "error"), test_bags=bag_sampling(cfg))


class PatchInputs(Inputs):
    """Tiles labelled with their slide's label, cut at the backbone's input size and mpp."""

    def datamodule(self, run_dir: Path) -> pl.LightningDataModule:
        cfg = self.cfg
        bb = cfg.backbone
        tiling = TilingParams(target_mpp=bb.target_mpp, patch_px=bb.input_px, min_tissue=cfg.data.min_tissue)
        table = self.split_cohort(run_dir)
        prep = PrepareSettings.from_config(cfg, tiling)
        failed = self.prepare(table, prep)
        if failed:
            log.warning("%d slide(s) left out (failed preparation): %s", len(failed), ", ".join(sorted(failed)[:10]))
        table = table[~table.slide_id.isin(failed)]
        splits = self.by_split(table, lambda r: SlideRecord(r.slide_id, r.path, str(prep.tiles_path(r.slide_id)),
                                                            int(r.label), None if pd.isna(r.mpp) else float(r.mpp)))
        if bb.get("mean") is None:  # the training tiles' own mean/std, kept in the config (and the exported encoder)
            _set_normalisation(cfg, *tile_stats(splits["train"], seed=int(cfg.seed)),
                               f"{NORM_TILES_PER_SLIDE} tiles of each of {len(splits['train'])} training slides")
        return build(cfg.data.module, splits=splits, mean=list(bb.mean), std=list(bb.std))


class PatchFolderInputs(Inputs):
    """A folder of labelled patches (``root/{train,val}/<class>/*.png``): no slides, no cohort."""

    has_cohort = False

    def datamodule(self, run_dir: Path) -> pl.LightningDataModule:
        cfg = self.cfg
        bb = cfg.backbone
        if bb.get("mean") is None:  # the training images' own mean/std, as for slide tiles
            _set_normalisation(cfg, *folder_stats(cfg.data.module.root, int(bb.input_px), seed=int(cfg.seed)),
                               f"the training images of {cfg.data.module.root}")
        return build(cfg.data.module, input_px=bb.input_px, mean=list(bb.mean), std=list(bb.std),
                     num_classes=cfg.labels.num_classes)


class ThumbnailInputs(Inputs):
    """Whole-slide thumbnails at ``data.thumb_mpp`` (made by the prepare step when missing)."""

    explainer = "gradcam"

    def datamodule(self, run_dir: Path) -> pl.LightningDataModule:
        cfg = self.cfg
        table = self.split_cohort(run_dir)
        prep = dataclasses.replace(PrepareSettings.from_config(cfg), thumb_mpp=float(cfg.data.thumb_mpp))
        table = self.exclude(table, self.prepare(table, prep), prep.cache_dir, run_dir, "thumbnail")
        splits = self.by_split(table, lambda r: ThumbRecord(r.slide_id, str(prep.thumb_path(r.slide_id)),
                                                            str(prep.tiles_path(r.slide_id)), int(r.label)))
        return build(cfg.data.module, splits=splits, thumb_mpp=float(cfg.data.thumb_mpp))


#: Run folders written before ``data`` configs named their class kept only ``data.kind``.
_BY_KIND = {"bags": BagInputs, "patches": PatchInputs, "patch_folder": PatchFolderInputs, "thumbnail": ThumbnailInputs}


def inputs_for(cfg: DictConfig) -> Inputs:
    """The :class:`Inputs` of a run config: ``data._target_`` (or an older run's ``data.kind``)."""
    target = cfg.data.get("_target_")
    if target is None:
        kind = cfg.data.get("kind")
        if kind not in _BY_KIND:
            raise Her2labError(f"data: no _target_ and data.kind={kind!r} is not known; use one of {', '.join(_BY_KIND)}")
        cls = _BY_KIND[kind]
    else:
        try:
            cls = get_class(str(target))
        except Exception:
            raise Her2labError(f"data._target_={target!r}: no such class") from None
        if not (isinstance(cls, type) and issubclass(cls, Inputs)):
            raise Her2labError(f"data._target_={target!r} is not an her2lab.data.inputs.Inputs subclass")
    if bag_sampling(cfg) and not issubclass(cls, BagInputs):
        raise Her2labError(f"eval.bag_sampling.enabled=true scores bags of tile embeddings (data=bags), not "
                           f"{cls.__name__}; set eval.bag_sampling.enabled=false")
    return cls(cfg)


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0
