"""The training task: seed → data → model → fit → test the best checkpoint → metrics on disk.

Loggers are always closed, even on a crash, so a failed W&B run never leaks into the next
multirun job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from her2lab.data.labels import label_scheme
from her2lab.data.patches import SlideRecord
from her2lab.data.splits import save_splits, split_for_fold
from her2lab.errors import Her2labError, her2lab_cause
from her2lab.io import atomic_path, ensure_writable_dir
from her2lab.run.cohort import resolve_cohort
from her2lab.run.prepare import prepare_cohort, settings_from_config
from her2lab.slides.tiling import TilingParams

log = logging.getLogger(__name__)


def cohort_split(cfg: DictConfig, run_dir: Path) -> pd.DataFrame:
    """Manifest with ``label`` and ``split`` columns (patient-grouped folds), saved to the run.

    ``external_cohort=true`` (evaluation on a new cohort): every slide is in the ``test`` split.
    """
    manifest = resolve_cohort(cfg.cohort, num_workers=cfg.get("num_workers", 1))
    scheme = label_scheme(cfg.labels.name, cfg.labels.get("classes"))
    labels = scheme.encode(manifest)
    if cfg.get("external_cohort"):
        split = pd.Series("test", index=manifest.index)
    else:
        split = split_for_fold(manifest, labels, int(cfg.fold), int(cfg.data.n_folds), int(cfg.seed))
    save_splits(run_dir / "splits.csv", manifest, labels, split)
    return manifest.assign(label=labels.values, split=split.values)


def _by_split(table: pd.DataFrame, make, cfg: DictConfig) -> dict[str, list]:
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for r in table.itertuples():
        out[r.split].append(make(r))
    if cfg.get("external_cohort") and not out["test"]:
        raise Her2labError(f"cohort {cfg.cohort.name}: no slide left to evaluate")
    for s in () if cfg.get("external_cohort") else ("train", "val"):
        if not out[s]:
            raise Her2labError(f"the {s} split is empty (fold={cfg.fold}, data.n_folds={cfg.data.n_folds}); use more slides or fewer folds")
    return out


def _drop_failed(table: pd.DataFrame, failed: set[str], what: str) -> pd.DataFrame:
    if failed:
        log.warning("%d slide(s) left out (failed %s): %s", len(failed), what, ", ".join(sorted(failed)[:10]))
    return table[~table.slide_id.isin(failed)]


def prepared_splits(cfg: DictConfig, run_dir: Path, tiling: TilingParams) -> dict[str, list[SlideRecord]]:
    """Split cohort → tiles (made if missing) → patch-classifier records per split."""
    table = cohort_split(cfg, run_dir)
    prep = settings_from_config(cfg, tiling)
    report = prepare_cohort(table, prep, num_workers=cfg.get("num_workers", 1))
    table = _drop_failed(table, set(report.slide_id[report.status == "failed"]), "preparation")
    return _by_split(
        table,
        lambda r: SlideRecord(r.slide_id, r.path, str(prep.tiles_path(r.slide_id)), int(r.label), None if pd.isna(r.mpp) else float(r.mpp)),
        cfg,
    )


def thumbnail_splits(cfg: DictConfig, run_dir: Path) -> dict[str, list]:
    """Split cohort → prepared slides with thumbnails at ``data.thumb_mpp`` → thumbnail records."""
    import dataclasses

    from her2lab.data.thumbnails import ThumbRecord

    table = cohort_split(cfg, run_dir)
    tiling = TilingParams(**OmegaConf.to_container(cfg.tiling, resolve=True))
    prep = dataclasses.replace(settings_from_config(cfg, tiling), thumb_mpp=float(cfg.data.thumb_mpp))
    report = prepare_cohort(table, prep, num_workers=cfg.get("num_workers", 1))
    failed = report[report.status == "failed"]
    table = _exclude(cfg, table, dict(zip(failed.slide_id, failed.error.astype(str), strict=True)), prep.cache_dir, run_dir, "thumbnail")
    return _by_split(
        table,
        lambda r: ThumbRecord(r.slide_id, str(prep.thumb_path(r.slide_id)), str(prep.tiles_path(r.slide_id)), int(r.label)),
        cfg,
    )


def bag_splits(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, list], pd.DataFrame]:
    """Split cohort → features (extracted when missing, or a given folder) → bag records."""
    from her2lab.data.bags import BagRecord, features_identity
    from her2lab.run.extract import backbone_spec, features_dir, run_extract

    table = cohort_split(cfg, run_dir)
    if cfg.data.get("features_dir"):
        folder = Path(cfg.data.features_dir)
        missing = {s: "no features file" for s in table.slide_id if not (folder / f"{s}.h5").exists()}
    else:
        report = run_extract(cfg, manifest=table)
        tiling = TilingParams(**OmegaConf.to_container(cfg.tiling, resolve=True))
        folder = features_dir(cfg.cohort.cache_dir, tiling, backbone_spec(cfg.backbone))
        failed = report[report.status == "failed"]
        missing = dict(zip(failed.slide_id, failed.get("error", pd.Series("failed", index=failed.index)).astype(str), strict=True))
    table = _exclude(cfg, table, missing, folder, run_dir)
    splits = _by_split(table, lambda r: BagRecord(r.slide_id, str(folder / f"{r.slide_id}.h5"), int(r.label)), cfg)
    if _is_rank_zero():  # what made the features, so that evaluation on other slides can check it
        with atomic_path(run_dir / "features.json") as tmp:
            tmp.write_text(json.dumps({"folder": str(folder), **features_identity(_first(splits).features_path)}, indent=2))
    return splits, table


def _first(splits: dict[str, list]):
    """The first record of the first non-empty split."""
    return next(recs[0] for recs in splits.values() if recs)


def _exclude(
    cfg: DictConfig, table: pd.DataFrame, missing: dict[str, str], folder: Path, run_dir: Path, what: str = "features"
) -> pd.DataFrame:
    """Slides of the manifest without input (features, a thumbnail): an error, or
    (``data.missing_slides=drop``) left out and listed in ``excluded_slides.csv`` — never silently."""
    if not missing:
        return table
    ids = sorted(missing)
    policy = cfg.data.get("missing_slides", "error")
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


def build_datamodule(cfg: DictConfig, run_dir: Path) -> pl.LightningDataModule:
    kind = cfg.data.kind
    bb = cfg.backbone
    if kind == "bags":
        splits, _ = bag_splits(cfg, run_dir)
        given = cfg.data.get("features_dir")
        if bb.embed_dim is None or given:  # a timm model by name, or features from elsewhere: they say their size
            from her2lab.data.bags import features_identity

            dim = int(features_identity(_first(splits).features_path)["dim"])  # from the header: no read of the bag
            if given and bb.embed_dim not in (None, dim):
                log.info("features in %s are %d-d: backbone.embed_dim=%d (the %s preset says %s)",
                         given, dim, dim, bb.get("preset") or bb.name, bb.embed_dim)
            with open_dict(cfg):
                cfg.backbone.embed_dim = dim
        return build(cfg.data.module, splits=splits, embed_dim=cfg.backbone.embed_dim,
                     nonfinite=cfg.data.get("nonfinite", "error"))
    if kind == "patches":
        tiling = TilingParams(target_mpp=bb.target_mpp, patch_px=bb.input_px, min_tissue=cfg.data.min_tissue)
        splits = prepared_splits(cfg, run_dir, tiling)
        return build(cfg.data.module, splits=splits, mean=list(bb.mean), std=list(bb.std))
    if kind == "patch_folder":
        return build(
            cfg.data.module, input_px=bb.input_px, mean=list(bb.mean), std=list(bb.std), num_classes=cfg.labels.num_classes
        )
    if kind == "thumbnail":
        splits = thumbnail_splits(cfg, run_dir)
        return build(cfg.data.module, splits=splits, thumb_mpp=float(cfg.data.thumb_mpp))
    raise Her2labError(f"data.kind={kind!r} is not known; use bags, patches, patch_folder or thumbnail")


def write_predictions(module, dm, cfg: DictConfig, path: Path, split: str | None = None) -> None:
    """One row per tested slide: slide_id, label, per-class probabilities, fold."""
    ds = dm.datasets[split or ("test" if "test" in dm.datasets else "val")]
    classes = list(cfg.labels.classes)
    rows = []
    for o in sorted(module.test_outputs, key=lambda o: o["index"]):
        rec = ds.records[o["index"]]
        rows.append({"slide_id": rec.slide_id, "label": classes[o["label"]], "label_index": o["label"],
                     **{f"p_{c}": p for c, p in zip(classes, o["probs"], strict=True)},
                     "pred": classes[int(max(range(len(classes)), key=lambda i: o["probs"][i]))], "fold": int(cfg.fold)})
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def ensure_encoder(cfg: DictConfig, run_dir: Path) -> None:
    """Make the backbone's weights first when they are missing and its preset says how.

    ``python train.py backbone=hne`` on a fresh machine then runs ``experiment=pretrain_hne``
    (the transfer-learning step, on its own cohort) before embedding the MIL cohort.
    """
    bb = cfg.backbone
    if cfg.data.get("features_dir"):  # features made elsewhere: the backbone is never built
        return
    w, exp = bb.get("weights"), bb.get("pretrain_experiment")
    if not (cfg.get("auto_pretrain") and cfg.data.kind == "bags" and exp and w and w != "hub") or Path(w).exists():
        return
    from hydra import compose

    log.info("encoder weights %s missing: running experiment=%s (backbone=%s) first", w, exp, bb.preset)
    sub = compose(
        config_name="train",
        overrides=[f"experiment={exp}", f"backbone={bb.preset}", f"paths.output_dir={run_dir / 'pretrain_encoder'}",
                   f"paths.data_dir={cfg.paths.data_dir}", f"seed={cfg.seed}"],
    )
    train(sub)
    if not Path(w).exists():
        raise Her2labError(f"experiment={exp} did not produce {w}; run it on its own to see why")


def build(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that lets our one-line errors through unwrapped."""

    try:
        return instantiate(node, **kwargs)
    except Exception as exc:
        cause = her2lab_cause(exc)
        if cause is None:
            raise
        raise cause from None


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _sweep_group(cfg: DictConfig) -> str:
    """W&B group when none is given: the task, plus the sweep folder's name in a multirun, so
    every job of one sweep lands in one group."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return wandb_group(cfg.task_name, Path(hc.runtime.output_dir).parent)
    except ValueError:  # not launched by Hydra (compose API)
        pass
    return wandb_group(cfg.task_name, None)


def wandb_group(task_name: str, sweep_dir: Path | None) -> str:
    """The task's name, plus the sweep folder's name for the jobs of a multirun."""
    return f"{task_name}-{sweep_dir.name}" if sweep_dir is not None else str(task_name)


def _instantiate_loggers(cfg: DictConfig) -> list:
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        if "WandbLogger" in str(c.get("_target_", "")) and not c.get("group"):
            c = OmegaConf.merge(c, {"group": _sweep_group(cfg)})
        lg = build(c)
        loggers.append(lg)
    return loggers


def _log_wandb_test(loggers: list, module, class_names: list[str], predictions: Path, images: list[Path] = ()) -> None:
    """Test results as W&B charts and a table: confusion matrix, ROC curves, one row per slide,
    and pictures (Grad-CAM overlays)."""
    outs = sorted(getattr(module, "test_outputs", None) or [], key=lambda o: o["index"])
    wb = [lg for lg in loggers if lg.__class__.__name__ == "WandbLogger"]
    if not outs or not wb:
        return
    import wandb

    y = [o["label"] for o in outs]
    probs = [o["probs"] for o in outs]
    pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
    table = wandb.Table(dataframe=pd.read_csv(predictions)) if predictions.exists() else None
    for lg in wb:
        logs = {"test/confusion_matrix": wandb.plot.confusion_matrix(y_true=y, preds=pred, class_names=class_names),
                "test/roc": wandb.plot.roc_curve(y, probs, labels=class_names)}
        if table is not None:
            logs["test/predictions"] = table
        if images:
            logs["test/gradcam"] = [wandb.Image(str(p), caption=p.stem) for p in images]
        lg.experiment.log(logs)


def train(cfg: DictConfig) -> float | None:
    """Run one training job; returns ``cfg.optimized_metric`` for sweeps.

    Under DDP every rank runs this function (Lightning relaunches the script); files are
    written by rank 0 only, and test predictions are gathered from all ranks.
    """
    run_dir = ensure_writable_dir(cfg.paths.output_dir, "run folder")
    (run_dir / "failed.txt").unlink(missing_ok=True)
    try:
        return _train(cfg, run_dir)
    except Exception as exc:

        if _is_rank_zero():  # the sweep summary reads this
            cause = her2lab_cause(exc)
            msg = str(cause) if cause is not None else f"{type(exc).__name__}: {exc}"
            (run_dir / "failed.txt").write_text(msg.replace("\n", " ") + "\n")
        raise


def _train(cfg: DictConfig, run_dir: Path) -> float | None:
    from her2lab.checkpoint import check_fits, check_resumable, data_only, load_checkpoint

    resume = cfg.get("ckpt_path")
    if resume:  # read as data only, before any work: a file that would run code is refused here
        ckpt = load_checkpoint(resume)
        check_resumable(ckpt, resume)
    ensure_encoder(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision("high")
    zero = _is_rank_zero()
    if zero:
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    dm = build_datamodule(cfg, run_dir)
    if zero:  # again, now that the data have said what they are (e.g. the feature size)
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # Seeded again: making the data (e.g. building an encoder to extract features) draws random
    # numbers, and the model's initial weights must not depend on whether the features were cached.
    pl.seed_everything(int(cfg.seed), workers=True)
    module = build(cfg.model)
    if resume:
        check_fits(module, ckpt["state_dict"], resume, "the configured model")
        del ckpt
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = _instantiate_loggers(cfg)
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir))
    try:
        hparams = OmegaConf.to_container(cfg, resolve=True)
        for lg in loggers:
            lg.log_hyperparams(hparams)  # the whole resolved config, so sweeps can be compared
        try:  # checkpoints are read as data only (see her2lab.checkpoint)
            with data_only():
                trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
        finally:  # tiles left out for non-finite features are listed even when the run stops
            if zero:
                from her2lab.data.bags import write_excluded_tiles

                write_excluded_tiles(dm, run_dir / "excluded_tiles.csv")
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        if best is None:
            log.warning("no best checkpoint (no validation metric?): testing the last weights")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        with data_only():  # the best checkpoint may predate a resume (an earlier version's file)
            trainer.test(module, datamodule=dm, ckpt_path=best, weights_only=True) if best else trainer.test(module, datamodule=dm)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        metrics["best_checkpoint"] = best or ""
        metrics["epochs_trained"] = int(trainer.current_epoch)
        classes = [str(c) for c in cfg.labels.classes] if cfg.get("labels") else None
        if hasattr(module, "confusion"):
            metrics["test/confusion_matrix"] = module.confusion.compute().tolist()
        if zero:
            if getattr(module, "test_outputs", None):
                write_predictions(module, dm, cfg, run_dir / "predictions.csv")
            if "test/confusion_matrix" in metrics and classes:
                from her2lab.plots import confusion_png

                confusion_png(metrics["test/confusion_matrix"], classes, run_dir / "confusion_matrix.png",
                              title=f"{cfg.task_name} fold {cfg.fold} (test)")
            with atomic_path(run_dir / "metrics.json") as tmp:  # before the explanations: their failure loses nothing
                tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
            gc = cfg.get("gradcam") or {}
            overlays = []
            if cfg.data.kind == "thumbnail" and gc.get("enabled", True) and module.test_outputs:
                from her2lab.explain.gradcam import save_gradcam
                from her2lab.run.entry import explanations_guard

                with explanations_guard("Grad-CAM overlays", run_dir / "metrics.json"):
                    overlays = save_gradcam(module, dm.datasets["test"], module.test_outputs, classes,
                                            run_dir / "gradcam", layer=gc.get("layer"), limit=gc.get("limit"))
            if "test/confusion_matrix" in metrics and classes:
                _log_wandb_test(loggers, module, classes, run_dir / "predictions.csv", overlays)
            if cfg.get("export_encoder"):
                export_encoder(module, cfg, Path(cfg.export_encoder), run_dir)
            log.info("run folder: %s", run_dir)
        return metrics.get(cfg.get("optimized_metric", ""))
    finally:
        for lg in loggers:
            if lg.__class__.__name__ == "WandbLogger":
                import wandb

                wandb.finish()


def export_encoder(module: pl.LightningModule, cfg: DictConfig, path: Path, run_dir: Path) -> Path:
    """Save the encoder part of the (best) patch classifier where ``backbone=…`` will find it."""
    from her2lab.embed.backbones import BackboneSpec, create_model, headless_state, save_encoder

    spec = BackboneSpec(**{**OmegaConf.to_container(cfg.backbone, resolve=True), "weights": None, "pretrained": False})
    headless = create_model(spec)
    headless.load_state_dict(headless_state(module.net.cpu(), spec))
    extra = {"cohort": cfg.cohort.name, "labels": cfg.labels.name, "task_name": cfg.task_name, "run_dir": str(run_dir)}
    save_encoder(headless, spec, path, extra)
    save_encoder(headless, spec, run_dir / "encoder.safetensors", extra)
    log.info("encoder exported to %s (use: backbone=%s backbone.weights=%s)", path, spec.label, path)
    return path
