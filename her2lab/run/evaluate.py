"""Evaluation task: a trained run's checkpoint on one split of its cohort, with uncertainty.

Rebuilds the run's data from its own ``config.yaml`` (the same cohort, folds and features — the
splits are checked against the run's ``splits.csv``), loads the checkpoint (the best one unless
``ckpt_path`` says otherwise), tests it, and writes next to each other: ``predictions.csv``,
``metrics.json`` (torchmetrics, as in training, plus the expected calibration error),
``metrics_ci.csv`` (95 % bootstrap intervals resampled by patient), ``curves.png`` (ROC and
precision-recall) and ``calibration.png``; for MIL runs, attention maps (``heatmaps/``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from her2lab.errors import Her2labError
from her2lab.io import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def evaluate(cfg: DictConfig) -> float | None:
    from her2lab.eval.bootstrap import patient_bootstrap
    from her2lab.plots import curves_png, reliability_png
    from her2lab.run.train import build, build_datamodule, write_predictions

    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise Her2labError(f"run_dir={run_dir}: not a training run folder (no config.yaml)")
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        metrics_file = run_dir / "metrics.json"
        ckpt = json.loads(metrics_file.read_text()).get("best_checkpoint") if metrics_file.exists() else None
        if not ckpt:
            raise Her2labError(f"{run_dir}: no best checkpoint recorded (unfinished run?); give ckpt_path=…")
    if not Path(ckpt).is_file():
        raise Her2labError(f"ckpt_path={ckpt}: no such checkpoint")
    out = ensure_writable_dir(_output_dir(cfg), "evaluation folder")
    rcfg = OmegaConf.load(run_dir / "config.yaml")
    with open_dict(rcfg):
        rcfg.paths.output_dir = str(out)
        rcfg.auto_pretrain = False
    pl.seed_everything(int(rcfg.seed), workers=True)
    dm = build_datamodule(rcfg, out)
    net = rcfg.model.get("net") or {}
    if "in_dim" in net and net.in_dim is None:  # runs whose config was saved before the features were read
        net.in_dim = rcfg.backbone.embed_dim
    _same_splits(run_dir / "splits.csv", out / "splits.csv")
    dm.setup("test")
    split = str(cfg.split)
    if split not in ("val", "test"):
        raise Her2labError(f"split={split}: evaluate on val or test (training items are sub-sampled)")
    if split not in dm.datasets:
        raise Her2labError(f"split={split}: the run has splits {sorted(dm.datasets)}")
    module = build(rcfg.model)
    state = torch.load(ckpt, map_location="cpu", weights_only=False).get("state_dict", {})
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise Her2labError(f"{ckpt}: does not fit the run's model ({str(exc).splitlines()[0][:160]}); "
                           "was it made by another model or encoder?") from None
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.test(module, dataloaders=dm._eval(split))
    metrics = {k.replace("test/", f"{split}/", 1): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics[f"{split}/confusion_matrix"] = module.confusion.compute().tolist()
    metrics.update({"checkpoint": str(ckpt), "run_dir": str(run_dir), "split": split})
    write_predictions(module, dm, rcfg, out / "predictions.csv", split)
    preds = pd.read_csv(out / "predictions.csv").merge(
        pd.read_csv(out / "splits.csv", dtype={"slide_id": str, "patient_id": str})[["slide_id", "patient_id"]], on="slide_id")
    classes = [str(c) for c in rcfg.labels.classes]
    y = preds.label_index.to_numpy()
    probs = preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    metrics[f"{split}/ece"] = reliability_png(y, probs, out / "calibration.png", title=f"{split}: {run_dir.name}")
    curves_png(y, probs, classes, out / "curves.png", title=f"{split}: {run_dir.name}")
    ci = patient_bootstrap(preds, n=int(cfg.n_boot), seed=int(cfg.seed))
    with atomic_path(out / "metrics_ci.csv") as tmp:
        ci.to_csv(tmp, index=False)
    hm = cfg.get("heatmaps") or {}
    if rcfg.data.kind == "bags" and hm.get("enabled", True):
        loc = attention_maps(module, dm.datasets[split], rcfg, out / "heatmaps", limit=hm.get("limit"),
                             top_k=int(hm.get("top_k", 8)), chunk=int(hm.get("chunk", 8192)))
        if loc is not None:
            for k in ("attention", "tile_score"):
                if loc[f"{k}_auroc"].notna().any():
                    metrics[f"{split}/{k}_localisation_auroc"] = float(loc[f"{k}_auroc"].mean())
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    for r in ci.itertuples():
        log.info("%s %s = %.3f [%.3f, %.3f]", split, r.metric, r.value, r.lo, r.hi)
    log.info("evaluation folder: %s", out)
    return metrics.get(f"{split}/auroc")


def _same_splits(ran: Path, now: Path) -> None:
    if not ran.exists():
        return
    a = pd.read_csv(ran, dtype=str).sort_values("slide_id").reset_index(drop=True)
    b = pd.read_csv(now, dtype=str).sort_values("slide_id").reset_index(drop=True)
    if not a[["slide_id", "split"]].equals(b[["slide_id", "split"]]):
        raise Her2labError(f"the cohort's splits differ from the run's ({ran}): has the manifest changed since training?")


def attention_maps(module, dataset, rcfg: DictConfig, out: Path, limit: int | None = 16, top_k: int = 8,
                   chunk: int = 8192) -> pd.DataFrame | None:
    """Heatmaps, tile montage and GeoJSON per slide; with ground-truth positive masks (the demo),
    ``localisation.csv``: per slide with some positive tissue, the AUROC of attention and of the
    tile score for tiles inside the positive region."""
    import cv2

    from her2lab.explain.heatmaps import (
        bag_attention,
        geojson,
        heatmap_png,
        localisation_auroc,
        montage_png,
    )
    from her2lab.run.prepare import settings_from_config
    from her2lab.slides.tiling import TilingParams

    out.mkdir(parents=True, exist_ok=True)
    prep = settings_from_config(rcfg, TilingParams(**OmegaConf.to_container(rcfg.tiling, resolve=True)))
    masks = Path(str(rcfg.cohort.get("root") or "")) / "masks" if rcfg.cohort.get("synthetic") else None
    mask_mpp = float((rcfg.cohort.get("synthetic") or {}).get("mask_mpp", 8.0))
    classes = [str(c) for c in rcfg.labels.classes]
    rows = []
    for rec in dataset.records[:limit]:
        att = bag_attention(module.net, rec.features_path, module.probs, chunk=chunk)
        thumb = cv2.cvtColor(cv2.imread(str(prep.thumb_path(rec.slide_id))), cv2.COLOR_BGR2RGB)
        title = f"{rec.slide_id}: label {classes[rec.label]}, predicted {classes[int(att.probs.argmax())]} ({att.probs.max():.2f})"
        heatmap_png(att, thumb, prep.thumb_mpp, out / f"{rec.slide_id}_heatmap.png", title, classes)
        montage_png(att, out / f"{rec.slide_id}_tiles.png", k=top_k)
        geojson(att, out / f"{rec.slide_id}.geojson")
        mask_file = masks / f"{rec.slide_id}_positive.png" if masks else None
        if mask_file is not None and mask_file.exists():
            mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
            rows.append({"slide_id": rec.slide_id, "label": classes[rec.label], "n_tiles": len(att.attention),
                         "attention_auroc": localisation_auroc(att, mask, mask_mpp),
                         "tile_score_auroc": localisation_auroc(att, mask, mask_mpp, att.tile_score)})
    log.info("attention maps of %d slide(s) → %s", min(len(dataset.records), limit or 10**9), out)
    if not rows:
        return None
    loc = pd.DataFrame(rows)
    with atomic_path(out / "localisation.csv") as tmp:
        loc.to_csv(tmp, index=False)
    return loc
